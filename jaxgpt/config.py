"""Model configuration: GPTConfig (frozen, validated), the book's dict keys, named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_DTYPES = ("float32", "bfloat16", "float16")
_PRECISIONS = ("default", "high", "highest")
_INITS = ("pytorch", "gpt2")
_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
ATTENTIONS = ("book", "auto", "xla", "cudnn")
REMATS = ("none", "block", "dots")
_SAMPLINGS = ("sequential", "random")


_C = TypeVar("_C", bound="_DictMixin")


class _DictMixin:
    """`from_dict` / `to_dict` / `replace` for the frozen config dataclasses."""

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Build from a dict of field values (for GPTConfig: the book's `GPT_CONFIG_124M`)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(names)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: _C, **changes: Any) -> _C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True, kw_only=True)
class GPTConfig(_DictMixin):
    """Hyperparameters of a GPT-2 model; hashable, so it is static under jit.

    The first seven fields are the book's `GPT_CONFIG_124M` keys. The rest cover what
    OpenAI's GPT-2 and fast training need; their defaults reproduce the book.
    """

    vocab_size: int = 50257
    context_length: int = 256
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # Output head shares the token embedding (OpenAI/HF); the book keeps them separate.
    tie_embeddings: bool = False
    # "pytorch": torch's layer defaults, as the book gets them (N(0,1) embeddings,
    # U(+-1/sqrt(fan_in)) linears). "gpt2": N(0, 0.02), residual projections scaled.
    init: str = "pytorch"
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"
    # float32 matmuls on GPU/TPU run at reduced precision unless asked; "highest"
    # keeps agreement with PyTorch's fp32 to ~1e-6.
    matmul_precision: str = "highest"
    # Accelerator switches (issue 9); the defaults are the book's computation.
    # "book": explicit masked softmax (the reference). "xla"/"cudnn": jax.nn.dot_product_attention
    # with that implementation (no dropout on attention weights: a fused kernel cannot apply it).
    # "auto": the book's path while attention dropout is active, else cuDNN in programs lowered
    # for CUDA where its rules hold (model.attention_impl), else XLA. The cached-decode path
    # always uses the book's attention.
    attention: str = "book"
    # The blocks as one nn.scan over stacked params `trf_blocks/...` (leading layer axis), so
    # compile time does not grow with depth. On disk params are always unrolled (trf_blocks_N).
    scan_layers: bool = False
    # Rematerialise each block in the backward pass: "block" saves only its input, "dots"
    # also keeps matmul outputs (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
    remat: str = "none"
    # Pad the token embedding rows and output head columns to a multiple of this (64: 50257 ->
    # 50304, tensor-core friendly). Padded logits are masked out of the loss and sliced off
    # the logits; the padding starts at zero and stays there. 1: no padding (the book).
    vocab_pad: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_pad"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads dividing emb_dim"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate={self.drop_rate!r} must be in [0, 1)")
        _check_choice("init", self.init, _INITS)
        _check_choice("dtype", self.dtype, _DTYPES)
        _check_choice("param_dtype", self.param_dtype, _DTYPES)
        _check_choice("matmul_precision", self.matmul_precision, _PRECISIONS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("remat", self.remat, REMATS)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab(self) -> int:
        """Rows of the token embedding / columns of the head: vocab_size rounded up to vocab_pad."""
        return -(-self.vocab_size // self.vocab_pad) * self.vocab_pad


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _openai(emb_dim: int, n_layers: int, n_heads: int) -> GPTConfig:
    # OpenAI's released GPT-2: context 1024, QKV bias, tied head.
    return GPTConfig(
        context_length=1024,
        emb_dim=emb_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        qkv_bias=True,
        tie_embeddings=True,
        init="gpt2",
    )


PRESETS: dict[str, GPTConfig] = {
    # The book's GPT_CONFIG_124M, chapter 5.
    "book-124m": GPTConfig(),
    "gpt2": _openai(768, 12, 12),
    "gpt2-medium": _openai(1024, 24, 16),
    "gpt2-large": _openai(1280, 36, 20),
    "gpt2-xl": _openai(1600, 48, 25),
    # Small models: CPU demos (the default training run) and tests.
    "small": GPTConfig(context_length=128, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.1),
    "mini": GPTConfig(context_length=64, emb_dim=128, n_heads=4, n_layers=2, drop_rate=0.0),
    "tiny": GPTConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0),
}


def get_preset(name: str) -> GPTConfig:
    """Return the named preset; raise ValueError listing the names when unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_DictMixin):
    """Training settings. The defaults are the quick CPU demo (`python scripts/train.py`);
    the book's ch. 5 run is `epochs=10, batch_size=2, lr=4e-4, eval_freq=5, eval_iter=5`
    with the `book-124m` model and the-verdict (stride = context_length, seed 123).
    """

    data: str = "pydoc"  # "pydoc", "the-verdict", a text file, a folder of .txt, or a .bin
    train_ratio: float = 0.9
    stride: int | None = None  # None: context_length, as the book
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many steps in total
    # AdamW; b1, b2, eps are torch.optim.AdamW's defaults, as the book uses them.
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_mask: bool = False  # True spares biases, norm scale/shift and embeddings
    # Schedule: linear warmup from 0, then constant (min_lr None, the book) or cosine to min_lr.
    warmup_steps: int = 0
    min_lr: float | None = None
    grad_clip: float | None = None  # global-norm clipping; the book does not clip
    eval_freq: int = 25
    eval_iter: int = 5
    start_context: str | None = None  # None: the corpus's (data.default_prompt)
    sample_tokens: int = 50
    seed: int = 123  # the book's torch.manual_seed(123)
    out: str = "runs/default"
    checkpoint_every: int = 100
    keep: int = 3
    # Downloaded corpora and the XLA cache; None: $XDG_CACHE_HOME/jaxgpt, else ~/.cache/jaxgpt.
    cache_dir: str | None = None
    data_url: str | None = None  # base URL of the-verdict; None: the book's repository
    # Persistent XLA compilation cache in `cache_dir`/xla (scripts/train.py turns it on before
    # the first compile), so a second run with the same shapes does not compile again.
    compile_cache: bool = True
    # Compile the run's programs (train and eval steps, the sampler, checkpoint fingerprints)
    # in worker threads while the model initialises and the first evaluation runs
    # (`jaxgpt.ahead`); off: each compiles on first use. Either way the same programs run.
    compile_ahead: bool = True
    # Have glibc's malloc keep freed memory for the next step (`train.reuse_host_memory`):
    # XLA:CPU allocates each step's buffers afresh and glibc would page-fault them in again.
    reuse_host_memory: bool = True
    # PRNG behind init, dropout and sampling keys. Measured on CPU (small preset), dropout
    # masks cost the same CPU time under threefry and rbg, so the default stays JAX's own.
    prng_impl: str = "threefry2x32"
    # Each update averages the gradients of grad_accum micro-batches of batch_size/grad_accum
    # rows, in one compiled step (lax.scan); batch_size stays the rows per update.
    grad_accum: int = 1
    # "data=N,fsdp=M" (jaxgpt.parallel); None: every device on `data` (one device: unsharded).
    mesh: str | None = None
    # "sequential": the book's strided windows, shuffled per epoch; "random": windows at
    # random token offsets (corpora too large for epochs); both seeded and resumable.
    sampling: str = "sequential"
    # Non-finite loss/gradients: skip up to this many bad steps in a row, then stop (0: stop
    # at the first). A skipped step leaves params and optimizer state unchanged.
    skip_nonfinite: int = 0
    # Several processes: seconds without a heartbeat before JAX's coordination service takes
    # a process for dead (JAX's default, 100); the others then stop cleanly after a quarter of it.
    heartbeat_timeout: int = 100
    # Experiment tracking (jaxgpt.tracking), the rows of metrics.jsonl at the same steps:
    # TensorBoard event files in this folder ("": the run folder's tensorboard/), and a
    # Weights & Biases run in this project. None: off.
    tensorboard: str | None = None
    wandb: str | None = None
    # Start from pretrained weights: anything `jaxgpt.load` reads (gpt2..gpt2-xl by name, an
    # OpenAI / HF folder, .safetensors, the book's .pth, a jaxgpt run or .npz). None: random.
    init_from: str | None = None
    # Only the params whose "/"-joined path (layers unrolled) matches this regex whole train;
    # the others are frozen, with no optimizer state. None: all train.
    trainable: str | None = None

    def __post_init__(self) -> None:
        positive = ("batch_size", "epochs", "eval_freq", "eval_iter", "checkpoint_every", "keep")
        positive += ("grad_accum",)
        for name in positive + ("max_steps", "stride"):
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 0:
            raise ValueError(f"sample_tokens={self.sample_tokens!r} must be an integer >= 0")
        if not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite={self.skip_nonfinite!r} must be an integer >= 0")
        if not isinstance(self.heartbeat_timeout, int) or self.heartbeat_timeout < 2:
            raise ValueError(
                f"heartbeat_timeout={self.heartbeat_timeout!r} must be an integer >= 2 (seconds)"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be positive (or None: no clip)")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            raise ValueError(f"AdamW b1={self.b1}, b2={self.b2} must be in [0, 1), eps > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "pick a grad_accum that divides the batch size"
            )
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio={self.train_ratio!r} must be in (0, 1)")
        _check_choice("prng_impl", self.prng_impl, _PRNG_IMPLS)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")
        _check_choice("sampling", self.sampling, _SAMPLINGS)
        if self.wandb is not None and (not self.wandb or set(self.wandb) & set("/\\#?%:")):
            raise ValueError(
                f"wandb={self.wandb!r} is not a W&B project name; give a non-empty name "
                "without / \\ # ? % :"
            )
