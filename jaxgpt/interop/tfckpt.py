"""Reader for TensorFlow V2 checkpoints ("tensor bundles") that needs no TensorFlow.

`<prefix>.index` is a LevelDB-format table (sorted, prefix-compressed keys in blocks with
restart points, a footer with block handles and a magic number). Under the empty key it
holds a BundleHeaderProto; under each tensor name a BundleEntryProto (dtype, shape, shard,
offset, size, masked CRC-32C) that locates the raw bytes in `<prefix>.data-SSSSS-of-NNNNN`.
Protobuf wire format is decoded by hand. Formats: tensorflow/core/util/tensor_bundle/ and
github.com/google/leveldb/blob/main/doc/table_format.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxgpt.interop.crc32c import crc32c, mask

_MAGIC = 0xDB4775248B80FB57  # LevelDB table magic number, little-endian u64 at the file end
_FOOTER_LEN = 48
# TensorFlow DataType enum values (types.proto) -> NumPy little-endian dtypes.
_DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: dtype (TF enum), shape, shard, byte offset/size, masked CRC."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in checkpoint index; the file is corrupt")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode protobuf wire format into (field number, int or bytes) pairs, in order."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in checkpoint index")
        out.append((field, value))
    return out


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _proto_fields(buf):
        if field == 2:  # repeated Dim {int64 size = 1; string name = 2}
            size = dict(_proto_fields(value)).get(1, 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)
        elif field == 3 and value:
            raise ValueError("checkpoint tensor has unknown rank; cannot read it")
    return tuple(dims)


def _parse_entry(buf: bytes) -> TensorEntry:
    f: dict[int, object] = {}
    sliced = False
    for field, value in _proto_fields(buf):
        sliced |= field == 7
        f[field] = value
    shape = _parse_shape(f[2]) if 2 in f else ()  # type: ignore[arg-type]
    return TensorEntry(
        dtype=int(f.get(1, 0)),  # type: ignore[arg-type]
        shape=shape,
        shard_id=int(f.get(3, 0)),  # type: ignore[arg-type]
        offset=int(f.get(4, 0)),  # type: ignore[arg-type]
        size=int(f.get(5, 0)),  # type: ignore[arg-type]
        crc32c=int(f[6]) if 6 in f else None,  # type: ignore[arg-type]
        sliced=sliced,
    )


def _read_block(data: bytes, offset: int, size: int, verify: bool, path: Path) -> bytes:
    """Block contents; checks the 5-byte trailer (compression type, masked CRC)."""
    if offset + size + 5 > len(data):
        raise ValueError(f"{path}: block at offset {offset} runs past the end; file is truncated")
    block = data[offset : offset + size]
    kind = data[offset + size]
    if kind != 0:
        name = {1: "snappy", 2: "zstd"}.get(kind, f"type {kind}")
        raise ValueError(
            f"{path}: block compressed with {name}; only uncompressed tables are supported "
            "(TensorFlow writes tensor bundles uncompressed)"
        )
    if verify:
        (stored,) = struct.unpack_from("<I", data, offset + size + 1)
        if mask(crc32c(data[offset : offset + size + 1])) != stored:
            raise ValueError(f"{path}: checksum mismatch in block at offset {offset}; corrupt")
    return block


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed (key, value) pairs."""
    if len(block) < 4:
        raise ValueError("checkpoint index block is too short; the file is corrupt")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + vlen]))
        pos += vlen
    return entries


def _handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def read_table(path: str | Path, *, verify: bool = True) -> dict[bytes, bytes]:
    """All key/value pairs of a LevelDB-format table file (e.g. a checkpoint `.index`)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _FOOTER_LEN:
        raise ValueError(f"{path} is {len(data)} bytes, too short for a checkpoint index")
    footer = data[-_FOOTER_LEN:]
    if struct.unpack_from("<Q", footer, 40)[0] != _MAGIC:
        raise ValueError(f"{path} is not a TensorFlow checkpoint index (bad magic number)")
    _, _, pos = _handle(footer)  # metaindex block: unused (no filters in tensor bundles)
    index_off, index_size, _ = _handle(footer, pos)
    table: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_read_block(data, index_off, index_size, verify, path)):
        off, size, _ = _handle(handle)
        table.update(_block_entries(_read_block(data, off, size, verify, path)))
    return table


def read_index(prefix: str | Path, *, verify: bool = True) -> tuple[int, dict[str, TensorEntry]]:
    """Parse `<prefix>.index`: (number of data shards, {tensor name: TensorEntry})."""
    table = read_table(f"{prefix}.index", verify=verify)
    if b"" not in table:
        raise ValueError(f"{prefix}.index has no bundle header; is it a TF V2 checkpoint?")
    header = dict(_proto_fields(table.pop(b"")))
    if header.get(2, 0) != 0:
        raise ValueError(f"{prefix}: big-endian checkpoints are not supported")
    entries = {k.decode("utf-8"): _parse_entry(v) for k, v in table.items()}
    return int(header.get(1, 1)), entries  # type: ignore[arg-type]


def read_checkpoint(prefix: str | Path, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of a TF V2 checkpoint into NumPy arrays.

    Args:
      prefix: the checkpoint prefix, e.g. `folder/model.ckpt` (files `.index`, `.data-*`).
      verify: check the CRC-32C of every index block and tensor (~300 MB/s; gpt2-xl's
        6.2 GB take about 20 s, so `verify=False` is offered for repeated loads).

    Returns:
      {variable name: array} with the stored dtype and shape.
    """
    n_shards, entries = read_index(prefix, verify=verify)
    shards: dict[int, np.memmap] = {}
    out = {}
    for name, e in sorted(entries.items()):
        if e.sliced:
            raise ValueError(f"{prefix}: tensor {name!r} is partitioned; not supported")
        if e.dtype not in _DTYPES:
            raise ValueError(f"{prefix}: tensor {name!r} has unsupported TF dtype enum {e.dtype}")
        if e.shard_id not in shards:
            shard = Path(f"{prefix}.data-{e.shard_id:05d}-of-{n_shards:05d}")
            if not shard.is_file():
                raise FileNotFoundError(f"checkpoint data file {shard} is missing")
            shards[e.shard_id] = np.memmap(shard, np.uint8, mode="r")
        raw = shards[e.shard_id][e.offset : e.offset + e.size]
        if raw.size != e.size:
            raise ValueError(f"{prefix}: data for {name!r} is truncated; re-download the file")
        if verify and e.crc32c is not None and mask(crc32c(raw)) != e.crc32c:
            raise ValueError(f"{prefix}: checksum mismatch for tensor {name!r}; file is corrupt")
        dtype = np.dtype(_DTYPES[e.dtype])
        if dtype.itemsize * int(np.prod(e.shape)) != e.size:
            raise ValueError(f"{prefix}: tensor {name!r} size {e.size} disagrees with {e.shape}")
        out[name] = np.frombuffer(raw.tobytes(), dtype).reshape(e.shape)
    return out
