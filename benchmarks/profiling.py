"""`--profile` for the benchmarks: trace a few calls with jax.profiler and rank XLA ops by time.

The trace (an .xplane.pb that TensorBoard / XProf open) stays on disk; the ranking is read back
from it with `jax.profiler.ProfileData`, so "where the time goes" is a command, not a guess.
"""

from __future__ import annotations

import collections
import glob
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

# Events that wrap or wait for other ops, not ops themselves.
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "PjRt", "Execute", "$")


def top_ops(fn: Callable[[], None], calls: int = 2, out_dir: str | None = None, top: int = 15):
    """Run `fn` `calls` times under the profiler; return (trace dir, rows of the top ops).

    Each row: {"op", "ms_per_call", "count_per_call", "share"}; "share" is the op's fraction of
    the summed op time (ops on different threads overlap, so shares are of work, not wall).
    """
    out = Path(out_dir or tempfile.mkdtemp(prefix="jaxgpt-profile-"))
    with jax.profiler.trace(str(out)):
        for _ in range(calls):
            fn()
    [path] = glob.glob(str(out / "**" / "*.xplane.pb"), recursive=True)[-1:]
    prof = jax.profiler.ProfileData.from_file(path)
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for plane in prof.planes:
        if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if any(ev.name.startswith(w) for w in _WRAPPERS):
                    continue
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
    work = sum(total.values()) or 1
    rows = [
        {
            "op": name,
            "ms_per_call": ns / calls / 1e6,
            "count_per_call": count[name] / calls,
            "share": ns / work,
        }
        for name, ns in total.most_common(top)
    ]
    return str(out), rows


def print_ops(rows: list[dict], title: str) -> None:
    """The top-ops table, one line per op."""
    print(f"# profile: {title} (ms per call; share of summed op time)")
    for r in rows:
        ms, share, n = r["ms_per_call"], r["share"], r["count_per_call"]
        print(f"  {ms:9.1f} ms {share:6.1%}  x{n:<5g} {r['op']}")
