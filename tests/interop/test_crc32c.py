"""CRC-32C against published check values and a bit-at-a-time definition."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgpt.interop.crc32c import crc32c, mask


def _bitwise(data: bytes) -> int:
    """CRC-32C straight from its definition: reflected polynomial 0x82F63B78, one bit a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"123456789", 0xE3069283),  # the standard CRC catalogue check value
        (bytes(32), 0x8A9136AA),  # RFC 3720, appendix B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0x0),
    ],
)
def test_known_values(data: bytes, want: int) -> None:
    assert crc32c(data) == want


@pytest.mark.parametrize("n", [1, 1000, 65536, 65537, 200_003])
def test_matches_bitwise_definition(n: int) -> None:
    # Sizes from 64 KiB take the chunked NumPy path, including front padding (odd n).
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == _bitwise(data)


def test_mask_is_leveldb_rotation_plus_constant() -> None:
    # LevelDB crc32c::Mask: ((crc >> 15) | (crc << 17)) + 0xa282ead8, modulo 2**32.
    assert mask(0) == 0xA282EAD8
    assert mask(1) == (1 << 17) + 0xA282EAD8
    assert mask(1 << 15) == 1 + 0xA282EAD8
    assert mask(0xFFFFFFFF) == (0xFFFFFFFF + 0xA282EAD8) % (1 << 32)
