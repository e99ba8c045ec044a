"""The book's chapter-5 learning curve: its own PyTorch `train_model_simple` vs jaxgpt's `fit`.

Both train GPT_CONFIG_124M on "The Verdict" with the book's settings (batch 2, stride 256,
AdamW lr 4e-4, weight decay 0.1, 10 epochs, eval_freq 5, eval_iter 5, seed 123), on this
machine, one after the other, and print the evaluations side by side. The PyTorch side is
`llms_from_scratch.ch05.train_model_simple` over the book's `GPTDatasetV1` and DataLoader
(with jaxgpt's offline tokenizer in place of `tiktoken.get_encoding`, which downloads).

    python benchmarks/book_curve.py --data ../shared/data/the-verdict.txt   # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

BOOK = {"batch_size": 2, "lr": 4e-4, "weight_decay": 0.1, "epochs": 10, "eval_freq": 5}
EVAL_ITER = 5


def run_torch(text: str, epochs: int, seed: int) -> dict:
    import torch
    from llms_from_scratch.ch02 import GPTDatasetV1
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import calc_loss_loader, train_model_simple

    from jaxgpt.tokenizer import get_encoding

    cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
           "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}  # fmt: skip
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
    with torch.no_grad():
        model.eval()
        initial = (calc_loss_loader(train_loader, model, "cpu"),
                   calc_loss_loader(val_loader, model, "cpu"))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=BOOK["lr"], weight_decay=BOOK["weight_decay"])
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        train_model_simple(model, train_loader, val_loader, opt, "cpu", epochs,
                           BOOK["eval_freq"], EVAL_ITER, "Every effort moves you", enc)  # fmt: skip
    wall = time.perf_counter() - t
    evals = [
        {"epoch": int(m[1]), "step": int(m[2]), "train": float(m[3]), "val": float(m[4])}
        for m in re.finditer(r"Ep (\d+) \(Step (\d+)\): Train loss ([\d.]+), Val loss ([\d.]+)",
                             out.getvalue())
    ]  # fmt: skip
    samples = [ln for ln in out.getvalue().splitlines() if ln.startswith("Every effort")]
    return {"initial": initial, "evals": evals, "samples": samples, "wall_s": wall}


def run_jaxgpt(data: str, epochs: int, seed: int) -> dict:
    from jaxgpt.config import TrainConfig, get_preset
    from jaxgpt.train import fit

    evals, samples, untrained = [], [], {}

    def on_event(name: str, payload: dict) -> None:
        if name == "eval":
            evals.append(payload)
        elif name == "sample":
            samples.append(payload)
        elif name == "untrained":
            untrained.update(payload)

    with tempfile.TemporaryDirectory() as out:
        tc = TrainConfig(data=data, epochs=epochs, eval_iter=EVAL_ITER, seed=seed, out=out,
                         start_context="Every effort moves you", checkpoint_every=10_000,
                         **{k: v for k, v in BOOK.items() if k != "epochs"})  # fmt: skip
        t = time.perf_counter()
        fit(get_preset("book-124m"), tc, on_event=on_event, progress=False)
        wall = time.perf_counter() - t
    return {"initial": untrained, "evals": evals, "samples": samples, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="path to the-verdict.txt")
    ap.add_argument("--epochs", type=int, default=BOOK["epochs"])
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--only", choices=["torch", "jaxgpt"], default=None)
    ap.add_argument("--out", default="benchmarks/results/book_curve.json")
    args = ap.parse_args(argv)
    path = Path(args.data)
    if not path.is_file():
        print(
            f"error: --data {path} is not a file; pass the path of the-verdict.txt", file=sys.stderr
        )
        return 2
    text = path.read_text(encoding="utf-8")
    res: dict = {"settings": {**BOOK, "epochs": args.epochs, "eval_iter": EVAL_ITER,
                              "seed": args.seed}}  # fmt: skip
    if args.only in (None, "torch"):
        res["torch_book"] = run_torch(text, args.epochs, args.seed)
        print(json.dumps({"torch_book": res["torch_book"]["evals"][-3:]}), flush=True)
    if args.only in (None, "jaxgpt"):
        res["jaxgpt"] = run_jaxgpt(str(path), args.epochs, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
