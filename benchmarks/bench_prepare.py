"""Data preparation: scripts/prepare_data.py's tokens/s vs plain single-threaded tiktoken.

Both sides tokenise the same files (real English and Python-docs text, one document per
file) with the same GPT-2 encoding (`encode_ordinary`). The baseline reads each file and
encodes it in one call on one thread; `prepare` streams, uses a process pool over all cores
and writes the shards, its start-up included. Repeats alternate the two.

    python benchmarks/bench_prepare.py --mb 48 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jaxgpt import data, tokenizer
from jaxgpt.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(folder: Path, mb: int, files: int) -> list[Path]:
    """`files` documents, `mb` MB in all, of the Python docs and the book's corpus."""
    verdict = ROOT / "tests" / "fixtures" / "the-verdict.txt"
    text = data.pydoc_text() + (verdict.read_text(encoding="utf-8") if verdict.is_file() else "")
    per_file = mb * 2**20 // files
    paths = []
    for i in range(files):
        body = (text * (per_file // len(text) + 1))[:per_file]
        paths.append(folder / f"doc{i:03d}.txt")
        paths[-1].write_text(body, encoding="utf-8")
    return paths


def baseline(paths: list[Path]) -> tuple[int, float]:
    """Plain tiktoken: read and encode each file on one thread; (tokens, seconds)."""
    enc = tokenizer.get_encoding()
    t, n = time.perf_counter(), 0
    for p in paths:
        n += len(enc.encode_ordinary(p.read_text(encoding="utf-8")))
    return n + len(paths) - 1, time.perf_counter() - t  # + separators, as prepare writes


def ours(paths: list[Path], out: Path, workers: int | None) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    index = prepare([str(p) for p in paths], out, val_fraction=0.1, workers=workers)
    return index["train_tokens"] + index["val_tokens"], time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=48, help="corpus size in MB")
    p.add_argument("--files", type=int, default=12, help="documents")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="default: all cores")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    args = p.parse_args()
    tokenizer.get_encoding()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_corpus(Path(tmp), args.mb, args.files)
        base, mine = [], []
        for _ in range(args.repeats):
            base.append(baseline(paths))
            mine.append(ours(paths, Path(tmp) / "shards", args.workers))
    assert {n for n, _ in base} == {n for n, _ in mine}, (base, mine)  # same tokens
    # Imported only now: machine.py imports JAX, and with JAX loaded `prepare` must start its
    # workers by forkserver (each rebuilding the encoding) instead of fork.
    from machine import machine  # benchmarks/machine.py (its folder is on sys.path)

    tokens = base[0][0]
    best_base, best_ours = min(s for _, s in base), min(s for _, s in mine)
    result = {
        "benchmark": "prepare",
        **machine(),
        "corpus_mb": args.mb, "files": args.files, "tokens": tokens, "repeats": args.repeats,
        "workers": args.workers or os.cpu_count(),
        "tiktoken_tokens_per_sec": tokens / best_base,
        "prepare_tokens_per_sec": tokens / best_ours,
        "speedup": best_base / best_ours,
        "seconds": {"tiktoken": [s for _, s in base], "prepare": [s for _, s in mine]},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
