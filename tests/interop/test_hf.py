"""Hugging Face GPT-2 folders and state dicts <-> jaxgpt, checked against transformers itself."""

from __future__ import annotations

import json
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
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

IDS = np.random.default_rng(0).integers(0, 97, (2, 12))


def _hf_model(tie: bool = True, seed: int = 0):  # noqa: ANN202 (transformers type)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    return randomize_(transformers.GPT2LMHeadModel(cfg).eval(), seed)


def _hf_logits(model) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


def _jax_logits(cfg, params) -> np.ndarray:  # noqa: ANN001
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(IDS, jnp.int32)))


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_folder(tmp_path: Path, tie: bool) -> None:
    model = _hf_model(tie)
    model.save_pretrained(tmp_path / "m")
    cfg, params = interop.load(tmp_path / "m")
    assert cfg.tie_embeddings == tie and cfg.qkv_bias and cfg.n_heads == 4
    # fp32, same math, different op order: observed ~5e-7.
    np.testing.assert_allclose(_jax_logits(cfg, params), _hf_logits(model), rtol=0, atol=1e-4)


def test_pytorch_model_bin_and_buffers(tmp_path: Path) -> None:
    # transformers 5 writes only safetensors; older versions wrote pytorch_model.bin with
    # the causal-mask buffers attn.bias / attn.masked_bias, reproduced here.
    model = _hf_model()
    sd = dict(model.state_dict())
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    (tmp_path / "m" / "config.json").write_text(json.dumps(model.config.to_dict()))
    cfg, params = interop.load(tmp_path / "m")
    np.testing.assert_allclose(_jax_logits(cfg, params), _hf_logits(model), rtol=0, atol=1e-4)


def test_in_memory_state_dict_with_and_without_prefix() -> None:
    model = _hf_model(tie=False)
    hf_cfg = model.config.to_dict()
    cfg, params = interop.from_hf_state_dict(model.state_dict(), hf_config=hf_cfg)
    # GPT2Model (no `transformer.` prefix, no lm_head), read as a tied model.
    tied_cfg = {**hf_cfg, "tie_word_embeddings": True}
    cfg2, params2 = interop.from_hf_state_dict(model.transformer.state_dict(), hf_config=tied_cfg)
    assert not cfg.tie_embeddings and cfg2.tie_embeddings
    np.testing.assert_allclose(_jax_logits(cfg, params), _hf_logits(model), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(params2["tok_emb"]["embedding"], params["tok_emb"]["embedding"])


@pytest.mark.parametrize(("qkv_bias", "tie"), [(True, True), (False, False)])
def test_export_loads_with_from_pretrained(
    tmp_path: Path, qkv_bias: bool, tie: bool, random_params: Callable
) -> None:
    cfg = GPTConfig(
        vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
        qkv_bias=qkv_bias, tie_embeddings=tie,
    )  # fmt: skip
    params = random_params(cfg, 1)
    interop.export_hf(cfg, params, tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.tie_word_embeddings == tie
    np.testing.assert_allclose(_hf_logits(model), _jax_logits(cfg, params), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="already exists"):
        interop.export_hf(cfg, params, tmp_path / "out")
    # The bare weights file is detected as HF too (config from shapes plus n_heads).
    file_cfg, file_params = interop.load(tmp_path / "out" / "model.safetensors", {"n_heads": 4})
    assert file_cfg.tie_embeddings == tie
    np.testing.assert_allclose(_jax_logits(file_cfg, file_params), _hf_logits(model), atol=1e-4)


def test_missing_and_extra_keys_are_named() -> None:
    model = _hf_model()
    sd = dict(model.state_dict())
    hf_cfg = model.config.to_dict()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing key 'h\.1\.mlp\.c_fc\.bias'"):
        interop.from_hf_state_dict(sd, hf_config=hf_cfg)
    sd = {**model.state_dict(), "transformer.h.0.attn.rotary": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys h\.0\.attn\.rotary"):
        interop.from_hf_state_dict(sd, hf_config=hf_cfg)


def test_wrong_model_type(tmp_path: Path) -> None:
    model = _hf_model()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        interop.load(tmp_path / "m")
