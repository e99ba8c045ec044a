"""The book's chapter-5 experiment end to end: its own PyTorch code vs `scripts/train.py`.

Both train GPT_CONFIG_124M (or, `--config 29m`, its 29M variant: emb 256, 4 layers, 4 heads,
5 epochs) on "The Verdict" with the book's settings (batch 2, stride 256,
AdamW lr 4e-4, weight decay 0.1, 10 epochs, eval_freq 5, eval_iter 5, seed 123), on this
machine, one after the other, each in a fresh Python process whose whole wall time counts
(start-up, imports, compilation). The PyTorch side is `llms_from_scratch.ch05`'s
`train_model_simple` with its `evaluate_model` and per-epoch `generate_and_print_sample` over
the book's `GPTDatasetV1` and DataLoader (jaxgpt's offline tokenizer stands in for
`tiktoken.get_encoding`, which downloads). The jaxgpt side is `scripts/train.py` with the
book's flags and an empty compilation cache, then once more with the cache warm. Printed:
the evaluations side by side and each side's wall time split into setup, compile, training
steps, evaluation, sampling and checkpoints.

    python benchmarks/book_curve.py --data tests/fixtures/the-verdict.txt   # ~20 min on 2 cores
    python benchmarks/book_curve.py --data tests/fixtures/the-verdict.txt --config 29m  # ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_startup import parse_wall  # noqa: E402  (benchmarks/ is on the path when run)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
BOOK = {"batch_size": 2, "lr": 4e-4, "weight_decay": 0.1, "epochs": 10, "eval_freq": 5}
EVAL_ITER = 5
# name -> (the model's changes to GPT_CONFIG_124M, epochs): the book's run and the 29M.
CONFIGS = {
    "book-124m": ({}, 10),
    "29m": ({"emb_dim": 256, "n_layers": 4, "n_heads": 4}, 5),
}


def run_torch(text: str, epochs: int, seed: int, changes: dict) -> dict:
    start = time.perf_counter()
    import torch
    from llms_from_scratch import ch05
    from llms_from_scratch.ch02 import GPTDatasetV1
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import calc_loss_loader, train_model_simple

    from jaxgpt.tokenizer import get_encoding

    cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
           "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False, **changes}  # fmt: skip
    enc = get_encoding()
    split = int(0.9 * len(text))

    def loader(part: str, shuffle: bool, drop_last: bool):
        ds = GPTDatasetV1(part, enc, cfg["context_length"], cfg["context_length"])
        return torch.utils.data.DataLoader(
            ds, batch_size=BOOK["batch_size"], shuffle=shuffle, drop_last=drop_last
        )

    torch.manual_seed(seed)
    model = GPTModel(cfg)
    train_loader = loader(text[:split], True, True)
    val_loader = loader(text[split:], False, False)
    t = time.perf_counter()
    with torch.no_grad():
        model.eval()
        initial = (calc_loss_loader(train_loader, model, "cpu"),
                   calc_loss_loader(val_loader, model, "cpu"))  # fmt: skip
    times = {"eval": time.perf_counter() - t, "eval_loop": 0.0, "sample": 0.0}
    opt = torch.optim.AdamW(model.parameters(), lr=BOOK["lr"], weight_decay=BOOK["weight_decay"])
    times["setup"] = time.perf_counter() - start - times["eval"]
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), _timing(ch05, times):
        train_model_simple(model, train_loader, val_loader, opt, "cpu", epochs,
                           BOOK["eval_freq"], EVAL_ITER, "Every effort moves you", enc)  # fmt: skip
    wall = time.perf_counter() - t
    times["train"] = wall - times["eval_loop"] - times["sample"]
    times["eval"] += times.pop("eval_loop")
    evals = _evals(out.getvalue())
    samples = [ln for ln in out.getvalue().splitlines() if ln.startswith("Every effort")]
    return {"initial": initial, "evals": evals, "samples": samples, "wall_s": wall, "times": times}


def _evals(text: str) -> list[dict]:
    """The book's "Ep 1 (Step 000005): Train loss ..., Val loss ..." lines, parsed."""
    pattern = r"Ep (\d+) \(Step (\d+)\): Train loss ([\d.]+), Val loss ([\d.]+)"
    return [
        {"epoch": int(m[1]), "step": int(m[2]), "train": float(m[3]), "val": float(m[4])}
        for m in re.finditer(pattern, text)
    ]


@contextlib.contextmanager
def _timing(ch05, times: dict):
    """Time the book's evaluate_model and generate_and_print_sample, which train_model_simple
    looks up in its module at call time."""
    originals = {"eval_loop": ch05.evaluate_model, "sample": ch05.generate_and_print_sample}

    def timed(name):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t

        return call

    ch05.evaluate_model, ch05.generate_and_print_sample = timed("eval_loop"), timed("sample")
    try:
        yield
    finally:
        ch05.evaluate_model = originals["eval_loop"]
        ch05.generate_and_print_sample = originals["sample"]


def run_script(data: str, epochs: int, seed: int, cache_dir: str, changes: dict) -> dict:
    """`scripts/train.py` with the book's flags in a fresh process; whole wall time counted."""
    model = [x for k, v in changes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    flags = ["--model", "book-124m", *model, "--data", data, "--epochs", str(epochs),
             "--seed", str(seed),
             "--batch-size", str(BOOK["batch_size"]), "--lr", str(BOOK["lr"]),
             "--weight-decay", str(BOOK["weight_decay"]), "--eval-freq", str(BOOK["eval_freq"]),
             "--eval-iter", str(EVAL_ITER), "--start-context", "Every effort moves you",
             "--cache-dir", cache_dir]  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *flags, "--out", str(Path(out) / "run")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - t
    evals = _evals(done.stdout)
    phases = parse_wall(done.stdout)
    times = phases["times"]
    times["startup"] = wall - times["total"]  # interpreter, imports, argument parsing
    samples = [ln for ln in done.stdout.splitlines() if ln.startswith("Every effort")]
    res = {"evals": evals, "samples": samples, "wall_s": wall, "times": times}
    return {**res, "compilation": phases.get("compilation")}


def torch_process(data: str, config: str, epochs: int | None = None, seed: int = 123) -> dict:
    """The book's PyTorch loop (`run_torch`) in a fresh interpreter, so its start-up and
    imports count: its result with `process_wall_s` (the whole process) and `times["startup"]`."""
    epochs = epochs or CONFIGS[config][1]
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--data", data, "--epochs", str(epochs),
         "--seed", str(seed), "--config", config, "--child", "torch"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    res = json.loads(done.stdout.splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t
    res["times"]["startup"] = res["process_wall_s"] - sum(res["times"].values())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="path to the-verdict.txt")
    ap.add_argument("--config", choices=list(CONFIGS), default="book-124m")
    ap.add_argument("--epochs", type=int, help="default: the config's (10; 29m: 5)")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--only", choices=["torch", "jaxgpt"], default=None)
    ap.add_argument("--child", choices=["torch"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", help="default: benchmarks/results/book_curve[_29m].json")
    args = ap.parse_args(argv)
    path = Path(args.data)
    if not path.is_file():
        print(
            f"error: --data {path} is not a file; pass the path of the-verdict.txt", file=sys.stderr
        )
        return 2
    text = path.read_text(encoding="utf-8")
    changes, epochs = CONFIGS[args.config]
    args.epochs = args.epochs or epochs
    if args.child == "torch":
        print(json.dumps(run_torch(text, args.epochs, args.seed, changes), default=str))
        return 0
    from machine import machine

    res: dict = {"benchmark": "book_run", **machine(), "config": args.config, "model": changes,
                 "settings": {**BOOK, "epochs": args.epochs, "eval_iter": EVAL_ITER,
                              "seed": args.seed}, "loadavg_start": os.getloadavg()}  # fmt: skip
    if args.only in (None, "torch"):
        res["torch_book"] = torch_process(args.data, args.config, args.epochs, args.seed)
        _show("torch (book)", res["torch_book"])
    if args.only in (None, "jaxgpt"):
        with tempfile.TemporaryDirectory() as cache:
            res["jaxgpt"] = run_script(str(path), args.epochs, args.seed, cache, changes)
            _show("jaxgpt, empty compile cache", res["jaxgpt"])
            res["jaxgpt_warm_cache"] = run_script(str(path), args.epochs, args.seed, cache, changes)
            _show("jaxgpt, warm compile cache", res["jaxgpt_warm_cache"])
    args.out = (
        args.out
        or f"benchmarks/results/book_curve{'' if args.config == 'book-124m' else '_29m'}.json"
    )
    if "torch_book" in res and "jaxgpt" in res:
        res["speedup_vs_torch"] = res["torch_book"]["process_wall_s"] / res["jaxgpt"]["wall_s"]
        print(f"jaxgpt (cold cache) is {res['speedup_vs_torch']:.2f}x the book's code, wall time")
    res["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


def _show(name: str, r: dict) -> None:
    wall = r.get("process_wall_s", r["wall_s"])
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["times"].items() if k != "total")
    last = r["evals"][-1] if r["evals"] else {}
    print(f"{name}: {wall:.1f} s ({parts}); last eval {last}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
