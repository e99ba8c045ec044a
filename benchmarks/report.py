"""The results tables of the docs, generated from `benchmarks/results/*.json`, so a figure is
never retyped. Each table opens with the machine it was measured on (CPU model, vector
extensions, cores), the versions and the date, as the result file records them ("not
recorded" where it does not).

A page holds a table between `<!-- begin report:NAME -->` and `<!-- end report:NAME -->`;
the prose around it stays hand-written.

    python benchmarks/report.py           # rewrite the tables in README.md and docs/*.md
    python benchmarks/report.py --check   # exit 1 if a table differs from its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOT_RECORDED = "not recorded"
BLOCK = re.compile(
    r"(<!-- begin report:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end report:(?P=name) -->)",
    re.DOTALL,
)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold tables: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text(encoding="utf-8"))


def _loads(m: dict[str, Any], d: dict[str, Any]) -> str:
    """The 1-minute load averages the file records, first to last, or "not recorded"."""
    keys = ("loadavg_start", "loadavg_before", "loadavg", "loadavg_end", "loadavg_after")
    sources = [m] if m is d else [m, d]
    values = [src[k][0] for k in keys for src in sources if k in src]
    return " -> ".join(f"{v:.1f}" for v in values) if values else NOT_RECORDED


def machine(d: dict[str, Any], source: str) -> str:
    """One line: machine, versions, date and load of a result file, and the file itself."""
    m = d.get("machine", d)
    ext = m.get("vector_extensions")
    ext_text = NOT_RECORDED if ext is None else (", ".join(ext) or "none of AVX2/AVX-512/AMX")
    cores = m.get("cores")
    versions = m.get("versions")
    if versions:
        ver = ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
    else:
        ver = NOT_RECORDED
    return (
        f"Machine: {m.get('cpu') or NOT_RECORDED}, "
        f"{NOT_RECORDED if cores is None else cores} cores, vector extensions: {ext_text}; "
        f"JAX device: {m.get('jax_device') or NOT_RECORDED}. Versions: {ver}. "
        f"Date: {m.get('date') or NOT_RECORDED}. Load average (1 min): {_loads(m, d)}. "
        f"Source: `benchmarks/results/{source}`."
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _section(d: dict[str, Any], source: str, tables: list[str], note: str = "") -> str:
    """The machine line, the tables, then a note: one report block's text."""
    return "\n\n".join([machine(d, source), *tables, *([note] if note else [])])


def _ms(s: float) -> str:
    return f"{1000 * s:.0f}"


def _step(r: dict[str, Any]) -> str:
    """median (min-max) milliseconds of a train-step result."""
    return f"{_ms(r['step_s_median'])} ms ({_ms(r['step_s_min'])}-{_ms(r['step_s_max'])})"


def train_step(results: Path, name: str = "train_step.json") -> str:
    """bench_train_step.py: jaxgpt's step against the book's PyTorch step, same process."""
    d = _load(results, name)
    rows = []
    for c in d["configs"]:
        by = {r["framework"]: r for r in c["results"]}
        jx, book, fused = by["jaxgpt"], by["torch-book"], by["torch-fused-adamw"]
        vs = c["speedup_vs"]
        rows.append([
            f"`{c['config']}`, {c['batch_size']} x {c['seq']}",
            f"{_step(jx)}, {jx['tokens_per_s']:.0f} tok/s",
            _step(book),
            _step(fused),
            f"{vs['torch-book']:.2f}x / {vs['torch-fused-adamw']:.2f}x",
            f"{100 * jx['mfu_nanogpt']:.1f}% / {100 * book['mfu_nanogpt']:.1f}%",
            f"{jx['compile_s']:.1f} s",
        ])  # fmt: skip
    header = ["config", "jaxgpt", "book's PyTorch", "PyTorch, fused AdamW",
              "jaxgpt vs book / vs fused", "MFU jaxgpt / book", "jaxgpt compile"]  # fmt: skip
    peak = d["peak"]
    note = (
        f"Median (min-max) of {d['repeats']} timed steps each, alternating in one process; "
        f"host malloc: {d['host_malloc']}; peak RSS {d['max_rss_mib'] / 1024:.1f} GiB. MFU: "
        f"nanoGPT convention against the {peak['source']} ({peak['flops'] / 1e9:.0f} GFLOP/s; "
        f"PyTorch's: {peak['torch_flops'] / 1e9:.0f})."
    )
    return _section(d, name, [_table(header, rows)], note)


def train_step_system_malloc(results: Path) -> str:
    return train_step(results, "train_step_system_malloc.json")


_PHASES = [("startup", "start-up"), ("setup", "setup"), ("compile", "compile"),
           ("train", "training steps"), ("eval", "evaluation"), ("sample", "sampling"),
           ("checkpoint", "checkpoint"), ("plots", "plots")]  # fmt: skip


def book_run(results: Path) -> str:
    """book_curve.py: the book's chapter-5 run, wall seconds per phase, each in a process."""
    d = _load(results, "book_curve.json")
    sides = [("torch_book", "book's PyTorch code"), ("jaxgpt", "jaxgpt, empty compile cache"),
             ("jaxgpt_warm_cache", "jaxgpt, warm compile cache")]  # fmt: skip
    book_total = d["torch_book"].get("process_wall_s", d["torch_book"]["wall_s"])
    rows = []
    for key, label in sides:
        side = d[key]
        total = side.get("process_wall_s", side["wall_s"])
        times = [f"{side['times'][k]:.1f}" if k in side["times"] else "-" for k, _ in _PHASES]
        rows.append([label, f"{total:.1f}", f"{book_total / total:.2f}x", *times])
    header = ["", "total (process wall)", "speed vs book", *[label for _, label in _PHASES]]
    s = d["settings"]
    note = (
        f"Seconds. Settings: batch {s['batch_size']}, lr {s['lr']}, weight decay "
        f"{s['weight_decay']}, {s['epochs']} epochs, eval every {s['eval_freq']} steps over "
        f"{s['eval_iter']} batches, seed {s['seed']}."
    )
    return _section(d, "book_curve.json", [_table(header, rows)], note)


def book_curve(results: Path) -> str:
    """book_curve.py: every evaluation of the book's PyTorch code and of jaxgpt, same run."""
    d = _load(results, "book_curve.json")
    jx = {(e["epoch"], e["step"]): e for e in d["jaxgpt"]["evals"]}
    rows = []
    for e in d["torch_book"]["evals"]:
        j = jx.get((e["epoch"], e["step"]))
        ours = "-" if j is None else f"{j['train']:.3f} / {j['val']:.3f}"
        rows.append([str(e["step"]), str(e["epoch"]), f"{e['train']:.3f} / {e['val']:.3f}", ours])
    header = ["step", "epoch", "book's PyTorch code: train / val", "jaxgpt: train / val"]
    return _section(d, "book_curve.json", [_table(header, rows)])


def sampling(results: Path) -> str:
    """bench_sampling.py: greedy decoding against transformers' cached generate, same run."""
    d = _load(results, "sampling.json")
    rows = []
    for r in d["results"]:
        paired = ", ".join(f"{x:.2f}x" for x in r["jaxgpt_over_transformers_paired"]["all"])
        floor = r.get("jaxgpt_fraction_of_bandwidth_floor")
        rows.append([
            str(r["batch"]),
            f"{r['jaxgpt']['tokens_per_s']:.1f}",
            f"{r['transformers']['tokens_per_s']:.1f}",
            f"{r['jaxgpt_over_transformers']:.2f}x",
            paired,
            "-" if floor is None else f"{100 * floor:.0f}%",
            f"{r['jaxgpt']['first_call_s']:.1f} s ({r['jaxgpt_compile_s']:.1f} s)",
        ])  # fmt: skip
    header = ["batch", "jaxgpt tokens/s", "transformers tokens/s", "vs transformers",
              "paired repeats", "of the bandwidth floor",
              "jaxgpt first call (compile)"]  # fmt: skip
    r0 = d["results"][0]
    note = (
        f"`{r0['model']}`, {d['params'] / 1e6:.1f}M parameters, {r0['new_tokens']} new greedy "
        f"tokens. Bandwidth floor: every weight read once per token at the measured read "
        f"bandwidth ({d['bandwidth_gb_s']['read']:.1f} GB/s): "
        f"{d['bandwidth_floor_tokens_per_s']:.1f} tokens/s at batch 1."
    )
    return _section(d, "sampling.json", [_table(header, rows)], note)


def prepare(results: Path) -> str:
    """bench_prepare.py: scripts/prepare_data.py against plain single-threaded tiktoken."""
    d = _load(results, "prepare.json")
    row = [
        f"{d['corpus_mb']} MB, {d['files']} files", f"{d['tokens'] / 1e6:.2f} M",
        str(d["workers"]), f"{d['tiktoken_tokens_per_sec'] / 1e6:.2f} M",
        f"{d['prepare_tokens_per_sec'] / 1e6:.2f} M", f"{d['speedup']:.2f}x",
    ]  # fmt: skip
    header = ["corpus", "tokens", "workers", "tiktoken tokens/s", "prepare_data tokens/s",
              "speedup"]  # fmt: skip
    note = f"Best of {d['repeats']} repeats each, alternating; pool start-up and writes included."
    return _section(d, "prepare.json", [_table(header, [row])], note)


def _mesh(results: Path, name: str) -> str:
    d = _load(results, name)
    rows = []
    label = lambda m: "unsharded step" if m == "None" else f"`--mesh {m}`"  # noqa: E731
    for r in d["runs"]:
        a, *others = r["compare"]
        ratios = r.get("ratios_median", {others[0]: r["ratio_median"]})
        for b in others:
            ra, rb = r["results"][a], r["results"][b]
            rows.append([
                str(r["devices"]) + (" (simulated)" if r["devices"] > 1 else ""),
                f"{label(a)} vs {label(b)}",
                f"{ra['median_s']:.3f} vs {rb['median_s']:.3f}",
                f"{ratios[b]:.2f}",
            ])  # fmt: skip
    header = ["devices", "compared", "median s/step", "ratio"]
    note = (
        f"`{d['model']}`, batch {d['batch_size']}; median of {d['repeats']} repeats of "
        f"{d['steps']} steps, alternating."
    )
    return _section(d, name, [_table(header, rows)], note)


def mesh(results: Path) -> str:
    """bench_mesh.py under load (the shared machine)."""
    return _mesh(results, "mesh.json")


def mesh_quiet(results: Path) -> str:
    """bench_mesh.py on the quiet machine."""
    return _mesh(results, "mesh_quiet.json")


def accel_cpu(results: Path) -> str:
    """accel_cpu.py: compile time and XLA's memory analysis of the train step, by switch."""
    d = _load(results, "accel_cpu.json")
    compiles = [r for r in d["results"] if r["what"] == "compile_time"]
    memory = [r for r in d["results"] if r["what"] == "step_memory"]
    compile_rows = [
        [f"`{r['model']}`", "scanned" if r["scan_layers"] else "unrolled", str(r["batch"]),
         f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", f"{r['total_s']:.1f}"]
        for r in compiles
    ]  # fmt: skip
    memory_rows = [
        [f"`{r['model']}`", r["dtype"], f"{r['batch']} x {r['seq']}",
         "scanned" if r["scan_layers"] else "unrolled", r["remat"], f"{r['temp_mib']:.0f}",
         f"{r['argument_mib']:.0f}"]
        for r in memory
    ]  # fmt: skip
    return _section(d, "accel_cpu.json", [
        _table(["model", "layers", "batch", "lower s", "compile s", "total s"], compile_rows),
        _table(["model", "dtype", "batch x seq", "layers", "remat", "temporaries MiB",
                "arguments MiB"], memory_rows),
    ])  # fmt: skip


def startup(results: Path) -> str:
    """bench_startup.py: each run's wall seconds per phase, before and after compiling ahead,
    with an empty and a warm compilation cache, each run in its own process."""
    d = _load(results, "startup.json")
    rows = []
    for name, by in d["runs"].items():
        for label, runs in by.items():
            for cache, r in runs.items() if isinstance(runs, dict) else ():
                rows.append([name, label, cache, *_startup_cells(r)])
    header = ["run", "tree", "cache", "wall", *[label for _, label in _PHASES],
              "compilation (overlapped)", "compile in steps", "vs book's code", "load"]  # fmt: skip
    m = d["machine"]
    trees = "; ".join(f"{k}: {m[k]}" for k in ("before", "after") if k in m)
    note = (
        "Seconds; wall is the whole process (start-up: interpreter, imports, flags). Compile "
        "in steps: the compile phase (what the run waited for) over the median steady step "
        f"of the after tree's runs. {trees}. Same printed losses before and after: "
        + ", ".join(f"{n} {by.get('same_losses', NOT_RECORDED)}" for n, by in d["runs"].items())
        + "."
    )
    return _section(d, "startup.json", [_table(header, rows)], note)


def _startup_cells(r: dict[str, Any]) -> list[str]:
    times = {"startup": r.get("startup_s"), **r["times"]}
    comp = r.get("compilation")
    return [
        f"{r['wall_s']:.1f}",
        *(f"{times[k]:.1f}" if times.get(k) is not None else "-" for k, _ in _PHASES),
        f"{comp['seconds']:.1f} ({comp['overlapped']:.1f})" if comp else "-",
        f"{r['compile_in_steps']:.1f}" if "compile_in_steps" in r else "-",
        f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "-",
        f"{r['loadavg'][0]:.1f}",
    ]


def scan_line(results: Path) -> str:
    """accel_cpu.py --scan-line: the train step unrolled and scanned, by depth."""
    d = _load(results, "scan_line.json")
    by = {(r["n_layers"], r["scan_layers"]): r for r in d["results"] if r["what"] == "scan_line"}
    rows = []
    for n in sorted({n for n, _ in by}):
        u, s = by[(n, False)], by[(n, True)]
        rows.append([str(n), f"{u['compile_s']:.1f} / {s['compile_s']:.1f}",
                     f"{_ms(u['step_s'])} / {_ms(s['step_s'])}",
                     f"{s['step_s'] / u['step_s']:.2f}"])  # fmt: skip
    r = next(iter(by.values()))
    header = ["layers", "compile s, unrolled / scanned", "step ms, unrolled / scanned",
              "scanned step / unrolled"]  # fmt: skip
    note = (f"`{r['model']}`'s width, batch {r['batch']} x {r['seq']}, float32; median of "
            f"{r.get('steps', 3)} steps, the two programs taking turns.")  # fmt: skip
    return _section(d, "scan_line.json", [_table(header, rows)], note)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def plan(results: Path) -> str:
    """bench_plan.py: the planner's per-device memory of big models on simulated devices."""
    d = _load(results, "plan.json")
    rows = []
    for r in d["plans"]:
        b = r["per_device_bytes"]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        rows.append([
            f"`{r['model']}`", f"`{mesh}`", _gib(b["params"]), _gib(b["opt_state"]),
            _gib(b["arguments"]), _gib(b["temporaries"]), _gib(b["peak"]),
            f"{r['peak_over_first']:.0%}",
        ])  # fmt: skip
    header = ["model", "mesh", "params GiB", "optimizer GiB", "arguments GiB",
              "temporaries GiB", "peak GiB", "peak vs data"]  # fmt: skip
    flags = " ".join(d["plans"][0]["flags"])
    note = (
        f"Per device, `{flags}`, batch {d['batch_size']} x 1024, {d['devices']} simulated CPU "
        "devices; XLA's memory analysis of one device's train step (peak = arguments + "
        "temporaries + outputs not aliased to an argument)."
    )
    return _section(d, "plan.json", [_table(header, rows)], note)


def host_memory(results: Path) -> str:
    """bench_memory.py: peak RSS of jaxgpt's first run and the book's PyTorch step."""
    d = _load(results, "memory.json")
    what = {
        "default": "jaxgpt `train.py`, first run (empty compilation cache)",
        "warm": "jaxgpt `train.py` again, from the first run's compilation cache",
        "no-reuse": "jaxgpt `train.py --no-reuse-host-memory`, first run",
        "torch": "the book's PyTorch step (`GPTModel` + AdamW)",
    }
    rows = [
        [what[k], f"{v:.2f}", f"{d['ratio_to_torch'][k]:.2f}",
         f"{d['rss_over_plan_peak'][k]:.2f}" if k in d["rss_over_plan_peak"] else "-"]
        for k, v in d["peak_rss_gib"].items()
    ]  # fmt: skip
    header = ["process", "peak RSS GiB", "vs PyTorch", "vs the plan's peak"]
    note = (
        f"`{d['model']}`, batch {d['batch_size']} x 1024, {d['steps']} steps, each in a fresh "
        f"process, one at a time. The planner's one-device peak: {d['plan_peak_gib']:.2f} GiB."
    )
    return _section(d, "memory.json", [_table(header, rows)], note)


def headline(results: Path) -> str:
    """The README's few figures, each with its machine and a link to its full table."""
    step = {c["config"]: c for c in _load(results, "train_step.json")["configs"]}
    samp = {r["batch"]: r for r in _load(results, "sampling.json")["results"]}
    prep = _load(results, "prepare.json")
    book = _load(results, "book_curve.json")
    cpu = lambda d: f"{d.get('machine', d)['cpu']}, {d.get('machine', d)['cores']} cores"  # noqa: E731
    rows = [
        ["train step vs the book's PyTorch step, `small` / `book-124m`",
         f"{step['small']['speedup_vs']['torch-book']:.2f}x / "
         f"{step['book-124m']['speedup_vs']['torch-book']:.2f}x",
         cpu(_load(results, "train_step.json")), "[table](docs/performance.md#train-step)"],
        ["the book's whole chapter-5 run, wall time vs the book's code (warm compile cache)",
         f"{book['torch_book']['process_wall_s'] / book['jaxgpt_warm_cache']['wall_s']:.2f}x",
         cpu(book), "[table](docs/performance.md#the-books-run)"],
        ["`gpt2` greedy decoding vs `transformers`, batch 1 / 8",
         f"{samp[1]['jaxgpt_over_transformers']:.2f}x / "
         f"{samp[8]['jaxgpt_over_transformers']:.2f}x",
         cpu(_load(results, "sampling.json")), "[table](docs/performance.md#sampling)"],
        ["corpus preparation vs single-threaded tiktoken", f"{prep['speedup']:.2f}x", cpu(prep),
         "[table](docs/performance.md#data-preparation)"],
    ]  # fmt: skip
    return _table(["what", "speed", "machine", "details"], rows)


BLOCKS: dict[str, Callable[[Path], str]] = {
    "headline": headline,
    "train-step": train_step,
    "train-step-system-malloc": train_step_system_malloc,
    "book-run": book_run,
    "book-curve": book_curve,
    "sampling": sampling,
    "prepare": prepare,
    "mesh-quiet": mesh_quiet,
    "mesh": mesh,
    "accel-cpu": accel_cpu,
    "startup": startup,
    "scan-line": scan_line,
    "plan": plan,
    "host-memory": host_memory,
    "mesh-fsdp": lambda results: _mesh(results, "mesh_fsdp.json"),
}


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every report block regenerated from the JSON in `results`."""

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise ValueError(f"unknown report block {name!r}; known: {sorted(BLOCKS)}")
        return f"{m.group(1)}{BLOCKS[name](results)}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 on a difference")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new, encoding="utf-8")
    verb = "differ from benchmarks/results" if args.check else "rewritten"
    for page in stale:
        print(f"{page}: tables {verb}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
