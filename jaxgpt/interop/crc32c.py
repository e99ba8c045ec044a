"""CRC-32C (Castagnoli), as TensorFlow and LevelDB checksum their files; NumPy-vectorised.

Large inputs are cut into many equal chunks whose CRCs advance together (NumPy table
lookups, four bytes per step, for all chunks at once) and are then joined with GF(2)
"append n zero bytes" operators (the zlib `crc32_combine` idea). Pure NumPy: ~300 MB/s on
one CPU core (500 MB in 1.4-1.7 s), against ~5 MB/s for a byte-at-a-time Python loop.
"""

from __future__ import annotations

import functools

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial 0x1EDC6F41
_MASK_DELTA = 0xA282EAD8


def _make_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


_TABLE = _make_table()  # (256,) uint32; read-only constant
_TABLE_LIST = [int(x) for x in _TABLE]
# "Slicing-by-4" tables: _T4[k][b] advances a register whose low byte is b over k more zero
# bytes, so one step consumes a little-endian 32-bit word.
_T4 = [_TABLE]
for _ in range(3):
    _T4.append((_T4[-1] >> np.uint32(8)) ^ _TABLE[_T4[-1] & 0xFF])


def _raw_python(reg: int, data: bytes) -> int:
    """Advance the CRC register over `data` (no pre/post inversion), one byte at a time."""
    table = _TABLE_LIST
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def _apply(op: tuple[int, ...], reg: int) -> int:
    """Apply a GF(2)-linear 32x32 operator, given by the images of the 32 unit vectors."""
    out, i = 0, 0
    while reg:
        if reg & 1:
            out ^= op[i]
        reg >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=128)
def _zeros_op(n: int) -> tuple[int, ...]:
    """Operator that advances a register over `n` zero bytes (by repeated squaring)."""
    if n == 0:
        return tuple(1 << i for i in range(32))
    if n == 1:
        return tuple(_raw_python(1 << i, b"\0") for i in range(32))
    half = _zeros_op(n // 2)
    op = tuple(_apply(half, c) for c in half)  # half o half
    if n % 2:
        one = _zeros_op(1)
        op = tuple(_apply(one, c) for c in op)
    return op


def _apply_vec(op: tuple[int, ...], regs: np.ndarray) -> np.ndarray:
    out = np.zeros_like(regs)
    for i, col in enumerate(op):
        out ^= ((regs >> np.uint32(i)) & np.uint32(1)) * np.uint32(col)
    return out


def _raw_numpy(data: np.ndarray, chunks: int) -> int:
    """Register after `data` from init 0; `data` (chunks * length,) uint8, length % 4 == 0."""
    length = data.size // chunks
    words = data.view("<u4").reshape(chunks, length // 4)  # (chunks, words)
    t0, t1, t2, t3 = _T4
    regs = np.zeros(chunks, np.uint32)
    for start in range(0, words.shape[1], 256):  # transpose in cache-sized column blocks
        block = np.ascontiguousarray(words[:, start : start + 256].T)  # (<=256, chunks)
        for word in block:
            v = regs ^ word
            regs = t3[v & 0xFF] ^ t2[(v >> 8) & 0xFF] ^ t1[(v >> 16) & 0xFF] ^ t0[v >> 24]
    while regs.size > 1:  # join neighbours: R(A || B) = Z_|B|(R(A)) ^ R(B)
        regs = _apply_vec(_zeros_op(length), regs[0::2]) ^ regs[1::2]
        length *= 2
    return int(regs[0])


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C (init and final xor 0xFFFFFFFF); `crc32c(b"123456789") == 0xE3069283`."""
    buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    n = buf.size
    if n < (1 << 16):
        return _raw_python(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
    chunks = 1 << min(16, (n // 1024).bit_length() - 1)  # power of two, chunks of >= 1 KiB
    main = n - n % (4 * chunks)
    # The chunks start from a zero register; the 0xFFFFFFFF initial value is added back,
    # advanced over the same bytes, by linearity. The short tail goes byte by byte.
    reg = _raw_numpy(buf[:main], chunks) ^ _apply(_zeros_op(main), 0xFFFFFFFF)
    return _raw_python(reg, buf[main:].tobytes()) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB/TensorFlow's masked CRC: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF
