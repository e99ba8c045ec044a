"""What keeps a training run safe on a real machine: a run-folder lock, a disk-space check,
stop signals handled between steps, and the errors `fit` stops with (scripts map them to
exit codes)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

LOCK_FILE = ".lock"
# Exit status of a process whose run lost another process (EX_TEMPFAIL in sysexits.h: the
# run can go on once every process is restarted with --resume).
PEER_LOST_EXIT = 75
# Exit statuses the shells use for "killed by signal N": 128 + N.
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradients past `skip_nonfinite`; nothing saved."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None) -> None:
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        what = "gradients" if loss == loss and abs(loss) != float("inf") else "loss"
        last = last_checkpoint or "none yet"
        super().__init__(
            f"non-finite {what} at step {step} (loss {loss}); stopped without saving it; "
            f"last good checkpoint: {last}; resume it with a lower --lr, --grad-clip, or "
            "--skip-nonfinite N"
        )


class TrainingInterrupted(Exception):  # noqa: N818 (a stop, not an error)
    """A stop signal arrived; the state after the current step is saved in `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint: str, run_dir: str) -> None:
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        super().__init__(f"{SIGNAL_NAMES.get(signum, signum)} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SaveAborted(BaseException):  # noqa: N818 (BaseException: no `except Exception` eats it)
    """A second stop signal arrived while the first was being handled (e.g. during the save)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"second {SIGNAL_NAMES.get(signum, signum)}: stopped at once")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, folder unwritable); older ones are kept."""


class StopSignals:
    """Turn SIGTERM/SIGINT into a flag the fit loop checks between steps; a second signal
    raises `SaveAborted` at once. Installed only in the main thread (Python's rule).

    `agreed`: the processes of a multi-process run must stop after the same step, so SIGTERM
    is left to JAX's preemption notifier, which agrees on the step across processes
    (`multihost_utils.reached_preemption_sync_point`), and SIGINT is passed on to it as
    SIGTERM.
    """

    def __init__(self, agreed: bool = False) -> None:
        self.signum: int | None = None
        self.agreed = agreed
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise SaveAborted(signum)
        self.signum = signum

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> int | None:
        """The signal to stop for after `step` (call it after every step), or None."""
        if not self.agreed:
            return self.signum
        from jax.experimental import multihost_utils

        if not multihost_utils.reached_preemption_sync_point(step):
            return None
        return self.signum or signal.SIGTERM  # SIGTERM: the notice came from another process

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            if self.agreed:
                self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
                return self
            for sig in SIGNAL_NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class RunLock:
    """An exclusive `flock` on `run_dir/.lock` for the run's lifetime.

    The kernel drops the lock when the process ends in any way (SIGKILL included), so a
    lock left by a killed run is simply free again; the file itself stays.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this lock created (removed again if left empty)

    def __enter__(self) -> RunLock:
        try:
            missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = missing
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(
                f"run folder {str(self.path.parent)!r} is not writable ({e.strerror}); "
                "choose another --out"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(
                f"run folder {str(self.path.parent)!r} is in use by another run (pid {holder}); "
                "wait for it to end or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        # A run that failed before writing anything leaves no trace: not even its folder.
        if self._made and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            for p in self._made:  # deepest first
                p.rmdir()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def check_free_space(run_dir: str | os.PathLike, checkpoint_bytes: int, keep: int) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint of `checkpoint_bytes`.

    Raises:
      ValueError: naming the free and needed space and the folder.
    """
    where = Path(run_dir).absolute()
    while not where.exists():  # the run folder may not exist yet: measure where it will be
        where = where.parent
    free = shutil.disk_usage(where).free
    need = int(checkpoint_bytes * 1.1) + (1 << 20)  # + Orbax metadata and headroom
    if free < need:
        raise ValueError(
            f"only {free / 2**20:.0f} MiB free under {str(run_dir)!r} but one checkpoint "
            f"needs ~{need / 2**20:.0f} MiB ({keep} are kept); free space or choose another --out"
        )


def _count(value: str | None) -> int:
    """A peer's beat counter as read from the store (-1: none yet)."""
    return -1 if value is None else int(value)


class PeerWatch:
    """Notice that another process of a multi-process run is gone, within `timeout` seconds.

    Each process bumps its own counter in JAX's coordination key-value store (hosted by
    process 0) every `interval` seconds. A peer whose counter stands still for `timeout`
    seconds, or a store that does not answer for that long (process 0 is gone), is lost:
    `on_lost(what, why)` is called once, from the watch's own thread. It must end the
    process: the main thread may be blocked in a collective that can never finish.
    The I/O and the verdict live in two threads, so a store call that hangs (a frozen
    process 0) still ends in a verdict. A block that fails with one of `waits_on` (the
    errors a collective raises when its peer vanishes) waits for the verdict on leaving,
    unless every peer is seen alive after the failure.
    """

    PREFIX = "jaxgpt/alive/"

    def __init__(
        self,
        client: Any,
        process_id: int,
        num_processes: int,
        timeout: float,
        on_lost: Callable[[str, str], None],
        interval: float = 1.0,
        waits_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._client, self._id, self.timeout = client, process_id, timeout
        self._on_lost, self._interval, self._waits_on = on_lost, interval, waits_on
        now = time.monotonic()
        self._seen = {p: (None, now) for p in range(num_processes) if p != process_id}
        self._answered = now  # the last time the store answered
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._verdict = threading.Event()

    def __enter__(self) -> PeerWatch:
        for target in (self._beat, self._judge):
            threading.Thread(target=target, daemon=True, name=f"PeerWatch{target.__name__}").start()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, self._waits_on):
            self._wait_unless_all_beat(time.monotonic())  # on a verdict, on_lost ends us
        self._stop.set()

    def _wait_unless_all_beat(self, since: float) -> None:
        """Wait for a verdict until every peer has beaten twice after `since` (the failure
        was this process's own: return after about two intervals), or a timeout. Once is no
        proof: a peer's last beat before it died may be read just after the failure."""
        with self._lock:
            then = {p: _count(value) for p, (value, _) in self._seen.items()}
        deadline = since + self.timeout + 3 * self._interval
        while not self._verdict.wait(self._interval / 2) and time.monotonic() < deadline:
            with self._lock:
                if all(_count(v) >= then[p] + 2 for p, (v, _) in self._seen.items()):
                    return

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for a verdict; True when a process was found lost (and
        `on_lost` has returned)."""
        return self._verdict.wait(seconds)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self._client.key_value_set(f"{self.PREFIX}{self._id}", str(count), True)
                values = dict(self._client.key_value_dir_get(self.PREFIX))
            except Exception:  # the store does not answer: judged by its silence
                values = None
            now = time.monotonic()
            with self._lock:
                if values is not None:
                    self._answered = now
                    for p, (old, _) in self._seen.items():
                        new = values.get(f"{self.PREFIX}{p}")
                        if new is not None and new != old:  # a vanished key: no sign of life
                            self._seen[p] = (new, now)
            self._stop.wait(self._interval)

    def _judge(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                silent = now - self._answered
                # A peer's silence is measured only up to the store's last answer: a store
                # that stops answering is the coordinator's loss, not every peer's.
                stale = [p for p, (_, t) in self._seen.items() if self._answered - t > self.timeout]
            if silent > self.timeout:
                what = "process 0 (the coordinator)"
                why = f"its key-value store has not answered for {silent:.0f} s"
            elif stale:
                what = "process " + ", ".join(map(str, stale))
                why = f"no sign of life for over {self.timeout:g} s"
            else:
                continue
            if self._stop.is_set():  # the run ended meanwhile
                return
            self._on_lost(what, why)  # usually ends the process
            self._verdict.set()
            return
