"""Process-wide settings a command line makes before its first JAX computation: where the
user cache lives, the persistent compilation cache and how glibc's malloc keeps freed host
memory."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

# JAX records the duration of every backend compile (or compilation-cache load) under this name.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The most free heap kept from one step to the next: glibc gives back the heap's top above
# this by itself (M_TRIM_THRESHOLD), `trim_between_steps` the rest of the heap.
RETAIN_BYTES = 2**31 - 1
_retaining = False  # reuse_host_memory() is in effect


def cache_dir(given: str | os.PathLike | None = None) -> Path:
    """`given` (with ~ expanded), else the user cache: `$XDG_CACHE_HOME/jaxgpt`, or
    `~/.cache/jaxgpt` where XDG_CACHE_HOME is unset or empty (the XDG base directory rule)."""
    if given is not None:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.cache").expanduser()
    return root / "jaxgpt"


def enable_compile_cache(cache_dir: str | Path) -> Path:
    """Keep compiled XLA programs in `cache_dir`/xla across processes (JAX's persistent cache).

    Call it before the first compilation of the process: JAX decides once whether to use
    the cache. Every program is cached, however quick its compile.
    """
    import jax

    path = Path(cache_dir).expanduser() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def reuse_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (one arena, no mmap, no trimming) from
    one train step to the next, and give it back after every XLA compile (`malloc_trim(0)`).

    XLA:CPU allocates each step's buffers afresh (the `small` step's logits alone are
    206 MB); glibc serves blocks over 32 MB with mmap and unmaps them on free, so every step
    page-faulted ~0.9 GB in again (measured: 232k faults and 0.37 s of system time per
    `small` step, 870 -> 630 ms wall). A heap kept whole also keeps what compiling used and
    the compiler's survivors scattered through it: the next step's buffers no longer fit in
    the freed space and the heap grows past it (the first gpt2 run, batch 2: 18.4 GB against
    10.4 GB from a warm compilation cache). So the heap is trimmed after each compile,
    `trim_host_memory` does it after other host work between steps (the CLI: evaluations,
    samples, checkpoints), and `trim_between_steps` bounds the free heap kept between steps.
    Process-wide and permanent; call it once, before the first JAX computation, whose worker
    threads pick their arena then. Returns False (and changes nothing) where the C library
    is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    # mallopt parameters from glibc's malloc.h; mallopt returns 1 on success.
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, RETAIN_BYTES))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return False

    import jax

    def trim_after_compile(event: str, duration: float, **_: object) -> None:
        if event == COMPILE_EVENT:  # also a persistent-cache hit: JAX times both as one
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
    global _retaining
    _retaining = True
    return True


def trim_between_steps() -> bool:
    """Under `reuse_host_memory`, between two steps: give the free heap back when more than
    RETAIN_BYTES of it is free. A step's buffers that do not fit in the holes the last one
    left (a survivor in the way) grow the heap on top of holes that stay resident (gpt2,
    batch 2, warm compilation cache: 16.8 GiB at the third step against 9.4 GiB). Small
    steps keep everything (no page faults); big ones fault their buffers in again, as
    they did when glibc trimmed the top. Returns whether it trimmed."""
    libc = _glibc() if _retaining else None
    if libc is None or not hasattr(libc, "mallinfo2"):  # mallinfo2: glibc 2.33
        return False
    if libc.mallinfo2().fordblks <= RETAIN_BYTES:
        return False
    libc.malloc_trim(0)
    return True


def trim_host_memory() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim(0)`: the top and the
    middle of the heap). Call it between steps after host work that leaves objects behind in
    the space the last step freed, so that the next step's buffers, which no longer fit
    there, do not grow the heap on top of it. A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h): fordblks is the heap's free bytes."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


@functools.cache
def _glibc() -> Any:
    """The C library through ctypes when it is glibc on Linux; else None. Looked up once
    (`find_library` runs ldconfig): `trim_between_steps` asks every step."""
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "mallinfo2"):  # declared once: `trim_between_steps` asks every step
        libc.mallinfo2.restype = _MallInfo2
    return libc
