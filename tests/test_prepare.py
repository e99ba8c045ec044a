"""scripts/prepare_data.py and token shards: round trip, bounded memory, shard reader,
random windows, never a half-written shard that looks whole, and training from shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import data, tokenizer
from jaxgpt.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "scripts" / "prepare_data.py"
TRAIN = ROOT / "scripts" / "train.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> list[Path]:
    """Three documents (one with non-ASCII text and blank-line runs) and an empty one."""
    d = tmp_path_factory.mktemp("docs")
    texts = [
        verdict_text[:9000],
        "Caf\u00e9 \u2014 na\u00efve <|endoftext|>\n\n\n  x\n" * 40,
        "",
        verdict_text[9000:14000],
    ]
    paths = []
    for i, text in enumerate(texts):
        paths.append(d / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def _all_tokens(out: Path) -> tuple[np.ndarray, np.ndarray]:
    splits = data.open_token_shards(out)
    return splits.train[: len(splits.train)], splits.val[: len(splits.val)]


def test_round_trip_equals_whole_document_encoding(tmp_path: Path, docs: list[Path]) -> None:
    out = tmp_path / "shards"
    # Small chunks and shards: many cuts, the split inside a document, shard boundaries.
    index = prepare([str(p) for p in docs], out, val_fraction=0.2, workers=2,
                    shard_tokens=700, chunk_chars=512)  # fmt: skip
    enc = tokenizer.get_encoding()
    texts = [p.read_text(encoding="utf-8") for p in docs]
    want = []
    for i, text in enumerate(texts):  # the independent reference: each document whole
        want += ([tokenizer.ENDOFTEXT_ID] if i else []) + enc.encode_ordinary(text)
    train, val = _all_tokens(out)
    np.testing.assert_array_equal(np.concatenate([train, val]), np.asarray(want, np.uint16))
    assert tokenizer.decode(np.concatenate([train, val])) == tokenizer.ENDOFTEXT.join(texts)
    assert len(index["train"]) == -(-len(train) // 700) and len(index["val"]) >= 1
    # Validation is the last ~20% of the bytes (cut at the next safe point).
    assert 0.15 < len(val) / len(want) < 0.25
    for name in index["train"] + index["val"]:
        side = json.loads((out / name).with_suffix(".json").read_text())
        assert side["dtype"] == "uint16" and side["tokenizer"] == "gpt2"
        assert (out / name).stat().st_size == 2 * side["tokens"]
    assert not list(out.glob("*.tmp"))


def test_cli_refuses_a_finished_dataset_and_clears_leftovers(
    tmp_path: Path, docs: list[Path]
) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    (out / "train_00000.bin.tmp").write_bytes(b"\0" * 10)  # an interrupted run's leftovers
    (out / "train_00000.bin").write_bytes(b"\0" * 10)
    done = _run(str(PREPARE), str(docs[0]), "--out", str(out), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout
    assert not (out / "train_00000.bin.tmp").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _run(str(PREPARE), str(docs[0]), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "already holds a prepared dataset" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    missing = _run(
        str(PREPARE), str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_damaged_shard_is_refused(tmp_path: Path, docs: list[Path]) -> None:
    out = tmp_path / "shards"
    index = prepare([str(docs[0])], out, workers=1, shard_tokens=500)
    path = out / index["train"][1]
    path.write_bytes(path.read_bytes()[:-2])  # one token short
    with pytest.raises(ValueError, match="not 500 tokens long"):
        data.open_token_shards(out)


def test_windows_cross_shard_boundaries_as_one_array(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    paths = []
    for i, (a, b) in enumerate([(0, 300), (300, 301), (301, 1000)]):
        paths.append(tmp_path / f"t{i}.bin")
        tokens[a:b].tofile(paths[-1])
    shards = data.TokenShards(paths)
    assert len(shards) == 1000
    np.testing.assert_array_equal(shards[250:350], tokens[250:350])
    got = list(data.batches(shards, 4, 32, 16, seed=3))
    want = list(data.batches(tokens, 4, 32, 16, seed=3))
    assert len(got) == len(want) > 1
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_random_windows_are_seeded_resumable_and_in_range() -> None:
    tokens = np.arange(5000) % 50257
    kw = dict(seed=7, sampling="random")
    first = list(data.batches(tokens, 4, 16, 16, **kw))
    assert len(first) == data.num_batches(len(data.window_starts(5000, 16, 16)), 4, True)
    for x, y in first:  # windows of consecutive ids, target shifted by one
        np.testing.assert_array_equal(x[:, 1:], x[:, :-1] + 1)
        np.testing.assert_array_equal(y, x + 1)
    again = list(data.batches(tokens, 4, 16, 16, **kw))
    np.testing.assert_array_equal(np.stack([b[0] for b in again]), np.stack([b[0] for b in first]))
    pos = data.DataPosition(seed=7, epoch=0, batch=5)
    resumed = next(data.batches(tokens, 4, 16, 16, position=pos, **kw))
    np.testing.assert_array_equal(resumed[0], first[5][0])
    other = next(data.batches(tokens, 4, 16, 16, position=data.DataPosition(seed=7, epoch=1), **kw))
    assert not np.array_equal(other[0], first[0][0])  # each epoch draws afresh
    rows = next(data.batches(tokens, 4, 16, 16, rows=slice(2, 4), **kw))
    np.testing.assert_array_equal(rows[0], first[0][0][2:4])  # a process's share


def _peak_rss_mb(text_mb: int, tmp_path: Path) -> float:
    """Peak RSS (MB) of the largest process of a prepare_data.py run on `text_mb` MB."""
    src = tmp_path / f"in{text_mb}.txt"
    words = np.array("the of and to a in that it was he for on are with as his they".split())
    rng = np.random.default_rng(text_mb)
    with open(src, "w", encoding="utf-8") as f:  # one document: memory must not scale with it
        for _ in range(text_mb):  # 1 MB of random words at a time, a newline every 12 words
            w = words[rng.integers(0, len(words), 180_000)]
            w[::12] = np.char.add("\n", w[::12])
            f.write(" ".join(w)[: 1 << 20])
    # getrusage(RUSAGE_CHILDREN) in a fresh parent: the max over the script and its workers.
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = _run("-c", probe, sys.executable, str(PREPARE), str(src), "--out",
                str(tmp_path / f"out{text_mb}"), "--quiet", "--chunk-chars", "65536",
                "--workers", "2", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / f"out{text_mb}" / data.DATASET_FILE).read_text())
    assert index["train_tokens"] > 100_000 * text_mb  # ~1 token per 4-5 characters
    return int(done.stdout.split()[-1]) / 1024


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    small, large = _peak_rss_mb(2, tmp_path), _peak_rss_mb(12, tmp_path)
    # Holding the text or its ids whole would add >= 10 MB of text plus ~2.5M ids
    # (28-byte Python ints + 8-byte list slots: ~90 MB); streaming adds nothing. 15 MB
    # covers allocator noise.
    print(f"peak RSS: {small:.0f} MB for 2 MB of text, {large:.0f} MB for 12 MB")
    assert large < small + 15, (small, large)


@pytest.mark.slow
def test_peak_memory_of_a_300_mb_corpus(tmp_path: Path) -> None:
    # Fixed bound: one interpreter with numpy + tiktoken (~60 MB), the GPT-2 ranks
    # (~40 MB) and ~10 chunks of 64K characters in flight; far below the corpus itself.
    assert _peak_rss_mb(300, tmp_path) < 200


def test_train_script_trains_from_shards(tmp_path: Path, docs: list[Path]) -> None:
    out = tmp_path / "shards"
    prepare([str(p) for p in docs], out, val_fraction=0.2, workers=1, shard_tokens=900)
    args = [
        str(TRAIN), "--model", "tiny", "--data", str(out), "--out", str(tmp_path / "run"),
        "--max-steps", "3", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1",
        "--sample-tokens", "2", "--sampling", "random", "--mesh", "data=1",
    ]  # fmt: skip
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mesh {'data': 1, 'fsdp': 1}" in done.stdout
    train_tokens = json.loads((out / data.DATASET_FILE).read_text())["train_tokens"]
    assert f"Training tokens: {(train_tokens - 1) // 16 // 4 * 4 * 16}" in done.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3] and np.isfinite(rows[-1]["val_loss"])
