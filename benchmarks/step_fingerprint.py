"""Is the compiled train step the same program as another tree's? A fingerprint of XLA's
optimized HLO of `small` (one device and `--mesh data=2`) and `book-124m` (one device), with
what names the source (file paths, function names, line numbers) left out.

Two trees that print the same fingerprints compile to the same program, instruction for
instruction, so their step times can only differ by noise. Run it once per tree, this file
either way, with the tree to test first on the path:

    PYTHONPATH=. python benchmarks/step_fingerprint.py
    git worktree add /tmp/base main && PYTHONPATH=/tmp/base python benchmarks/step_fingerprint.py
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402

import jaxgpt  # noqa: E402
from jaxgpt.config import TrainConfig, get_preset  # noqa: E402
from jaxgpt.optim import make_optimizer  # noqa: E402
from jaxgpt.step import mesh_train_step  # noqa: E402

# (preset, batch, seq, mesh); mesh None: the unsharded one-device step
CASES = (("small", 8, 128, None), ("small", 8, 128, "data=2"), ("book-124m", 2, 256, None))
METADATA = re.compile(r",? ?metadata=\{[^}]*\}")
# XLA prints the source's stack frames (FileNames ... StackFrames) before the computations.
FRAMES = re.compile(r"\nFileNames\n.*?\n(?=%|ENTRY)", re.DOTALL)


def program(preset: str, batch: int, seq: int, mesh: str | None) -> str:
    """The optimized HLO text of the train step, without source locations."""
    cfg = get_preset(preset)
    tx = make_optimizer(TrainConfig(lr=4e-4, weight_decay=0.1), total_steps=1000)
    state, step, put = mesh_train_step(cfg, tx, jax.random.key(0), mesh)
    batch_xy = tuple(put((np.zeros((batch, seq), np.int32),) * 2))
    text = step.lower(state, batch_xy).compile().as_text()
    return METADATA.sub("", FRAMES.sub("\n", text, count=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--save", help="a folder to write each program's text into (to diff them)")
    args = p.parse_args()
    print(f"jaxgpt from {Path(jaxgpt.__file__).parent}")
    for preset, batch, seq, mesh in CASES:
        text = program(preset, batch, seq, mesh)
        tag = f"{preset}-{batch}x{seq}-{mesh or 'one-device'}"
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"{tag}.hlo").write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        print(f"{tag:32} {digest}  ({len(text.splitlines())} lines)", flush=True)


if __name__ == "__main__":
    main()
