"""GPT-2 as Flax Linen modules: the book's architecture (ch. 4), with an explicit KV cache.

One definition serves both paths: `GPT.__call__(ids)` is the full causal forward pass and
`GPT.decode(ids, cache, positions)` runs the same blocks against a cache pytree that goes
in and comes back out (no hidden Flax "cache" collection).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from jax.interpreters import partial_eval as pe

from jaxgpt.config import GPTConfig

Params = Any  # nested dict of arrays, as returned by GPT(cfg).init(...)["params"]
Cache = list[dict[str, jax.Array]]  # per layer {"k", "v"}: (batch, heads, cache, head_dim)

_PRECISION = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}


def _uniform(bound: float) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_draw(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)


def _normal(std: float) -> nn.initializers.Initializer:
    """nn.initializers.normal(std) as one jitted program per (shape, std): the draw and its
    scaling compile together whether the init runs eagerly or inside a larger jit, so both
    round alike (XLA folds the scale into the draw's own constants)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return _normal_draw(key, tuple(shape), jnp.dtype(dtype), float(std))

    return init


class _TokenDense(nn.Dense):
    """nn.Dense over the flattened tokens: (..., in) -> (tokens, in) @ (in, out) -> (..., out).

    XLA:CPU differentiates a 3-D `bse,ev` contraction several times slower than the same
    2-D matmul (the kernel gradient contracts two axes at once); a reshape is free.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))  # (tokens, out)
        return y.reshape(*lead, y.shape[-1])


def _dense(
    cfg: GPTConfig, fan_in: int, features: int, *, use_bias: bool = True, residual: bool = False
) -> nn.Dense:
    """A Dense layer initialised as PyTorch's nn.Linear (the book) or as GPT-2."""
    if cfg.init == "pytorch":
        # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) gives U(+-1/sqrt(fan_in)); bias the same.
        bound = 1.0 / math.sqrt(fan_in)
        kernel_init, bias_init = _uniform(bound), _uniform(bound)
    else:
        # GPT-2 paper, sec. 2.3: residual projections scaled by 1/sqrt(2 * n_layers).
        std = 0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02
        kernel_init, bias_init = _normal(std), nn.initializers.zeros
    return _TokenDense(
        features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        precision=_PRECISION[cfg.matmul_precision],
    )


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, `scale` and `shift`; computed in fp32."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        emb = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (emb,), self.param_dtype)
        shift = self.param("shift", nn.initializers.zeros, (emb,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(var + self.eps)
        bshape = (1,) * (x.ndim - 1) + (emb,)  # explicit broadcast: rank promotion is an error
        scale = scale.astype(jnp.float32).reshape(bshape)
        shift = shift.astype(jnp.float32).reshape(bshape)
        return (y * scale + shift).astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention; attends to the cache when one is given."""

    config: GPTConfig

    def setup(self) -> None:
        cfg = self.config
        e = cfg.emb_dim
        self.W_query = _dense(cfg, e, e, use_bias=cfg.qkv_bias)
        self.W_key = _dense(cfg, e, e, use_bias=cfg.qkv_bias)
        self.W_value = _dense(cfg, e, e, use_bias=cfg.qkv_bias)
        self.out_proj = _dense(cfg, e, e, residual=True)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def __call__(
        self,
        x: jax.Array,  # (batch, seq, emb)
        positions: jax.Array,  # (batch, seq) int32, absolute position of each token
        kv: dict[str, jax.Array] | None,  # {"k", "v"}: (batch, heads, cache, head_dim)
        deterministic: bool,
        key: jax.Array | None = None,  # dropout key of the attention weights
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg = self.config
        b, s, _ = x.shape
        h, d = cfg.n_heads, cfg.head_dim
        q = self.W_query(x).reshape(b, s, h, d)
        k = self.W_key(x).reshape(b, s, h, d)
        v = self.W_value(x).reshape(b, s, h, d)
        prec = _PRECISION[cfg.matmul_precision]
        if kv is not None:
            ctx, kv = _cached_attention(q, k, v, positions, kv, prec)  # (batch, seq, heads, d)
            return self.out_proj(ctx.reshape(b, s, h * d)), kv
        if attention_impl(cfg, deterministic, "cpu") != "book":  # not "book" on any platform
            # Full causal sequence: positions are 0..s-1 in every row.
            ctx = _fused_attention(q, k, v, cfg)  # (batch, seq, heads, head_dim)
            return self.out_proj(ctx.reshape(b, s, h * d)), None
        keys, values, key_pos = k, v, positions  # (batch, seq, heads, head_dim), (batch, seq)
        scores = jnp.einsum("bshd,bthd->bhst", q, keys.astype(q.dtype), precision=prec)
        causal = key_pos[:, None, None, :] <= positions[:, None, :, None]  # (batch, 1, seq, t)
        # Softmax in fp32; masked with -inf as the book does, then scaled by 1/sqrt(head_dim).
        scores = jnp.where(causal, scores.astype(jnp.float32), -jnp.inf) / math.sqrt(d)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = self.dropout(weights, deterministic=deterministic, rng=key)
        ctx = jnp.einsum(
            "bhst,bthd->bshd", weights.astype(q.dtype), values.astype(q.dtype), precision=prec
        )
        return self.out_proj(ctx.reshape(b, s, h * d)), kv  # (batch, seq, emb)


def attention_impl(cfg: GPTConfig, deterministic: bool, platform: str) -> str:
    """The attention `cfg.attention` runs on `platform` ("cpu", "cuda", "rocm", "tpu"): "book",
    "xla" or "cudnn". "auto": the book's while dropout acts on the attention weights (a fused
    kernel cannot drop them), cuDNN flash attention on CUDA where its rules hold (16-bit inputs;
    head_dim at most 128 and a multiple of 8: the bound before Hopper), else XLA's."""
    if cfg.attention != "auto":
        return cfg.attention
    if not deterministic and cfg.drop_rate > 0:
        return "book"
    head_ok = cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
    if platform == "cuda" and cfg.dtype in ("bfloat16", "float16") and head_ok:
        return "cudnn"
    return "xla"


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Causal softmax(q k^T / sqrt(head_dim)) v via jax.nn.dot_product_attention, with the
    implementation `attention_impl` picks for the platform the program is lowered for: under
    "auto" the choice is `lax.platform_dependent`, made when lowering for each platform (a GPU,
    an export target), not by the host that traces.

    q, k, v: (batch, seq, heads, head_dim), one dtype; softmax runs in float32 inside.
    """

    def attend(impl: str) -> Callable[..., jax.Array]:
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl
        )

    if cfg.attention != "auto":
        return attend(cfg.attention)(q, k, v)
    on_cuda = attention_impl(cfg, True, "cuda")  # deterministic: the caller took "book"
    if on_cuda == "xla" or not _cudnn_traceable():  # a host without CUDA: XLA's everywhere
        return attend("xla")(q, k, v)
    return jax.lax.platform_dependent(q, k, v, cuda=attend(on_cuda), default=attend("xla"))


@functools.cache
def _cudnn_traceable() -> bool:
    """Whether this host can trace cuDNN attention (JAX asks the CUDA plugin for cuDNN's
    version while tracing; a CPU-only install has none)."""
    x = jax.ShapeDtypeStruct((1, 8, 1, 8), jnp.bfloat16)
    try:
        jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"), x)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def _cache_write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache (batch, heads, cache, head_dim) with new (batch, seq, heads, head_dim) at positions."""
    rows = jnp.arange(new.shape[0])[:, None]  # (batch, 1)
    # Advanced indices around a slice: the indexed view is (batch, seq, heads, head_dim).
    return cache.at[rows, :, positions].set(new.astype(cache.dtype), mode="promise_in_bounds")


def _cached_attention(
    q: jax.Array,  # (batch, seq, heads, head_dim)
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,  # (batch, seq) int32
    kv: dict[str, jax.Array],  # {"k", "v"}: (batch, heads, cache, head_dim)
    prec: jax.lax.Precision,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Write this step's keys/values at their absolute positions, then attend to the cache.

    The cache is (batch, heads, cache, head_dim): batch and heads lead, as the attention dots
    want them, so XLA reads it in place (a (batch, cache, heads, head_dim) cache made XLA copy a
    transposed cache every step). Slots past a row's position are masked; fp32 softmax as the
    full-sequence path.
    """
    b, s, h, d = q.shape
    new_kv = {"k": _cache_write(kv["k"], k, positions), "v": _cache_write(kv["v"], v, positions)}
    if s == 1:
        # One token per row: attend to the cache as it was (slots < position) plus this token,
        # so the attention does not read the updated cache. Reading it let XLA fuse the update
        # into each reader and copy the whole cache per reader, every step.
        keys, values, visible = kv["k"], kv["v"], jnp.less
    else:
        keys, values, visible = new_kv["k"], new_kv["v"], jnp.less_equal
    t = keys.shape[2]
    scores = jnp.einsum("bshd,bhtd->bhst", q, keys.astype(q.dtype), precision=prec)
    mask = visible(jnp.arange(t)[None, None, None, :], positions[:, None, :, None])  # (b,1,s,t)
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    if s == 1:
        own = jnp.einsum("bshd,bshd->bhs", q, k, precision=prec)[..., None]  # (b, h, 1, 1)
        scores = jnp.concatenate([scores, own.astype(jnp.float32)], axis=-1)  # (b, h, 1, t + 1)
    weights = jax.nn.softmax(scores / math.sqrt(d), axis=-1).astype(q.dtype)
    ctx = jnp.einsum("bhst,bhtd->bshd", weights[..., :t], values.astype(q.dtype), precision=prec)
    if s == 1:
        ctx = ctx + weights[..., t].transpose(0, 2, 1)[..., None] * v  # (b, 1, h, d)
    return ctx, new_kv


class FeedForward(nn.Module):
    """Linear(emb, 4 emb) -> tanh-GELU -> Linear(4 emb, emb); names follow the book's `layers`."""

    config: GPTConfig

    def setup(self) -> None:
        e = self.config.emb_dim
        self.layers_0 = _dense(self.config, e, 4 * e)
        self.layers_2 = _dense(self.config, 4 * e, e, residual=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers_2(jax.nn.gelu(self.layers_0(x), approximate=True))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).

    Dropout draws from the block's own `key` (split three ways: attention weights and the two
    residual branches), so a layer's masks do not depend on whether the blocks are unrolled
    or scanned: a run may switch `scan_layers` and go on with the same randomness.
    """

    config: GPTConfig
    fsdp: Any = None  # `jaxgpt.parallel.FSDP` on a mesh with an fsdp axis; None: one device

    def setup(self) -> None:
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(param_dtype=pdt)
        self.norm2 = LayerNorm(param_dtype=pdt)
        self.drop_resid = nn.Dropout(cfg.drop_rate)

    def __call__(
        self,
        x: jax.Array,  # (batch, seq, emb)
        positions: jax.Array,
        kv: dict[str, jax.Array] | None,
        deterministic: bool,
        key: jax.Array | None = None,  # this layer's dropout key; None when deterministic
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        k_att, k_res1, k_res2 = (None,) * 3 if key is None else jax.random.split(key, 3)
        x = x if self.fsdp is None else self.fsdp.batch(x)
        a, kv = self.att(self.norm1(x), positions, kv, deterministic, k_att)
        x = x + self.drop_resid(a, deterministic=deterministic, rng=k_res1)
        x = x + self.drop_resid(self.ff(self.norm2(x)), deterministic=deterministic, rng=k_res2)
        return (x if self.fsdp is None else self.fsdp.batch(x)), kv


def _block_class(cfg: GPTConfig, fsdp: Any) -> type[TransformerBlock]:
    """TransformerBlock, with its parameters gathered on entry under FSDP, wrapped in nn.remat
    with the config's policy when asked (and under FSDP always: see `_keep_all_but_gathered`)."""
    block = TransformerBlock
    if fsdp is not None:
        block = nn.map_variables(block, "params", trans_in_fn=fsdp.gather)
    if cfg.remat == "none" and fsdp is None:
        return block
    policies = jax.checkpoint_policies
    policy = {
        "none": _keep_all_but_gathered,
        "block": policies.nothing_saveable,
        "dots": policies.dots_with_no_batch_dims_saveable,
    }[cfg.remat]
    # static_argnums counts `self` as 0: `deterministic` (argument 4) is a Python bool.
    # Inside nn.scan the loop already keeps XLA from merging the recomputation away.
    return nn.remat(block, static_argnums=(4,), policy=policy, prevent_cse=not cfg.scan_layers)


def _keep_all_but_gathered(prim: Any, *_: Any, **__: Any) -> bool:
    """Remat policy of FSDP without remat: keep every activation for the backward pass, but
    not the block's gathered parameters (sharding constraints' outputs): the backward pass
    gathers them again, as PyTorch's FSDP does, instead of every layer's whole parameters
    living from the forward to the backward pass. (`block` and `dots` keep none either.)"""
    return prim.name != "sharding_constraint"


class GPT(nn.Module):
    """GPT-2 language model returning logits (batch, seq, vocab_size)."""

    config: GPTConfig
    # `jaxgpt.parallel.FSDP` when training on a mesh with an fsdp axis: the blocks gather
    # their sharded parameters one at a time. None (the default): plain arrays.
    fsdp: Any = None

    def setup(self) -> None:
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        std = 1.0 if cfg.init == "pytorch" else 0.02  # torch.nn.Embedding draws N(0, 1)
        embed = dict(embedding_init=_normal(std), dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        self.tok_emb = nn.Embed(cfg.padded_vocab, cfg.emb_dim, **embed)
        self.pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, **embed)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        block = _block_class(cfg, self.fsdp)
        if cfg.scan_layers:
            # One block body scanned over a leading layer axis of every block param.
            # Broadcast: positions, kv (None), deterministic; scanned: the layers' dropout keys.
            self.trf_blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.n_layers,
            )(cfg, self.fsdp)
        else:
            self.trf_blocks = [block(cfg, self.fsdp) for _ in range(cfg.n_layers)]
        norm = LayerNorm
        if self.fsdp is not None:
            norm = nn.map_variables(LayerNorm, "params", trans_in_fn=self.fsdp.gather)
        self.final_norm = norm(param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.out_head = _dense(cfg, cfg.emb_dim, cfg.padded_vocab, use_bias=False)

    def __call__(self, ids: jax.Array, deterministic: bool = True) -> jax.Array:
        """Full causal forward pass.

        Args:
          ids: int (batch, seq) token ids, seq <= context_length.
          deterministic: False enables dropout; then pass `rngs={"dropout": key}` to apply.

        Returns:
          float logits (batch, seq, vocab_size) in `config.dtype`.
        """
        b, s = _check_ids(ids, self.config)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x, _ = self._forward(ids, positions, None, deterministic)
        return self._head(x)

    def hidden(self, ids: jax.Array, deterministic: bool = True) -> jax.Array:
        """The final-LayerNorm output that feeds the head: (batch, seq, emb) in `config.dtype`.

        Training takes this path so the loss can fuse the head with the cross-entropy
        (`losses.head_cross_entropy`) instead of materialising the logits several times.
        """
        b, s = _check_ids(ids, self.config)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x, _ = self._forward(ids, positions, None, deterministic)
        return x

    def decode(self, ids: jax.Array, cache: Cache, positions: jax.Array) -> tuple[jax.Array, Cache]:
        """Cached forward pass (no dropout): prefill a prompt or decode the next token(s).

        Args:
          ids: int (batch, seq) token ids.
          cache: from `init_cache`, per layer {"k", "v"} of shape (batch, heads, cache, head_dim).
          positions: int (batch, seq) absolute position of each token, < cache length and
            < context_length. Each token attends to cache slots at positions <= its own.

        Returns:
          logits (batch, seq, vocab_size) and the cache with these tokens written in.
        """
        _check_ids(ids, self.config)
        if self.config.scan_layers:
            raise ValueError(
                "cached decoding runs on unrolled layers; pass unstack_blocks(params) with "
                "config.replace(scan_layers=False) (jaxgpt.generate does this itself)"
            )
        if len(cache) != self.config.n_layers:
            raise ValueError(f"cache has {len(cache)} layers; config has {self.config.n_layers}")
        x, cache = self._forward(ids, positions, cache, True)
        return self._head(x), cache

    def _forward(
        self, ids: jax.Array, positions: jax.Array, cache: Cache | None, deterministic: bool
    ) -> tuple[jax.Array, Cache | None]:
        x = self._embed(self.tok_emb, ids) + self._embed(self.pos_emb, positions)  # (b, s, emb)
        x = self.drop_emb(x, deterministic=deterministic)
        n = self.config.n_layers
        # One dropout key per layer, the same in both layouts: (layers,) typed keys.
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), n)
        new_cache = []
        if self.config.scan_layers:  # full sequence only (decode refuses scanned layers)
            x, _ = self.trf_blocks(x, positions, None, deterministic, keys)
        for i, block in enumerate([] if self.config.scan_layers else self.trf_blocks):
            kv = None if cache is None else cache[i]
            x, kv = block(x, positions, kv, deterministic, None if keys is None else keys[i])
            new_cache.append(kv)
        return self.final_norm(x), (None if cache is None else new_cache)

    def _embed(self, table: nn.Embed, ids: jax.Array) -> jax.Array:
        """table(ids); under FSDP each device looks up its own shard (`parallel.FSDP.embed`)."""
        if self.fsdp is None:
            return table(ids)
        return self.fsdp.embed(table.embedding.astype(table.dtype), ids)

    def _head(self, x: jax.Array) -> jax.Array:
        """(batch, seq, emb) -> logits (batch, seq, vocab), one 2-D matmul over the tokens.

        A padded vocabulary's extra columns are sliced off: callers never see them.
        """
        vocab = self.config.vocab_size
        if not self.config.tie_embeddings:
            return self.out_head(x)[..., :vocab]
        b, s, e = x.shape
        prec = _PRECISION[self.config.matmul_precision]
        emb = self.tok_emb.embedding.astype(x.dtype)  # (padded vocab, emb)
        logits = jax.lax.dot_general(x.reshape(b * s, e), emb, (((1,), (1,)), ((), ())), prec)
        return logits.reshape(b, s, -1)[..., :vocab]  # (batch, seq, vocab)


def _check_ids(ids: jax.Array, cfg: GPTConfig) -> tuple[int, int]:
    if ids.ndim != 2:
        raise ValueError(f"ids must have shape (batch, seq); got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integer token ids; got dtype {ids.dtype}")
    b, s = ids.shape
    if s > cfg.context_length:
        raise ValueError(
            f"sequence length {s} exceeds context_length={cfg.context_length}; "
            f"crop to the last {cfg.context_length} tokens"
        )
    return b, s


def head_matrix(config: GPTConfig, params: Params) -> jax.Array:
    """The output projection: `out_head` kernel (emb, vocab), or the tied embedding (vocab, emb)."""
    if config.tie_embeddings:
        return params["tok_emb"]["embedding"]
    return params["out_head"]["kernel"]


def precision(config: GPTConfig) -> jax.lax.Precision:
    """The `jax.lax.Precision` of the config's matmuls."""
    return _PRECISION[config.matmul_precision]


def init_params(config: GPTConfig, key: jax.Array) -> Params:
    """Fresh parameters for `config` (a plain nested dict), drawn from `key`.

    Scanned layers get the unrolled model's values, stacked, and a padded vocabulary gets zero
    padding: the same key gives the same model whatever the layout.

    A concrete key initialises eagerly, after dropping the forward pass Flax's init traces
    (`_eager`): one compiled program per distinct initializer and shape, shared by every layer.
    One program over the whole init compiled each leaf's random draw again (book-124m: 9.7 s
    of CPU against 5.0 s, the same values). Under a trace (jit, eval_shape) it is traced.
    """
    canonical = config.replace(scan_layers=False, vocab_pad=1)
    ids = jnp.zeros((1, 1), jnp.int32)
    init = lambda k: GPT(canonical).init(k, ids)["params"]  # noqa: E731
    if isinstance(key, jax.core.Tracer):
        return to_layout(init(key), config)
    params = _eager(init, key)
    if config == canonical:
        return params
    return jax.jit(to_layout, static_argnums=1)(params, config)  # one program, not one per leaf


def _eager(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run op by op (a jitted call inside runs as its own cached program), after
    dead-code elimination: only what the outputs need runs."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    flat = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, closed.consts))(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat)


def init_cache(
    config: GPTConfig, batch: int, length: int | None = None, dtype: Any = None
) -> Cache:
    """Zero KV cache: per layer {"k", "v"} of shape (batch, heads, length, head_dim).

    `length` defaults to `context_length`; `dtype` to the config's activation dtype.
    """
    length = config.context_length if length is None else length
    if not 0 < length <= config.context_length:
        raise ValueError(f"cache length={length} must be in [1, {config.context_length}]")
    shape = (batch, config.n_heads, length, config.head_dim)  # the layout attention reads
    dt = jnp.dtype(config.dtype if dtype is None else dtype)
    return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(config.n_layers)]


def flatten_params(params: Params) -> dict[str, Any]:
    """Nested params -> {"trf_blocks_0/att/W_query/kernel": leaf, ...} ("/"-joined paths)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update({f"{key}/{k}": v for k, v in flatten_params(value).items()})
        else:
            out[key] = value
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict; the inverse of `flatten_params`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def count_params(params: Params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------------------------
# Layer layouts: unrolled `trf_blocks_N/...` (canonical, on disk) and scanned `trf_blocks/...`


def _has_stacked(node: Any) -> bool:
    return isinstance(node, Mapping) and "trf_blocks" in node


def _has_unrolled(node: Any) -> bool:
    return isinstance(node, Mapping) and "trf_blocks_0" in node


def is_stacked(tree: Any) -> bool:
    """Whether any dict in `tree` holds stacked `trf_blocks` (params or moments, scanned)."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return any(getattr(k, "key", None) == "trf_blocks" for path in paths for k in path)


def stack_blocks(tree: Any) -> Any:
    """Unrolled -> scanned layout: every dict holding `trf_blocks_0..N-1` gets one `trf_blocks`
    whose leaves stack the N layers on a leading axis. Works on params and on optimizer
    states (whose moments mirror the params); other nodes pass through."""

    def stack(node: Any) -> Any:
        if not _has_unrolled(node):
            return node
        n = sum(1 for k in node if k.startswith("trf_blocks_"))
        layers = [node[f"trf_blocks_{i}"] for i in range(n)]
        rest = {k: v for k, v in node.items() if not k.startswith("trf_blocks_")}
        return {**rest, "trf_blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}

    return jax.tree.map(stack, tree, is_leaf=_has_unrolled)


def unstack_blocks(tree: Any, take: Callable[[Any, int], Any] = lambda a, i: a[i]) -> Any:
    """Scanned -> unrolled layout, the inverse of `stack_blocks`. `take(leaf, i)` cuts layer
    i from a stacked leaf (default: indexing; a tree of ShapeDtypeStructs passes its own)."""

    def unstack(node: Any) -> Any:
        if not _has_stacked(node):
            return node
        stacked = node["trf_blocks"]
        n = jax.tree.leaves(stacked)[0].shape[0]  # leading layer axis
        rest = {k: v for k, v in node.items() if k != "trf_blocks"}
        layers = {
            f"trf_blocks_{i}": jax.tree.map(lambda a, i=i: take(a, i), stacked) for i in range(n)
        }
        return {**rest, **layers}

    return jax.tree.map(unstack, tree, is_leaf=_has_stacked)


def fit_vocab(tree: Any, vocab: int) -> Any:
    """Token embedding rows and head columns cut or zero-padded to `vocab`, in params or in an
    optimizer state's moments (every dict holding `tok_emb` / `out_head`)."""

    def resize(a: Any, axis: int) -> Any:
        if not hasattr(a, "shape") or a.shape[axis] == vocab:
            return a  # e.g. optax.MaskedNode in a masked state
        if a.shape[axis] > vocab:
            return jax.lax.slice_in_dim(a, 0, vocab, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, vocab - a.shape[axis])
        return jnp.pad(a, pad)

    def fit(node: Any) -> Any:
        if not _has_vocab(node):
            return node
        out = dict(node)
        for name, leaf, axis in (("tok_emb", "embedding", 0), ("out_head", "kernel", 1)):
            sub = node.get(name)
            if isinstance(sub, Mapping) and leaf in sub:
                out[name] = {**sub, leaf: resize(sub[leaf], axis)}
        return out

    return jax.tree.map(fit, tree, is_leaf=_has_vocab)


def _has_vocab(node: Any) -> bool:
    return isinstance(node, Mapping) and ("tok_emb" in node or "out_head" in node)


def to_layout(tree: Any, config: GPTConfig) -> Any:
    """Params (or an optimizer state) of any layout in the one `GPT(config)` expects: layers
    stacked or not, vocabulary padded to `config.padded_vocab` or not."""
    tree = fit_vocab(tree, config.padded_vocab)
    return stack_blocks(tree) if config.scan_layers else unstack_blocks(tree)


def to_canonical(tree: Any, config: GPTConfig) -> Any:
    """The interchange layout (other formats): unrolled layers, no vocabulary padding."""
    return fit_vocab(unstack_blocks(tree), config.vocab_size)
