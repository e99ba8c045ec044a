"""Corpora -> token arrays (maybe memory-mapped) -> the book's sliding windows -> batches.

Windows follow the book's `GPTDatasetV1` (ch. 2): window `i` starts at
`range(0, len(ids) - max_length, stride)[i]` and its target is the input shifted by one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt import tokenizer

log = logging.getLogger(__name__)

VERDICT_BASE_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code"
)
VERDICT_FILE = "the-verdict.txt"
DEFAULT_CORPUS = "pydoc"
BOOK_PROMPT = "Every effort moves you"  # the book's start_context
# Sample prompts that suit a corpus; the book's prompt for any other.
DEFAULT_PROMPTS = {"pydoc": 'The "for" statement'}
# The book's ch. 5 messages, raised instead of printed.
TRAIN_TOO_SHORT = (
    "Not enough tokens for the training loader. Try to lower the "
    "`GPT_CONFIG_124M['context_length']` or increase the `training_ratio`"
)
VAL_TOO_SHORT = (
    "Not enough tokens for the validation loader. Try to lower the "
    "`GPT_CONFIG_124M['context_length']` or decrease the `training_ratio`"
)
Batch = tuple[np.ndarray, np.ndarray]  # inputs, targets: int32 (batch, seq)


@dataclass(kw_only=True)
class DataPosition:
    """Where the data stream stands: the next batch is batch `batch` of epoch `epoch`.

    Mutable on purpose: `batches` advances it as it yields, and the training loop saves
    it next to the train state, so a resumed run continues with the very same next batch.
    """

    epoch: int = 0
    batch: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]), seed=int(d["seed"]))


# ----------------------------------------------------------------------------- corpora


def pydoc_text() -> str:
    """The Python reference documentation shipped with CPython (~465k characters), offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def verdict_text(cache_dir: str | os.PathLike, base_url: str = VERDICT_BASE_URL) -> str:
    """The book's corpus, downloaded from `base_url` into `cache_dir` on first use."""
    path = Path(cache_dir) / VERDICT_FILE
    if not path.is_file():
        url = f"{base_url.rstrip('/')}/{VERDICT_FILE}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                data = resp.read()
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(
                f"could not download the-verdict from {url} ({e}); "
                "pass a local copy with --data PATH"
            ) from e
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a half download never looks cached
        log.info("downloaded %s to %s", url, path)
    return path.read_text(encoding="utf-8")


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no .txt files; pass a text file")
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"data path {str(path)!r} does not exist; pass a text file, a folder of .txt "
            "files, a .bin token file, 'pydoc' or 'the-verdict'"
        )
    return [path]


def _read_utf8(path: Path, folder: Path | None = None) -> str:
    """A corpus file's text; one-line errors for a file that is empty (in a folder) or not UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
            f"offset {e.start}); convert it, e.g. iconv -f latin1 -t utf-8, or pass another file"
        ) from None
    if folder is not None and not text.strip():
        raise ValueError(
            f"corpus folder {str(folder)!r} holds an empty file {str(path)!r}; remove it "
            "or put text in it"
        )
    return text


def read_text(path: str | os.PathLike) -> str:
    """A text file, or the .txt files of a folder joined by `<|endoftext|>` (as the book's
    Gutenberg pretraining script joins documents)."""
    path = Path(path)
    folder = path if path.is_dir() else None
    return tokenizer.ENDOFTEXT.join(_read_utf8(p, folder) for p in _text_files(path))


def load_text(spec: str, *, cache_dir: str | os.PathLike, base_url: str = VERDICT_BASE_URL) -> str:
    """Corpus text by name ("pydoc", "the-verdict") or path (text file or folder of them)."""
    if spec == "pydoc":
        return pydoc_text()
    if spec == "the-verdict":
        return verdict_text(cache_dir, base_url)
    return read_text(spec)


def default_prompt(spec: str) -> str:
    """The sample prompt for a corpus: the book's, or one in the corpus's own style."""
    return DEFAULT_PROMPTS.get(spec, BOOK_PROMPT)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """The book's character split: `split_idx = int(train_ratio * len(text))`."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio={train_ratio!r} must be in (0, 1)")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


# ----------------------------------------------------------------------------- token files


def _safe_cut(buf: str) -> int:
    """Last index where the text can be cut without changing GPT-2's pre-tokenisation; 0 if none.

    Cutting just before a newline that precedes a non-space character is safe: in the whole
    text that newline is a pre-token of its own, and the whitespace run before it is one
    pre-token whether or not the newline follows. So the halves encode to the same ids.
    """
    i = len(buf) - 1
    while (i := buf.rfind("\n", 0, i)) > 0:
        if i + 1 < len(buf) and not buf[i + 1].isspace():
            return i
    return 0


def tokenize_to_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: Any = np.uint16,
    chunk_chars: int = 1 << 22,
) -> int:
    """Tokenise a text file (or folder of .txt files) into a flat binary token file, in chunks.

    Memory stays bounded by `chunk_chars`; the ids equal encoding the whole text at once
    (chunks are cut only where pre-tokenisation cannot change). Read back with
    `open_tokens(dst, dtype=dtype)`.

    Returns:
      The number of tokens written.
    """
    dt = np.dtype(dtype)
    if np.iinfo(dt).max < tokenizer.ENDOFTEXT_ID:
        raise ValueError(f"dtype {dt} cannot hold GPT-2 ids up to {tokenizer.ENDOFTEXT_ID}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    n = 0
    with open(tmp, "wb") as out:
        for k, path in enumerate(_text_files(Path(src))):
            carry = tokenizer.ENDOFTEXT if k else ""
            with open(path, encoding="utf-8") as f:
                while chunk := f.read(chunk_chars):
                    buf = carry + chunk
                    cut = _safe_cut(buf)
                    if not cut and len(buf) > 2 * chunk_chars:
                        cut = len(buf)  # no safe cut in sight: bound memory, risk one token
                    ids = tokenizer.encode_array(buf[:cut]) if cut else np.zeros(0, np.int32)
                    out.write(ids.astype(dt).tobytes())
                    n += ids.size
                    carry = buf[cut:]
            ids = tokenizer.encode_array(carry)
            out.write(ids.astype(dt).tobytes())
            n += ids.size
    tmp.replace(dst)
    return n


def open_tokens(path: str | os.PathLike, *, dtype: Any = np.uint16) -> np.ndarray:
    """A binary token file as a read-only memory map (n,)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


# A folder written by scripts/prepare_data.py: uint16 shards, each with a sidecar JSON,
# and this index, written last (so a folder without it was never finished).
DATASET_FILE = "dataset.json"
DATASET_FORMAT = "jaxgpt-token-shards"


class TokenShards:
    """Token files read as one (n,) array without loading them: memory-mapped shards.

    Indexing with an integer array gathers across shard boundaries (what `gather_windows`
    needs); a slice returns the concatenated range. Only the touched pages are read.
    """

    def __init__(self, paths: list[Path], dtype: Any = np.uint16) -> None:
        self.dtype = np.dtype(dtype)
        self.shards = [open_tokens(p, dtype=self.dtype) for p in paths]
        self.offsets = np.cumsum([0] + [len(x) for x in self.shards])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return self[np.arange(start, stop, step)]
        idx = np.asarray(idx)
        which = np.searchsorted(self.offsets, idx, side="right") - 1  # shard of each index
        out = np.empty(idx.shape, self.dtype)
        for k in np.unique(which):
            hit = which == k
            out[hit] = self.shards[k][idx[hit] - self.offsets[k]]
        return out


def is_token_shards(path: str | os.PathLike) -> bool:
    """True for a folder written by scripts/prepare_data.py."""
    return (Path(path) / DATASET_FILE).is_file()


def _shard_paths(folder: Path) -> tuple[np.dtype, dict[str, list[Path]]]:
    """(dtype, {"train": paths, "val": paths}) of a prepared folder, each shard checked whole."""
    index = json.loads((folder / DATASET_FILE).read_text(encoding="utf-8"))
    if index.get("format") != DATASET_FORMAT:
        raise ValueError(
            f"{str(folder)!r} is not a jaxgpt token-shard folder (no {DATASET_FORMAT})"
        )
    dtype = np.dtype(index["dtype"])
    splits = {}
    for split in ("train", "val"):
        paths = [folder / name for name in index[split]]
        for path in paths:
            side = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            if not path.is_file() or path.stat().st_size != side["tokens"] * dtype.itemsize:
                raise ValueError(
                    f"token shard {str(path)!r} is missing or not {side['tokens']} tokens long; "
                    "run scripts/prepare_data.py again into a new --out"
                )
        splits[split] = paths
    return dtype, splits


def open_token_shards(folder: str | os.PathLike) -> Splits:
    """Train and validation `TokenShards` of a prepared folder, each shard checked whole."""
    dtype, paths = _shard_paths(Path(folder))
    return Splits(TokenShards(paths["train"], dtype), TokenShards(paths["val"], dtype))


# ----------------------------------------------------------------------------- windows


def window_starts(n_tokens: int, max_length: int, stride: int) -> np.ndarray:
    """Start index of each window (n_windows,), exactly the book's `range`."""
    if max_length <= 0 or stride <= 0:
        raise ValueError(f"max_length={max_length} and stride={stride} must be positive")
    return np.arange(0, n_tokens - max_length, stride, dtype=np.int64)


def num_batches(n_windows: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch, as torch's DataLoader counts them."""
    return n_windows // batch_size if drop_last else -(-n_windows // batch_size)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, max_length: int) -> Batch:
    """(inputs, targets) int32 (len(starts), max_length) by index arithmetic (no loop)."""
    idx = starts[:, None] + np.arange(max_length)[None, :]  # (batch, seq)
    return tokens[idx].astype(np.int32), tokens[idx + 1].astype(np.int32)


def epoch_order(n_windows: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Window order of one epoch; shuffled with `default_rng((seed, epoch))`."""
    if not shuffle:
        return np.arange(n_windows)
    return np.random.default_rng((seed, epoch)).permutation(n_windows)


def batches(
    tokens: np.ndarray,
    batch_size: int,
    max_length: int,
    stride: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    position: DataPosition | None = None,
    rows: slice | None = None,
    sampling: str = "sequential",
) -> Iterator[Batch]:
    """The remaining batches of epoch `position.epoch`, from batch `position.batch` on.

    Advances `position.batch` before each yield (so a checkpoint taken after consuming a
    batch points at the next one) and moves `position` to the next epoch at the end.

    Args:
      tokens: int token ids (n,), an array or `np.memmap`.
      batch_size, max_length, stride: the book's loader settings.
      seed: shuffle seed; must equal `position.seed` when a position is given.
      position: where to start; None starts at epoch 0, batch 0.
      rows: gather only these rows of each batch (a process's share of the global batch).
      sampling: "sequential" (the book's windows, in `epoch_order`) or "random": batch `b`
        of epoch `e` is `batch_size` windows at offsets drawn by `default_rng((seed, e, b))`
        (as many batches per epoch as "sequential"; needs no permutation of all windows).

    Yields:
      (inputs, targets), both int32 (batch, max_length); the last batch may be smaller
      when `drop_last` is False.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    position = DataPosition(seed=seed) if position is None else position
    if position.seed != seed:
        raise ValueError(f"position.seed={position.seed} differs from seed={seed}")
    starts = window_starts(len(tokens), max_length, stride)
    order = epoch_order(
        len(starts), seed=seed, epoch=position.epoch, shuffle=shuffle and sampling == "sequential"
    )
    if sampling not in ("sequential", "random"):
        raise ValueError(f"sampling={sampling!r} is not one of ['sequential', 'random']")
    rows = slice(None) if rows is None else rows
    for b in range(position.batch, num_batches(len(starts), batch_size, drop_last)):
        position.batch = b + 1
        if sampling == "random":
            rng = np.random.default_rng((seed, position.epoch, b))
            chosen = rng.integers(0, len(tokens) - max_length, size=batch_size)  # (batch,)
        else:
            chosen = starts[order[b * batch_size : (b + 1) * batch_size]]
        yield gather_windows(tokens, chosen[rows], max_length)
    position.epoch, position.batch = position.epoch + 1, 0


@dataclass(frozen=True)
class Splits:
    """Train and validation token arrays (each (n,), maybe memory-mapped)."""

    train: np.ndarray
    val: np.ndarray


def check_splits(splits: Splits, max_length: int, batch_size: int, stride: int) -> None:
    """The book's sanity checks, as errors: each split must give at least one batch."""
    if len(window_starts(len(splits.train), max_length, stride)) < batch_size:
        raise ValueError(
            f"{TRAIN_TOO_SHORT} (train split has {len(splits.train)} tokens; one batch of "
            f"{batch_size} windows of {max_length} with stride {stride} needs more)"
        )
    if len(window_starts(len(splits.val), max_length, stride)) == 0:
        raise ValueError(
            f"{VAL_TOO_SHORT} (validation split has {len(splits.val)} tokens; "
            f"one window needs {max_length + 1})"
        )


def load_splits(
    spec: str,
    *,
    cache_dir: str | os.PathLike,
    train_ratio: float = 0.9,
    base_url: str = VERDICT_BASE_URL,
) -> Splits:
    """Train/validation tokens for a corpus name, text path, or `.bin` token file (uint16).

    Text is split by characters before tokenising (the book); a token file by tokens; a
    folder from scripts/prepare_data.py has its own validation shards (`train_ratio` unused).
    """
    if is_token_shards(spec):
        return open_token_shards(spec)
    if spec.endswith(".bin"):
        tokens = open_tokens(spec)
        cut = int(train_ratio * len(tokens))
        return Splits(tokens[:cut], tokens[cut:])
    train_text, val_text = split_text(
        load_text(spec, cache_dir=cache_dir, base_url=base_url), train_ratio
    )
    return Splits(tokenizer.encode_array(train_text), tokenizer.encode_array(val_text))


def load_tokens(
    spec: str, *, cache_dir: str | os.PathLike, base_url: str = VERDICT_BASE_URL
) -> np.ndarray | TokenShards:
    """A whole corpus as one token array (n,), no train/validation split: what `load_splits`
    reads (a corpus name, a text file or folder, a `.bin` token file, a prepared folder,
    whose validation shards follow its training shards as they followed in the text)."""
    if is_token_shards(spec):
        dtype, paths = _shard_paths(Path(spec))
        return TokenShards(paths["train"] + paths["val"], dtype)
    if spec.endswith(".bin"):
        return open_tokens(spec)
    return tokenizer.encode_array(load_text(spec, cache_dir=cache_dir, base_url=base_url))
