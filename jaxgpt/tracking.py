"""Experiment tracking: the rows of `metrics.jsonl` also go to TensorBoard event files
(tensorboardX; neither TensorFlow nor torch) and to Weights & Biases. Both are optional extras.

Only process 0 writes. A resumed run continues the same TensorBoard run (events past the
restored step are purged, as `metrics.jsonl` drops its rows past it) and the same W&B run
(its id is kept in the run folder; steps W&B already holds are not logged twice).
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from jaxgpt.checkpoint import write_json_atomic
from jaxgpt.config import TrainConfig

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # inside the run folder, for a bare --tensorboard
WANDB_FILE = "wandb.json"  # the run folder's W&B run: {"id", "project", "last_step"}
# option -> (module it needs, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_installed(tc: TrainConfig) -> None:
    """Raise ValueError (one line, naming the extra) when a requested tracker's library is
    missing: before the run folder is touched."""
    for option, (module, extra) in EXTRAS.items():
        if getattr(tc, option) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(
                f"--{option} needs the {module} package, which is not installed; "
                f"pip install 'jaxgpt[{extra}]'"
            ) from None


def tensorboard_dir(run_dir: Path, tc: TrainConfig) -> Path | None:
    """Where the event files go: `tc.tensorboard`, or `RUN/tensorboard` when it is ""."""
    if tc.tensorboard is None:
        return None
    return Path(tc.tensorboard).expanduser() if tc.tensorboard else run_dir / TENSORBOARD_DIR


class Tracker(Protocol):
    def start(self, step: int, config_text: str) -> None: ...
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self, failed: bool) -> None: ...


class Trackers:
    """The run's trackers as one context manager; empty on processes other than 0."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def start(self, step: int, config_text: str) -> None:
        """The run starts (or resumes) at `step` with `config_text` (its config.json)."""
        for t in self.trackers:
            t.start(step, config_text)

    def log(self, row: dict[str, Any]) -> None:
        """One `metrics.jsonl` row: every field but "step" as a scalar at that step."""
        for t in self.trackers:
            t.log(row)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        for t in self.trackers:
            t.close(failed=kind is not None)


def open_trackers(run_dir: Path, tc: TrainConfig, config: dict[str, Any], main: bool) -> Trackers:
    """The trackers `tc` asks for. W&B starts here (before the run folder is set up, so a
    W&B that cannot start leaves no half-made run); TensorBoard at `Trackers.start`."""
    if not main:
        return Trackers([])
    trackers: list[Tracker] = []
    logdir = tensorboard_dir(run_dir, tc)
    if logdir is not None:
        trackers.append(_TensorBoard(logdir))
    if tc.wandb is not None:
        trackers.append(_WandB(run_dir, tc.wandb, config))
    return Trackers(trackers)


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step"}


class _TensorBoard:
    """Event files under `logdir`: a scalar per row field, the config as text."""

    def __init__(self, logdir: Path) -> None:
        self.logdir, self.writer = logdir, None

    def start(self, step: int, config_text: str) -> None:
        from tensorboardX import SummaryWriter

        # A resumed run writes a "session start" at the step after the restored one: readers
        # (TensorBoard, its EventAccumulator) then drop what the last run logged from there on.
        # A new file per writer; the nanosecond suffix keeps files in the order written, also
        # when two writers start within the same second (the name's own time is in seconds).
        self.writer = SummaryWriter(
            str(self.logdir),
            purge_step=step + 1 if step else None,
            filename_suffix=f".{time.time_ns():020d}",
        )
        self.writer.add_text("config", f"```json\n{config_text}\n```", global_step=step)
        self.writer.flush()

    def log(self, row: dict[str, Any]) -> None:
        for name, value in _scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))
        self.writer.flush()  # a row every eval_freq steps: cheap, and survives a kill

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB:
    """A W&B run (`WANDB_MODE`, `WANDB_ENTITY`, ... apply) with the run folder's id."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        import wandb

        self.path = run_dir / WANDB_FILE
        saved = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.id = saved.get("id") or secrets.token_hex(4)  # W&B's own ids: 8 [a-z0-9]
        self.last_step = int(saved.get("last_step", -1))
        self.project = project
        try:
            self.run = wandb.init(
                project=project, id=self.id, resume="allow", config=config, dir=str(run_dir),
                name=run_dir.name,
            )  # fmt: skip
        except Exception as e:  # W&B's own errors (no login, no network) have no common base
            raise ValueError(
                f"--wandb {project}: W&B did not start ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); run `wandb login`, or set "
                "WANDB_MODE=offline and `wandb sync` later"
            ) from e
        self._save()

    def _save(self) -> None:
        record = {"id": self.id, "project": self.project, "last_step": self.last_step}
        write_json_atomic(self.path, record)

    def start(self, step: int, config_text: str) -> None:
        self.run.config.update(json.loads(config_text), allow_val_change=True)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if step <= self.last_step:  # logged before the resume; W&B keeps steps increasing
            return
        self.run.log(_scalars(row), step=step)
        self.last_step = step
        self._save()

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
