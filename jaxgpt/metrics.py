"""Metrics log (JSONL), progress display (tqdm) and the book's loss/perplexity plots (headless)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
ROW_KEYS = (
    "step",
    "epoch",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "train_ppl",
    "val_ppl",
    "lr",
    "grad_norm",
    "tokens_per_sec",
)


def make_row(**values: float) -> dict[str, float]:
    """A metrics row with the keys in `ROW_KEYS`; perplexities are exp of the losses."""
    row = dict(values)
    row["train_ppl"] = _exp(row["train_loss"])
    row["val_ppl"] = _exp(row["val_loss"])
    missing = set(ROW_KEYS) - set(row)
    if missing:
        raise ValueError(f"metrics row lacks {sorted(missing)}")
    return {k: row[k] for k in ROW_KEYS}


def _exp(x: float) -> float:
    return math.inf if x > 700 else math.exp(x)  # nan stays nan; no OverflowError


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON object as a line and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether a torn last line was dropped); a bad line elsewhere is an error."""
    if not path.is_file():
        return [], False
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: a write cut short by a kill
                log.warning("%s: dropped a torn last line (a killed write)", path)
                return rows, True
            raise ValueError(
                f"{path} line {i + 1} is not JSON: {line[:60]!r}; fix or delete that line"
            ) from None
    return rows, False


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics file; [] when it does not exist. A torn last line (the run was
    killed mid-write) is left out."""
    return _read(Path(path))[0]


def truncate_rows(path: str | os.PathLike, max_step: int) -> None:
    """Keep only rows with step <= max_step (a resumed run rewrites what comes after), and
    repair a torn last line."""
    rows, torn = _read(Path(path))
    kept = [r for r in rows if r["step"] <= max_step]
    if torn or len(kept) != len(rows):
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(p)


class Progress:
    """A tqdm bar over training steps that shows the last loss and tokens/s (on stderr)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        # miniters=1: redraw every step (tqdm's dynamic miniters latch onto the slow first,
        # compiling step and then skip redraws for minutes).
        self._bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            unit="step",
            file=sys.stderr,
            miniters=1,
            dynamic_ncols=True,
        )
        self._tok_s = ""

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def show(
        self, loss: float, tokens_per_sec: float | None, compile_s: float | None = None
    ) -> None:
        """Show the last loss, tokens/s (kept from before when None) and compile seconds."""
        post = {"loss": f"{loss:.3f}"}
        if tokens_per_sec is not None:
            self._tok_s = f"{tokens_per_sec:.0f}"
        if self._tok_s:
            post["tok_s"] = self._tok_s
        if compile_s is not None:
            post["compile_s"] = f"{compile_s:.1f}"
        self._bar.set_postfix(post, refresh=False)

    def write(self, line: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self._bar.close()


# JAX's own compile-time events: tracing, lowering to MLIR, and the backend (XLA) compile (a
# persistent-cache hit included). Each comes with its (start, end) wall-clock span.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
Span = tuple[float, float]  # (start, end) in time.time() seconds


def span_seconds(spans: Sequence[Span], lo: float = -math.inf, hi: float = math.inf) -> float:
    """Seconds covered by the union of `spans`, clipped to [lo, hi] (nested and overlapping
    spans count once: a jit traced inside another's trace reports its own span)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        start, end = max(start, lo, reach), min(end, hi)
        if end > start:
            total += end - start
        reach = max(reach, end)
    return total


class PhaseTimer:
    """Wall time per phase of a run ("train", "eval", ...), with JAX compilation split out.

    Use as a context manager (it listens to JAX's compile events while open) and wrap each
    phase in `with timer.phase(name):`. Compilation on the thread that opened the timer, and
    that thread's waits for programs compiled ahead in worker threads (`add_wait`), count as
    "compile": the compilation the run waited for. Worker threads' compilation is recorded
    apart; `compile_report` says how much of all compilation overlapped other work.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._main: int | None = None
        self._spans: list[Span] = []  # the main thread's compiles and waits
        self._ahead: list[Span] = []  # worker threads' compiles
        self._programs: dict[str, list[Span]] = defaultdict(list)
        self._lock = threading.Lock()

    def __enter__(self) -> PhaseTimer:
        import jax

        self._main = threading.get_ident()
        jax.monitoring.register_event_time_span_listener(self._on_span)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax

        jax.monitoring.unregister_event_time_span_listener(self._on_span)
        self.seconds["compile"] = span_seconds(self._spans)

    def _on_span(self, event: str, start: float, end: float, **kwargs: Any) -> None:
        if event not in COMPILE_EVENTS:
            return
        with self._lock:
            main = threading.get_ident() == self._main
            (self._spans if main else self._ahead).append((start, end))
            self._programs[str(kwargs.get("fun_name", "?"))].append((start, end))
            if main:
                self.seconds["compile"] = span_seconds(self._spans)

    def add_wait(self, start: float, end: float) -> None:
        """The main thread waited from `start` to `end` (time.time()) for a program compiling in
        a worker: compilation the run waited for."""
        with self._lock:
            self._spans.append((start, end))
            self.seconds["compile"] = span_seconds(self._spans)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            with self._lock:
                waited = span_seconds(self._spans, start, end)
            self.seconds[name] += end - start - waited

    def summary(self) -> dict[str, float]:
        """{phase: seconds} plus "total", in the order the phases first ran."""
        out = {k: round(v, 3) for k, v in self.seconds.items() if v > 0 or k == "compile"}
        out["total"] = round(sum(self.seconds.values()), 3)
        return out

    def compile_report(self) -> dict[str, Any]:
        """All compilation, main thread and workers: "seconds" (wall time during which
        anything compiled), "overlapped" (of it, while the main thread did other work),
        "waited" (= the phase "compile") and "programs" ({jit name: seconds}, largest first)."""
        with self._lock:
            waited = span_seconds(self._spans)
            every = span_seconds(self._spans + self._ahead)
            programs = {k: span_seconds(v) for k, v in self._programs.items()}
        ranked = dict(sorted(programs.items(), key=lambda kv: -kv[1]))
        return {
            "seconds": round(every, 3),
            "overlapped": round(every - waited, 3),
            "waited": round(waited, 3),
            "programs": {k: round(v, 3) for k, v in ranked.items()},
        }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The book's `plot_losses`: train/val loss vs epochs, tokens seen on a top axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="Training loss")
    ax1.plot(epochs, [r["val_loss"] for r in rows], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # second x-axis: tokens seen, aligned by an invisible plot
    ax2.plot([r["tokens_seen"] for r in rows], [r["train_loss"] for r in rows], alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perplexity(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Train/val perplexity vs tokens seen, log scale."""
    plt = _pyplot()
    tokens = [r["tokens_seen"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(tokens, [r["train_ppl"] for r in rows], label="Training perplexity")
    ax.plot(tokens, [r["val_ppl"] for r in rows], linestyle="-.", label="Validation perplexity")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Perplexity")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Draw `plots/loss.png` and `plots/perplexity.png` from the run's metrics file."""
    rows = read_rows(Path(run_dir) / METRICS_FILE)
    if not rows:
        return []
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(rows, out / "loss.png")
    plot_perplexity(rows, out / "perplexity.png")
    return [out / "loss.png", out / "perplexity.png"]
