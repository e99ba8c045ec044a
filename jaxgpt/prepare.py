"""Text corpora of any size -> uint16 token shards, streamed with bounded memory over a pool.

Each input file is one document; shards hold the documents' GPT-2 ids with
`<|endoftext|>` between documents. The last `val_fraction` of the input bytes (the book's
train-then-validation order) goes to the `val_*` shards. Read with `data.open_token_shards`.
"""

from __future__ import annotations

import codecs
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt import data, tokenizer

log = logging.getLogger(__name__)

DTYPE = np.dtype(np.uint16)  # GPT-2 ids < 50257 < 2**16
SHARD_TOKENS = 2**26  # 64 Mi tokens = 128 MiB a shard
CHUNK_CHARS = 1 << 20  # text per task; memory is about (2 * workers + 4) such chunks
_OURS = ("train_", "val_")  # our shard names; a folder with anything else is not ours


@dataclass(frozen=True)
class Piece:
    """A run of one document's text, cut where tokenisation cannot change; one pool task."""

    doc: int  # index of the source file
    split: str  # "train" or "val"
    text: str
    eot_first: bool  # an <|endoftext|> precedes it (first piece of every document but the 1st)
    nbytes: int  # input bytes it covers, for progress


def input_files(inputs: list[str]) -> list[Path]:
    """Text files, and the .txt files under folders, in the order given (folders sorted)."""
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise ValueError(f"folder {spec!r} holds no .txt files; pass text files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist; pass text files or folders")
    return files


def _safe_cut_from(buf: str, start: int) -> int:
    """First safe cut (see `data._safe_cut`) at or after `start`; 0 if none."""
    i = start - 1
    while (i := buf.find("\n", i + 1)) != -1:
        if i > 0 and i + 1 < len(buf) and not buf[i + 1].isspace():
            return i
    return 0


def pieces(files: list[Path], val_fraction: float, chunk_chars: int) -> Iterator[Piece]:
    """Stream the files as Pieces of about `chunk_chars` characters, never more than two."""
    total = sum(p.stat().st_size for p in files)
    val_from = total - int(val_fraction * total)  # byte offset where validation begins
    seen = 0  # bytes of input read before the current buffer
    for doc, path in enumerate(files):
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, carry_bytes, first = "", 0, True
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_chars)
                buf = carry + decoder.decode(raw, final=not raw)
                nbytes = carry_bytes + len(raw)
                cut = _cut(buf, raw, chunk_chars)
                if cut == 0 and raw:
                    carry, carry_bytes = buf, nbytes
                    continue
                head_bytes = len(buf[:cut].encode("utf-8"))
                if cut or (first and doc > 0):  # an empty document still gets its separator
                    yield from _split_at(doc, buf[:cut], first, seen, head_bytes, val_from)
                    first = False
                seen += head_bytes
                carry, carry_bytes = buf[cut:], nbytes - head_bytes
                if not raw:
                    break


def _cut(buf: str, raw: bytes, chunk_chars: int) -> int:
    if not raw:
        return len(buf)  # end of file: everything left
    cut = data._safe_cut(buf)
    if not cut and len(buf) > 2 * chunk_chars:
        cut = len(buf)  # no safe cut in sight: bound memory, risk one token (as tokenize_to_file)
    return cut


def _split_at(
    doc: int, text: str, first: bool, start: int, nbytes: int, val_from: int
) -> list[Piece]:
    """One piece, or two when the train/validation boundary falls inside `text`."""
    if start >= val_from or start + nbytes <= val_from:
        split = "val" if start >= val_from else "train"
        return [Piece(doc, split, text, first and doc > 0, nbytes)]
    at = int((val_from - start) / nbytes * len(text))  # chars ~ bytes for the boundary
    # No safe cut after the boundary: cut there anyway (may change one token, as `_cut`).
    cut = _safe_cut_from(text, at) or at
    head, tail = text[:cut], text[cut:]
    head_bytes = len(head.encode("utf-8"))
    out = [Piece(doc, "train", head, first and doc > 0, head_bytes)]
    if tail:
        out.append(Piece(doc, "val", tail, False, nbytes - head_bytes))
    return out


def _encode(piece: Piece) -> tuple[Piece, np.ndarray]:
    """Pool task: the piece's ids (uint16), with the document separator when it starts one.

    No special tokens in the text (as `encode_ordinary`): text that spells "<|endoftext|>"
    stays text; only the separators we insert are the special token. `encode_to_numpy`
    skips building a Python list of ints.
    """
    ids = tokenizer.get_encoding().encode_to_numpy(piece.text, disallowed_special=())
    if piece.eot_first:
        ids = np.concatenate([np.array([tokenizer.ENDOFTEXT_ID], ids.dtype), ids])
    return Piece(piece.doc, piece.split, "", piece.eot_first, piece.nbytes), ids.astype(DTYPE)


@dataclass
class _ShardWriter:
    """Appends ids to `<split>_NNNNN.bin.tmp`; a full shard is renamed, then its sidecar
    written, so a shard with a sidecar is always whole."""

    out: Path
    split: str
    shard_tokens: int
    sources: list[str]
    names: list[str] = field(default_factory=list)
    tokens: int = 0
    _file: Any = None
    _count: int = 0
    _docs: set[int] = field(default_factory=set)

    def write(self, ids: np.ndarray, doc: int) -> None:
        while len(ids):
            if self._file is None:
                self._file = open(self._path().with_suffix(".bin.tmp"), "wb")  # noqa: SIM115
            take = min(len(ids), self.shard_tokens - self._count)
            self._file.write(ids[:take].tobytes())
            self._count, self.tokens, ids = self._count + take, self.tokens + take, ids[take:]
            self._docs.add(doc)
            if self._count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        path = self._path()
        path.with_suffix(".bin.tmp").replace(path)
        side = {
            "dtype": DTYPE.name, "tokens": self._count, "tokenizer": "gpt2",
            "split": self.split, "sources": [self.sources[d] for d in sorted(self._docs)],
        }  # fmt: skip
        _write_json(path.with_suffix(".json"), side)
        self.names.append(path.name)
        self._file, self._count, self._docs = None, 0, set()

    def _path(self) -> Path:
        return self.out / f"{self.split}_{len(self.names):05d}.bin"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _check_out(out: Path) -> None:
    """Refuse a finished dataset or a folder with others' files; clear our own leftovers."""
    if (out / data.DATASET_FILE).exists():
        raise ValueError(f"{str(out)!r} already holds a prepared dataset; pass a new --out")
    if not out.exists():
        out.mkdir(parents=True)
        return
    others = [p.name for p in out.iterdir() if not p.name.startswith(_OURS)]
    if others:
        raise ValueError(f"--out {str(out)!r} holds other files ({others[:3]}); pass an empty one")
    for p in out.iterdir():  # an interrupted run's shards: never part of a dataset.json
        p.unlink()


def prepare(
    inputs: list[str],
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    chunk_chars: int = CHUNK_CHARS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tokenise `inputs` (files or folders) into `out`: uint16 shards + `dataset.json`.

    Memory stays bounded whatever the corpus size: at most `2 * workers + 4` pieces of
    `chunk_chars` are in flight. `progress(nbytes)` is called as input bytes are done.

    Returns:
      The `dataset.json` contents (shard names, token counts, tokens_per_sec, ...).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    for name, v in (("shard_tokens", shard_tokens), ("chunk_chars", chunk_chars)):
        if v <= 0:
            raise ValueError(f"{name}={v} must be positive")
    files = input_files(inputs)
    out = Path(out)
    _check_out(out)
    workers = workers or os.cpu_count() or 1
    sources = [str(p) for p in files]
    writers = {s: _ShardWriter(out, s, shard_tokens, sources) for s in ("train", "val")}
    tokenizer.get_encoding()  # fail early on bad vocab files; forked workers inherit it
    start = time.perf_counter()
    for piece, ids in _run_pool(pieces(files, val_fraction, chunk_chars), workers):
        writers[piece.split].write(ids, piece.doc)
        if progress is not None:
            progress(piece.nbytes)
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - start
    n = sum(w.tokens for w in writers.values())
    index = {
        "format": data.DATASET_FORMAT, "dtype": DTYPE.name, "tokenizer": "gpt2",
        "separator": tokenizer.ENDOFTEXT, "val_fraction": val_fraction, "sources": sources,
        "train": writers["train"].names, "val": writers["val"].names,
        "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
        "seconds": seconds, "tokens_per_sec": n / seconds if seconds else 0.0, "workers": workers,
    }  # fmt: skip
    _write_json(out / data.DATASET_FILE, index)  # last: marks the dataset complete
    return index


def _run_pool(tasks: Iterator[Piece], workers: int) -> Iterator[tuple[Piece, np.ndarray]]:
    """`_encode` over `tasks` in order, with a bounded number in flight (Pool.imap alone
    would read the whole input ahead)."""
    slots = threading.BoundedSemaphore(2 * workers + 2)

    def gated() -> Iterator[Piece]:
        for task in tasks:
            slots.acquire()
            yield task

    if workers == 1:
        for task in tasks:
            yield _encode(task)
        return
    # fork: workers inherit the built encoding at no cost. Forking a process that runs JAX's
    # threads is unsafe, so from such a caller: forkserver (each worker builds its own).
    method = "forkserver" if "jax" in sys.modules else "fork"
    with mp.get_context(method).Pool(workers) as pool:
        for result in pool.imap(_encode, gated()):
            slots.release()
            yield result
