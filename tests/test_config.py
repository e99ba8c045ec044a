"""GPTConfig: validation, the book's dict keys, presets."""

from __future__ import annotations

import dataclasses

import pytest

from jaxgpt.config import PRESETS, GPTConfig, get_preset

# The book's chapter 5 config, verbatim.
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def test_from_dict_takes_the_books_dict():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    assert cfg == get_preset("book-124m")
    assert {k: getattr(cfg, k) for k in GPT_CONFIG_124M} == GPT_CONFIG_124M
    assert cfg.tie_embeddings is False and cfg.init == "pytorch"


def test_round_trip_and_hashable():
    cfg = get_preset("gpt2")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(GPTConfig.from_dict(cfg.to_dict()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.emb_dim = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"emb_dim": 30, "n_heads": 4}, "emb_dim=30 is not divisible by n_heads=4"),
        ({"n_layers": 0}, "n_layers=0"),
        ({"vocab_size": -5}, "vocab_size=-5"),
        ({"context_length": 2.5}, "context_length=2.5"),
        ({"drop_rate": 1.0}, "drop_rate=1.0"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"matmul_precision": "fast"}, "matmul_precision='fast'"),
        ({"init": "xavier"}, "init='xavier'"),
    ],
)
def test_validation_names_the_value(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GPTConfig(**changes)


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown GPTConfig keys \\['emb_size'\\]"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_size": 3})
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        get_preset("gpt3")


def test_openai_presets():
    # OpenAI's four sizes (GPT-2 paper, table 2; heads from the released hparams.json).
    sizes = {
        "gpt2": (768, 12, 12),
        "gpt2-medium": (1024, 24, 16),
        "gpt2-large": (1280, 36, 20),
        "gpt2-xl": (1600, 48, 25),
    }
    for name, (emb, layers, heads) in sizes.items():
        cfg = PRESETS[name]
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb, layers, heads)
        assert cfg.context_length == 1024 and cfg.qkv_bias and cfg.tie_embeddings
