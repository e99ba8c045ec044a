"""Train a GPT on a text corpus, as chapter 5 of the book does: `python scripts/train.py --help`.

With no arguments: a small GPT on the Python reference docs (offline, a few minutes on a
laptop CPU). The book's run: `--model book-124m --data the-verdict --epochs 10
--batch-size 2 --lr 4e-4 --eval-freq 5 --eval-iter 5`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from jaxgpt.checkpoint import CONFIG_FILE, load_run_config
from jaxgpt.cli import Parser
from jaxgpt.config import ATTENTIONS, PRESETS, REMATS, GPTConfig, TrainConfig, get_preset
from jaxgpt.host import cache_dir, enable_compile_cache, reuse_host_memory, trim_host_memory
from jaxgpt.runguard import CheckpointWriteError, NonFiniteError, SaveAborted, TrainingInterrupted
from jaxgpt.train import fit

DEFAULT_MODEL = "small"
# fit's events after host work that leaves objects in the heap a step freed (jaxgpt.host).
HOST_WORK_EVENTS = ("untrained", "eval", "sample", "checkpoint")
# flag -> GPTConfig field; None keeps the preset's value.
MODEL_FLAGS = {
    "context_length": "context length (tokens per window)",
    "emb_dim": "embedding width",
    "n_layers": "number of transformer blocks",
    "n_heads": "attention heads (must divide --emb-dim)",
    "drop_rate": "dropout rate",
    "vocab_pad": "pad the embedding and head to a multiple of this many tokens (64: 50257 -> "
    "50304); padded logits are masked out of the loss and the sampler",
}
# Accelerator switches (GPTConfig fields; None keeps the preset's value): flag -> (choices, help).
ACCEL_FLAGS = {
    "dtype": (
        ("float32", "bfloat16"),
        "activations and matmul inputs; bfloat16 is mixed precision: params, optimizer state, "
        "LayerNorm, softmax and the loss stay float32 (default: float32, the book)",
    ),
    "attention": (
        ATTENTIONS,
        "attention: book (masked softmax, the reference), xla or cudnn "
        "(jax.nn.dot_product_attention; no dropout on attention weights), auto (book while "
        "dropout is on, else cudnn where the program is compiled for a CUDA GPU and cuDNN's "
        "rules hold: 16-bit, head_dim <= 128 and a multiple of 8; else xla) (default: book)",
    ),
    "remat": (
        REMATS,
        "recompute each block in the backward pass: block (keep only its input) or dots "
        "(keep matmul outputs) (default: none)",
    ),
}
TRAIN_HELP = {
    "data": 'corpus: "pydoc" (Python docs, offline), "the-verdict" (the book\'s, downloaded '
    "once), a text file, a folder of .txt files, a .bin uint16 token file, or a folder "
    "written by scripts/prepare_data.py",
    "train_ratio": "fraction of the text used for training (the book: 0.9)",
    "stride": "window step in tokens (default: the context length, as the book)",
    "batch_size": "windows per batch",
    "epochs": "passes over the training split",
    "max_steps": "stop after this many optimizer steps in total",
    "lr": "peak AdamW learning rate",
    "b1": "AdamW beta1",
    "b2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "weight_decay": "AdamW decoupled weight decay",
    "decay_mask": "do not decay biases, norm scale/shift and embeddings",
    "warmup_steps": "linear warmup steps from lr 0",
    "min_lr": "cosine-decay the lr to this floor after warmup (default: constant lr)",
    "grad_clip": "clip gradients to this global norm (default: no clipping, as the book)",
    "eval_freq": "evaluate every this many steps",
    "eval_iter": "batches per evaluation, on each split",
    "start_context": "prompt of the greedy sample printed after each epoch; None: the book's "
    '"Every effort moves you", or \'The "for" statement\' for pydoc',
    "sample_tokens": "tokens generated for each sample",
    "seed": "seed of initialisation, dropout and shuffling",
    "out": "run folder for config.json, metrics.jsonl, checkpoints/ and plots/",
    "checkpoint_every": "save a checkpoint every this many steps (and at the end)",
    "keep": "checkpoints to keep (the newest)",
    "cache_dir": "where downloaded corpora and compiled programs are cached; None: "
    "$XDG_CACHE_HOME/jaxgpt, else ~/.cache/jaxgpt",
    "data_url": "base URL to download the-verdict.txt from",
    "compile_cache": "keep compiled programs in CACHE_DIR/xla so the next run does not compile "
    "again",
    "compile_ahead": "compile the run's programs in worker threads while the model initialises "
    "and evaluates (same programs, same results; off: each compiles when first used)",
    "reuse_host_memory": "keep freed host memory for reuse (glibc malloc: one arena, no mmap, "
    "no trimming), so each step does not page-fault its buffers in again",
    "prng_impl": "JAX PRNG for init, dropout and sampling: threefry2x32, rbg or unsafe_rbg",
    "grad_accum": "average the gradients of this many micro-batches of batch-size/K rows per "
    "update, in one compiled step",
    "mesh": "device mesh, e.g. data=8 or data=2,fsdp=4 (fsdp also shards parameters and "
    "optimizer state); default: every device on data; a resumed run may change it",
    "sampling": 'training windows: "sequential" (the book\'s, shuffled each epoch) or '
    '"random" offsets (for corpora too large for epochs)',
    "heartbeat_timeout": "several processes: seconds without a heartbeat before JAX takes a "
    "process for dead; the others stop with exit status 75 after a quarter of it",
    "skip_nonfinite": "skip up to N steps in a row whose loss or gradients are nan/inf "
    "(params stay unchanged), then stop; 0 stops at the first",
    "init_from": "start from pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
    "(downloaded once into CACHE_DIR/openai), an OpenAI or Hugging Face folder, a .safetensors "
    "or the book's .pth file, a jaxgpt run folder or .npz; the model's shape comes from them "
    "(--context-length may shorten it); optimizer fresh, step 0",
    "trainable": "train only the parameters whose path matches this regex whole, e.g. "
    "'(trf_blocks_11|final_norm|out_head)/.*'; the others stay frozen and get no optimizer "
    "state (paths: see docs/finetuning.md)",
    "tensorboard": "also write metrics.jsonl's rows as TensorBoard scalars (and the config as "
    "text) into DIR; without DIR: tensorboard/ in the run folder (pip install "
    "'jaxgpt[tensorboard]')",
    "wandb": "also log metrics.jsonl's rows to this Weights & Biases project (config.json as "
    "the run's config; WANDB_MODE=offline works offline) (pip install 'jaxgpt[wandb]')",
}
# Tracking flags take their own argparse shape; the help says what happens without them.
TRACKING_ARGS = {
    "tensorboard": {"nargs": "?", "const": "", "metavar": "DIR"},
    "wandb": {"metavar": "PROJECT"},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> Any:
    kind = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": bool}[kind]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"model preset, one of {sorted(PRESETS)} (default: small)")
    for name, text in MODEL_FLAGS.items():
        kind = float if name == "drop_rate" else int
        p.add_argument(_flag(name), type=kind, help=f"{text} (default: the preset's)")
    for name, (choices, text) in ACCEL_FLAGS.items():
        p.add_argument(_flag(name), choices=choices, help=text)
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the blocks as one nn.scan over stacked params (compile time independent of "
        "depth; checkpoints stay in the unrolled layout)",
    )
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        if kind is bool and f.default:
            p.add_argument(
                "--no-" + _flag(f.name)[2:],
                dest=f.name,
                action="store_false",
                help=f"do not {TRAIN_HELP[f.name]} (default: on)",
            )
        elif kind is bool:
            p.add_argument(_flag(f.name), action="store_true", help=TRAIN_HELP[f.name])
        elif f.name in TRACKING_ARGS:
            extra = TRACKING_ARGS[f.name]
            p.add_argument(_flag(f.name), default=None, help=TRAIN_HELP[f.name], **extra)
        else:
            text = f"{TRAIN_HELP[f.name]} (default: {f.default})"
            p.add_argument(_flag(f.name), type=kind, default=f.default, help=text)
    dist = p.add_argument_group(
        "several processes (hosts)",
        "start JAX's distributed runtime first; without these flags JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID or Slurm / Open MPI / TPU detection apply",
    )
    dist.add_argument("--coordinator", help="HOST:PORT of process 0")
    dist.add_argument("--num-processes", type=int, help="processes in the run")
    dist.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="initialise from the environment (JAX_* variables, Slurm, Open MPI, TPU)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint, with its saved settings "
        "(flags given here override those that may change, e.g. --epochs)",
    )
    plan = p.add_argument_group(
        "planning",
        "compile the training step for these settings on the devices present and print what "
        "each device holds; reads no data and writes no run folder (with XLA_FLAGS="
        "--xla_force_host_platform_device_count=N, plan an N-device --mesh on one machine)",
    )
    plan.add_argument("--plan", action="store_true", help="plan instead of training")
    plan.add_argument(
        "--plan-memory",
        type=_memory_size,
        metavar="SIZE",
        help="a device's memory, e.g. 80GiB, 16GB, 512MiB: say whether the step fits",
    )
    plan.add_argument("--plan-json", metavar="PATH", help="also write the plan as JSON to PATH")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def _memory_size(text: str) -> int:
    from jaxgpt.plan import parse_size

    try:
        return parse_size(text)
    except ValueError as e:  # argparse: "argument --plan-memory: <this message>", exit 2
        raise argparse.ArgumentTypeError(str(e)) from None


def configs(
    args: argparse.Namespace,
    saved: tuple[GPTConfig, TrainConfig] | None,
    shape_from_weights: bool = False,
) -> tuple[GPTConfig, TrainConfig]:
    """GPTConfig and TrainConfig from the flags, on top of a resumed run's saved settings.

    `shape_from_weights` (a fresh --init-from): the GPTConfig is the preset's as a stand-in
    (`finetune.model_config` builds the real one from the weights); only --model is checked.
    """
    if args.model:
        base = get_preset(args.model)
    else:
        base = saved[0] if saved else get_preset(DEFAULT_MODEL)
    train = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if shape_from_weights:
        return base, train
    return base.replace(**_given(args)), train


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 2 bad input, 1 the run failed,
    128 + N stopped by signal N after saving)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except TrainingInterrupted as e:
        _err(
            f"stopped by {_signame(e.signum)} after step {e.step}; checkpoint saved in "
            f"{e.checkpoint}; resume with: python scripts/train.py --resume --out {e.run_dir}"
        )
        return e.exit_code
    except SaveAborted as e:
        _err(f"{e}; the save in progress was abandoned, older checkpoints are intact")
        return e.exit_code
    except (NonFiniteError, CheckpointWriteError) as e:
        if debug:
            raise
        _err(str(e))
        return 1
    except (ValueError, FileNotFoundError, UnicodeDecodeError, OSError) as e:
        if debug:
            raise
        _err(str(e))
        return 2


def _err(line: str) -> None:
    print(f"train.py: error: {line}", file=sys.stderr)


def _signame(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.init_from:
        raise ValueError(
            f"--init-from {args.init_from!r} starts a new run and --resume continues the one "
            f"in --out {args.out!r} (its config.json names its source); pass only one of them"
        )
    saved = None
    if args.resume and (Path(args.out) / CONFIG_FILE).is_file():
        # The run's own settings become the defaults; explicit flags still win.
        saved = load_run_config(args.out)
        parser.set_defaults(**saved[1].to_dict())
        args = parser.parse_args(argv)
    fresh_finetune = args.init_from is not None and not args.resume
    # Validated here: before any process waits for others (a fine-tune's shape comes later,
    # from its weights, which JAX reads only once its distributed runtime is up).
    model, train = configs(args, saved, shape_from_weights=fresh_finetune)
    if not args.plan and (args.plan_memory or args.plan_json):
        parser.error("--plan-memory and --plan-json go with --plan; add --plan")
    _init_distributed(args)  # before anything touches a device
    # Before the first computation starts XLA's threads.
    trim = train.reuse_host_memory and reuse_host_memory()
    if train.compile_cache:
        enable_compile_cache(cache_dir(train.cache_dir))
    source = None
    if fresh_finetune:
        from jaxgpt import finetune

        cache = cache_dir(train.cache_dir) / "openai"
        source = finetune.load_source(train.init_from, cache_dir=cache, n_heads=args.n_heads)
        model = finetune.model_config(source, preset=args.model, **_given(args))
    if args.plan:
        return _plan(model, train, args.plan_memory, args.plan_json)
    on_event = _trimming(_print_event) if trim else _print_event
    fit(model, train, resume=args.resume, on_event=on_event, source=source)
    return 0


def _trimming(on_event: Callable[[str, dict], None]) -> Callable[[str, dict], None]:
    """`on_event` that first trims the host heap after the host work between steps."""

    def handle(name: str, e: dict) -> None:
        if name in HOST_WORK_EVENTS:
            trim_host_memory()
        on_event(name, e)

    return handle


def _plan(model: GPTConfig, train: TrainConfig, memory: int | None, json_path: str | None) -> int:
    """`--plan`: print (and maybe write) what each device holds; no data, no run folder."""
    import json

    from jaxgpt.plan import format_plan, plan

    result = plan(model, train, memory)
    print("\n".join(format_plan(result)))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags given on the command line (GPTConfig fields)."""
    names = [*MODEL_FLAGS, *ACCEL_FLAGS, "scan_layers"]
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _init_distributed(args: argparse.Namespace) -> None:
    """Start JAX's distributed runtime when asked. A malformed --mesh is refused first (the
    runtime would wait for the other processes before the mesh is ever read), and bad process
    flags by `initialize_distributed` before the runtime starts."""
    from jaxgpt import parallel

    if args.mesh is not None:
        parallel.parse_mesh(args.mesh)  # syntax only: the device count is checked once JAX is up
    given = [args.coordinator, args.num_processes, args.process_id]
    env = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (args.distributed or env or any(x is not None for x in given)):
        return
    parallel.initialize_distributed(*given, heartbeat_timeout=args.heartbeat_timeout)


def _print_event(name: str, e: dict[str, Any]) -> None:
    from tqdm.auto import tqdm

    if name == "lost":  # every process says it, on stderr, just before it exits
        last = e["checkpoint"] or "none yet (start again without --resume)"
        # The process exits right after this line: hold the bars' lock until then, so that no
        # progress bar is drawn below it (tqdm.write would redraw the bar after it, and the
        # main thread may refresh it).
        tqdm.get_lock().acquire()
        sys.stderr.write(
            f"\ntrain.py: error: process {e['process']} lost {e['what']} of {e['processes']} "
            f"({e['why']}); last committed checkpoint: {last}; resume with all "
            f"{e['processes']} processes: python scripts/train.py --resume --out "
            f"{e['run_dir']} (each with its process flags)\n"
        )
        return
    lines = {
        "start": lambda: [
            f"Device: {e['device']} ({e['platform']}); model parameters: {e['params']:,}"
            + (f"; mesh {e['mesh']} over {e['processes']} process(es)" if e.get("mesh") else ""),
            f"Training tokens: {e['train_loader_tokens']}",
            f"Validation tokens: {e['val_loader_tokens']}",
            f"Steps: {e['total_steps']} ({e['steps_per_epoch']} per epoch), from step "
            f"{e['step']}; run folder: {e['run_dir']}",
            *_finetune_lines(e),
        ],
        "untrained": lambda: [
            f"Training loss: {e['train_loss']}",
            f"Validation loss: {e['val_loss']}",
        ],
        "eval": lambda: [
            f"Ep {e['epoch_index']} (Step {e['global_step']:06d}): "
            f"Train loss {e['train_loss']:.3f}, Val loss {e['val_loss']:.3f}"
        ],
        "sample": lambda: [e["text"]],
        "checkpoint": lambda: [],
        "done": lambda: [
            f"Done after {e['step']} steps; see {e['run_dir']}",
            "Wall time: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in e["times"].items())
            + "; "
            + _compiled(e["compile"]),
        ],
    }[name]()
    for line in lines:
        tqdm.write(line)


def _compiled(c: dict[str, Any]) -> str:
    """How much compiling there was, and how much of it the run did not wait for."""
    return f"compilation {c['seconds']:.1f} s, {c['overlapped']:.1f} s of it overlapped other work"


def _finetune_lines(e: dict[str, Any]) -> list[str]:
    """The start lines of a fine-tune: its source, and what freezing trains and saves."""
    lines = []
    if e.get("init_from"):
        s = e["init_from"]
        lines.append(
            f"Initialised from {s['source']} ({s['format']}, fingerprint {s['fingerprint']})"
        )
    if e.get("opt_saved_bytes"):
        lines.append(
            f"Trainable parameters: {e['trainable_params']:,} of {e['params']:,}; optimizer "
            f"state {_size(e['opt_state_bytes'])} ({_size(e['opt_saved_bytes'])} saved by "
            "freezing)"
        )
    return lines


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python scripts/train.py`, `jaxgpt train`: run `main` and exit with its status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    status = main(argv)
    if status > 128:  # stopped by a signal: leave now, not after Orbax's writer threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
