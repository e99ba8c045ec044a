"""Pretrained-weight sources for the fine-tuning and scoring tests, written in their real
formats by their own libraries, and the PyTorch models that are the references: transformers'
`GPT2LMHeadModel` and the book's `GPTModel`. torch is imported lazily (tests mark `torch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPENAI_DIR = FIXTURES / "openai-gpt2-tiny"  # real TF checkpoint: vocab 50257, emb 8, ctx 32
VOCAB = 50257  # the corpus is GPT-2 BPE: a source must have the whole vocabulary
# HF and book sources: emb 16, 2 layers, 2 heads, context 32 (emb 16 is no GPT-2 width, so a
# book state dict needs --n-heads 2).
SHAPE = {"emb": 16, "layers": 2, "heads": 2, "ctx": 32}


def hf_model(seed: int = 0, tie: bool = True) -> Any:
    """A `GPT2LMHeadModel` (no dropout) with every value randomised under `seed`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SHAPE["ctx"], n_embd=SHAPE["emb"], n_layer=SHAPE["layers"],
        n_head=SHAPE["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF starts biases at 0 and LayerNorms at 1/0: perturb everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def book_model(seed: int = 0) -> Any:
    """The book's `GPTModel` (no dropout, no QKV bias, untied head), torch's init under `seed`."""
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    cfg = {
        "vocab_size": VOCAB, "context_length": SHAPE["ctx"], "emb_dim": SHAPE["emb"],
        "n_heads": SHAPE["heads"], "n_layers": SHAPE["layers"], "drop_rate": 0.0,
        "qkv_bias": False,
    }  # fmt: skip
    return GPTModel(cfg).eval()


def openai_as_hf(folder: Path = OPENAI_DIR) -> Any:
    """The OpenAI TF checkpoint in a `GPT2LMHeadModel`, its arrays mapped by hand (as the
    fixture's README cross-checked it: a Conv1D weight is the TF `w` without its leading 1)."""
    import json

    import torch
    import transformers

    from jaxgpt.interop.openai import checkpoint_prefix
    from jaxgpt.interop.tfckpt import read_checkpoint

    hp = json.loads((folder / "hparams.json").read_text())
    cfg = transformers.GPT2Config(
        vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
        n_layer=hp["n_layer"], n_head=hp["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    tf = read_checkpoint(checkpoint_prefix(folder))
    sd = {"transformer.wte.weight": tf["model/wte"], "transformer.wpe.weight": tf["model/wpe"]}
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = (
        tf["model/ln_f/g"],
        tf["model/ln_f/b"],
    )
    for i in range(hp["n_layer"]):
        for part in ("ln_1", "ln_2"):
            sd[f"transformer.h.{i}.{part}.weight"] = tf[f"model/h{i}/{part}/g"]
            sd[f"transformer.h.{i}.{part}.bias"] = tf[f"model/h{i}/{part}/b"]
        for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = f"transformer.h.{i}.{part.replace('/', '.')}"
            sd[f"{key}.weight"] = tf[f"model/h{i}/{part}/w"][0]  # (1, in, out) -> (in, out)
            sd[f"{key}.bias"] = tf[f"model/h{i}/{part}/b"]
    model = transformers.GPT2LMHeadModel(cfg).eval()
    sd = {k: torch.tensor(np.array(v, np.float32)) for k, v in sd.items()}  # writable copies
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def token_nats(model: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 (batch, seq): -log p(target) of each token under a torch model (HF or book)."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(inputs, np.int64)))
        logits = getattr(out, "logits", out).double()  # HF returns an output object
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, torch.as_tensor(np.asarray(targets, np.int64))[..., None])
    return -picked[..., 0].numpy()
