"""TF V2 checkpoint reader on a real TensorFlow-written checkpoint, plus corruption checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.interop.tfckpt import read_checkpoint, read_index


def _names(n_layer: int) -> set[str]:
    """The 28 variable names of OpenAI's src/model.py for 2 layers (fixture README)."""
    block = [
        "ln_1/g", "ln_1/b", "attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b",
        "ln_2/g", "ln_2/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b",
    ]  # fmt: skip
    names = {"model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b"}
    return names | {f"model/h{i}/{b}" for i in range(n_layer) for b in block}


def test_reads_every_variable_with_its_shape(openai_dir: Path) -> None:
    hp = json.loads((openai_dir / "hparams.json").read_text())
    tensors = read_checkpoint(openai_dir / "model.ckpt")
    assert set(tensors) == _names(hp["n_layer"])
    assert tensors["model/wte"].shape == (50257, 8)
    assert tensors["model/wpe"].shape == (32, 8)
    assert tensors["model/h1/attn/c_attn/w"].shape == (1, 8, 24)
    assert tensors["model/h0/mlp/c_proj/w"].shape == (1, 32, 8)
    assert all(t.dtype == np.float32 for t in tensors.values())
    # Offsets tile the data file exactly: nothing skipped, nothing read twice.
    n_shards, entries = read_index(openai_dir / "model.ckpt")
    assert n_shards == 1
    spans = sorted((e.offset, e.size) for e in entries.values())
    assert spans[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    data_size = (openai_dir / "model.ckpt.data-00000-of-00001").stat().st_size
    assert spans[-1][0] + spans[-1][1] == data_size


def test_values_match_fixture_draws(openai_dir: Path) -> None:
    # The README: wte ~ N(0, 0.2), LayerNorm gains 1 + 0.1 N(0, 1). Statistics of 400k draws.
    t = read_checkpoint(openai_dir / "model.ckpt")
    assert abs(t["model/wte"].std() - 0.2) < 0.002
    assert abs(t["model/h0/ln_1/g"].mean() - 1.0) < 0.2


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_corrupt_tensor_fails_checksum(openai_dir: Path, tmp_path: Path) -> None:
    d = _copy(openai_dir, tmp_path / "ckpt")
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01  # inside model/h0/attn/c_attn/w (offset 96, size 768)
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch for tensor 'model/h0/attn/c_attn/w'"):
        read_checkpoint(d / "model.ckpt")
    # Without verification the flipped bit comes through.
    assert read_checkpoint(d / "model.ckpt", verify=False)["model/wte"].shape == (50257, 8)


def test_corrupt_index_block_fails_checksum(openai_dir: Path, tmp_path: Path) -> None:
    d = _copy(openai_dir, tmp_path / "ckpt")
    index = d / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x40  # inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch in block"):
        read_index(d / "model.ckpt")


def test_compressed_block_is_rejected(openai_dir: Path, tmp_path: Path) -> None:
    d = _copy(openai_dir, tmp_path / "ckpt")
    index = d / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    # The footer's index handle locates the index block; its trailer's type byte follows it.
    footer = raw[-48:]
    pos = 0
    for _ in range(2):  # skip metaindex offset and size
        while footer[pos] & 0x80:
            pos += 1
        pos += 1
    vals = []
    for _ in range(2):
        v, shift = 0, 0
        while True:
            b = footer[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        vals.append(v)
    raw[vals[0] + vals[1]] = 1  # snappy
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="snappy"):
        read_index(d / "model.ckpt")


def test_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "x.index").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="bad magic number"):
        read_index(tmp_path / "x")


def test_missing_data_file(openai_dir: Path, tmp_path: Path) -> None:
    d = _copy(openai_dir, tmp_path / "ckpt")
    (d / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(FileNotFoundError, match="data-00000-of-00001"):
        read_checkpoint(d / "model.ckpt")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _write_table(path: Path, items: list[tuple[bytes, bytes]], per_block: int) -> None:
    """A LevelDB table written from its spec (doc/table_format.md): data blocks of
    `per_block` entries, prefix-compressed keys, restart every 2 entries, an index block,
    an empty metaindex block, uncompressed trailers with masked CRC-32C, 48-byte footer."""
    import struct

    from jaxgpt.interop.crc32c import crc32c, mask

    out = bytearray()

    def block(entries: list[tuple[bytes, bytes]]) -> bytes:  # returns the block handle
        body, restarts, prev = bytearray(), [], b""
        for i, (k, v) in enumerate(entries):
            shared = 0
            if i % 2:
                while shared < min(len(k), len(prev)) and k[shared] == prev[shared]:
                    shared += 1
            else:
                restarts.append(len(body))
            body += _varint(shared) + _varint(len(k) - shared) + _varint(len(v))
            body += k[shared:] + v
            prev = k
        for r in restarts:
            body += struct.pack("<I", r)
        body += struct.pack("<I", len(restarts))
        handle = _varint(len(out)) + _varint(len(body))
        out.extend(body + b"\0" + struct.pack("<I", mask(crc32c(bytes(body) + b"\0"))))
        return handle

    index = []
    for start in range(0, len(items), per_block):
        chunk = items[start : start + per_block]
        index.append((chunk[-1][0], block(chunk)))
    meta = block([])
    idx = block(index)
    footer = (meta + idx).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    path.write_bytes(bytes(out) + footer)


def test_multi_block_index(openai_dir: Path, tmp_path: Path) -> None:
    # OpenAI's real 124M index holds 148 entries (several 4 KiB blocks); the fixture fits in
    # one block. Rewrite its entries across 7 blocks and read them back.
    from jaxgpt.interop.tfckpt import read_table

    items = sorted(read_table(openai_dir / "model.ckpt.index").items())
    d = _copy(openai_dir, tmp_path / "ckpt")
    _write_table(d / "model.ckpt.index", items, per_block=4)
    assert read_table(d / "model.ckpt.index") == dict(items)
    want = read_checkpoint(openai_dir / "model.ckpt")
    got = read_checkpoint(d / "model.ckpt")
    assert all(np.array_equal(want[k], got[k]) for k in want)
