"""The book's PyTorch files <-> jaxgpt, checked against llms_from_scratch's GPTModel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from parity.parity_refs import randomize_

import jaxgpt.interop as interop
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT

torch = pytest.importorskip("torch")
ch04 = pytest.importorskip("llms_from_scratch.ch04")
pytestmark = pytest.mark.torch

BOOK = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
IDS = np.random.default_rng(0).integers(0, 97, (2, 12))


def _book_model(qkv_bias: bool = False, seed: int = 0, **kw: int):  # noqa: ANN202
    torch.manual_seed(seed)
    return randomize_(ch04.GPTModel({**BOOK, "qkv_bias": qkv_bias, **kw}).eval(), seed)


def _torch_logits(model) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).numpy()


def _jax_logits(cfg: GPTConfig, params: dict) -> np.ndarray:
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(IDS, jnp.int32)))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_file(tmp_path: Path, qkv_bias: bool) -> None:
    model = _book_model(qkv_bias)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    cfg, params = interop.load(tmp_path / "model.pth", {"n_heads": 4})
    assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.n_layers, cfg.context_length) == (
        qkv_bias, False, 2, 16,
    )  # fmt: skip
    # fp32, same math, different op order: observed ~4e-7.
    np.testing.assert_allclose(_jax_logits(cfg, params), _torch_logits(model), rtol=0, atol=1e-4)


def test_training_checkpoint_file(tmp_path: Path) -> None:
    model = _book_model()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    ckpt = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}
    torch.save(ckpt, tmp_path / "model_and_optimizer.pth")
    cfg, params = interop.load(tmp_path / "model_and_optimizer.pth", {"n_heads": 4})
    np.testing.assert_allclose(_jax_logits(cfg, params), _torch_logits(model), rtol=0, atol=1e-4)


def test_heads_from_gpt2_width_or_error(tmp_path: Path) -> None:
    wide = _book_model(emb_dim=768, n_heads=12, n_layers=1, vocab_size=11, context_length=4)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    assert interop.load(tmp_path / "wide.pth")[0].n_heads == 12  # the width of "gpt2"
    torch.save(_book_model().state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="cannot infer n_heads for emb_dim=32"):
        interop.load(tmp_path / "narrow.pth")


def test_tied_head_is_detected(tmp_path: Path) -> None:
    # The book's load_weights_into_gpt sets out_head to a copy of wte (OpenAI weights).
    model = _book_model()
    with torch.no_grad():
        model.out_head.weight.copy_(model.tok_emb.weight)
    torch.save(model.state_dict(), tmp_path / "tied.pth")
    cfg, params = interop.load(tmp_path / "tied.pth", {"n_heads": 4})
    assert cfg.tie_embeddings and "out_head" not in params
    np.testing.assert_allclose(_jax_logits(cfg, params), _torch_logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize(("suffix", "tie"), [(".pth", False), (".safetensors", True)])
def test_export_loads_strictly_into_gptmodel(
    tmp_path: Path, suffix: str, tie: bool, random_params: Callable
) -> None:
    cfg = GPTConfig(**BOOK, qkv_bias=True, tie_embeddings=tie)
    params = random_params(cfg, 3)
    out = interop.export_book(cfg, params, tmp_path / f"model{suffix}")
    if suffix == ".pth":
        sd = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(out)
    model = ch04.GPTModel({**BOOK, "qkv_bias": True}).eval()
    model.load_state_dict(sd, strict=True)
    np.testing.assert_allclose(_torch_logits(model), _jax_logits(cfg, params), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="already exists"):
        interop.export_book(cfg, params, out)


class _Payload:
    def __reduce__(self):  # noqa: ANN204 (pickle protocol)
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"tok_emb.weight": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        interop.load(tmp_path / "evil.pth", {"n_heads": 4})


def test_shape_and_key_errors_name_the_keys(tmp_path: Path) -> None:
    sd = _book_model().state_dict()
    with pytest.raises(ValueError, match="context_length: file 16, config 256"):
        interop.from_book_state_dict(sd, GPTConfig(**{**BOOK, "context_length": 256}))
    bad = dict(sd)
    del bad["trf_blocks.1.ff.layers.2.bias"]
    with pytest.raises(ValueError, match=r"missing key 'trf_blocks\.1\.ff\.layers\.2\.bias'"):
        interop.from_book_state_dict(bad, {"n_heads": 4})
    extra = {**sd, "trf_blocks.0.att.rope": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected keys trf_blocks\.0\.att\.rope"):
        interop.from_book_state_dict(extra, {"n_heads": 4})


def test_hf_state_dict_is_not_a_book_file(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=97, n_positions=16)
    torch.save(transformers.GPT2LMHeadModel(cfg).state_dict(), tmp_path / "hf.pth")
    with pytest.raises(ValueError, match="not a state dict of the book's GPTModel"):
        interop.load(tmp_path / "hf.pth", {"n_heads": 4})
