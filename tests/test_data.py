"""Data: the book's windows and split, batching, seeded shuffle, resume position, token files."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import data, tokenizer


@pytest.fixture(scope="module")
def verdict_ids(verdict_text: str) -> np.ndarray:
    return tokenizer.encode_array(verdict_text)


@pytest.mark.torch
@pytest.mark.parametrize("max_length,stride", [(256, 256), (4, 1), (16, 7), (32, 64)])
def test_windows_equal_book_dataset(verdict_text: str, max_length: int, stride: int) -> None:
    from llms_from_scratch.ch02 import GPTDatasetV1

    # The book splits characters 90/10, then tokenises each part (ch. 5).
    for part in data.split_text(verdict_text, 0.9):
        book = GPTDatasetV1(part, tokenizer.get_encoding(), max_length, stride)
        ids = tokenizer.encode_array(part)
        starts = data.window_starts(len(ids), max_length, stride)
        assert len(starts) == len(book)
        inputs, targets = data.gather_windows(ids, starts, max_length)
        assert inputs.dtype == np.int32 and inputs.shape == (len(book), max_length)
        np.testing.assert_array_equal(inputs, np.stack([x.numpy() for x in book.input_ids]))
        np.testing.assert_array_equal(targets, np.stack([y.numpy() for y in book.target_ids]))


def test_split_is_book_character_split(verdict_text: str) -> None:
    train, val = data.split_text(verdict_text)
    split_idx = int(0.9 * len(verdict_text))  # the book's line
    assert train == verdict_text[:split_idx] and val == verdict_text[split_idx:]


@pytest.mark.torch
@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_count_and_order_equal_torch_dataloader(
    verdict_ids: np.ndarray, drop_last: bool
) -> None:
    import torch
    from llms_from_scratch.ch02 import GPTDatasetV1

    text = tokenizer.decode(verdict_ids)
    book = GPTDatasetV1(text, tokenizer.get_encoding(), 8, 5)
    loader = torch.utils.data.DataLoader(book, batch_size=3, shuffle=False, drop_last=drop_last)
    ours = list(data.batches(verdict_ids, 3, 8, 5, shuffle=False, drop_last=drop_last))
    assert len(ours) == len(loader)
    for (x, y), (bx, by) in zip(ours, loader, strict=True):
        np.testing.assert_array_equal(x, bx.numpy())
        np.testing.assert_array_equal(y, by.numpy())


def test_drop_last_and_partial_batch() -> None:
    tokens = np.arange(100, dtype=np.int32)
    # windows start at 0, 10, ..., 90 - 1 < 90: range(0, 90, 10) -> 9 windows
    assert len(data.window_starts(100, 10, 10)) == 9
    kept = list(data.batches(tokens, 4, 10, 10, shuffle=False, drop_last=True))
    assert [x.shape for x, _ in kept] == [(4, 10), (4, 10)]
    full = list(data.batches(tokens, 4, 10, 10, shuffle=False, drop_last=False))
    assert [x.shape for x, _ in full] == [(4, 10), (4, 10), (1, 10)]
    x, y = full[-1]
    np.testing.assert_array_equal(x[0], np.arange(80, 90))
    np.testing.assert_array_equal(y[0], np.arange(81, 91))  # shifted by one


def test_seeded_shuffle_is_reproducible_and_a_permutation() -> None:
    tokens = np.arange(1000, dtype=np.int32)

    def firsts(seed: int, epoch: int) -> list[int]:
        pos = data.DataPosition(epoch=epoch, seed=seed)
        return [
            int(v)
            for x, _ in data.batches(tokens, 5, 10, 10, seed=seed, drop_last=False, position=pos)
            for v in x[:, 0]
        ]

    a = firsts(7, 0)
    assert a == firsts(7, 0)
    assert a != firsts(7, 1) and a != firsts(8, 0)
    assert sorted(a) == list(range(0, 990, 10))  # every window once per epoch
    expected = np.random.default_rng((7, 0)).permutation(99) * 10
    np.testing.assert_array_equal(a, expected)


def test_position_resumes_with_the_same_next_batch() -> None:
    tokens = np.arange(500, dtype=np.int32)
    pos = data.DataPosition(seed=3)
    whole = [x for x, _ in data.batches(tokens, 4, 8, 8, seed=3, position=pos)]
    assert pos == data.DataPosition(epoch=1, batch=0, seed=3)
    pos = data.DataPosition(seed=3)
    it = data.batches(tokens, 4, 8, 8, seed=3, position=pos)
    head = [next(it) for _ in range(5)][-1][0]
    assert pos.batch == 5
    saved = data.DataPosition.from_dict(pos.to_dict())
    rest = [x for x, _ in data.batches(tokens, 4, 8, 8, seed=3, position=saved)]
    np.testing.assert_array_equal(head, whole[4])
    assert len(rest) == len(whole) - 5
    for got, want in zip(rest, whole[5:], strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="seed"):
        next(data.batches(tokens, 4, 8, 8, seed=4, position=data.DataPosition(seed=3)))


def test_token_file_equals_whole_text_encoding(tmp_path: Path, verdict_text: str) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text(verdict_text, encoding="utf-8")
    (src / "b.txt").write_text("Second  document.\n  indented\nend", encoding="utf-8")
    # Small chunks force many cuts; the ids must not change.
    n = data.tokenize_to_file(src, tmp_path / "tok.bin", chunk_chars=500)
    got = data.open_tokens(tmp_path / "tok.bin")
    assert isinstance(got, np.memmap) and got.dtype == np.uint16 and len(got) == n
    whole = tokenizer.encode_array(data.read_text(src))
    np.testing.assert_array_equal(got, whole)
    x_mm, y_mm = next(data.batches(got, 2, 16, 16, seed=1))
    x_np, y_np = next(data.batches(whole, 2, 16, 16, seed=1))
    assert x_mm.dtype == np.int32
    np.testing.assert_array_equal(x_mm, x_np)
    np.testing.assert_array_equal(y_mm, y_np)


def test_load_splits_from_token_file_splits_tokens(tmp_path: Path) -> None:
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    splits = data.load_splits(str(tmp_path / "t.bin"), cache_dir=tmp_path)
    np.testing.assert_array_equal(splits.train, np.arange(900))
    np.testing.assert_array_equal(splits.val, np.arange(900, 1000))


def test_sanity_checks_raise_book_messages() -> None:
    short = data.Splits(np.zeros(100, np.int32), np.zeros(300, np.int32))
    with pytest.raises(ValueError, match="Not enough tokens for the training loader"):
        data.check_splits(short, 256, 2, 256)
    short = data.Splits(np.zeros(1000, np.int32), np.zeros(256, np.int32))
    with pytest.raises(ValueError, match="Not enough tokens for the validation loader"):
        data.check_splits(short, 256, 2, 256)
    data.check_splits(data.Splits(np.zeros(1000, np.int32), np.zeros(257, np.int32)), 256, 2, 256)


def test_pydoc_corpus_is_embedded() -> None:
    text = data.load_text("pydoc", cache_dir="unused")
    assert len(text) > 400_000 and "assignment" in text


def test_missing_path_raises() -> None:
    with pytest.raises(FileNotFoundError, match="no-such"):
        data.load_text("/no-such/file.txt", cache_dir="unused")


def test_verdict_downloads_once_from_base_url(tmp_path: Path, verdict_text: str) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / data.VERDICT_FILE).write_text(verdict_text, encoding="utf-8")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cache = tmp_path / "cache"
        assert data.load_text("the-verdict", cache_dir=cache, base_url=url) == verdict_text
    finally:
        server.shutdown()
        server.server_close()
    # Cached: works with the server gone.
    assert data.load_text("the-verdict", cache_dir=cache, base_url=url) == verdict_text


def test_verdict_offline_suggests_data_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data PATH"):
        data.load_text("the-verdict", cache_dir=tmp_path, base_url="http://127.0.0.1:9")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_default_prompt_is_the_books_or_the_corpus_own() -> None:
    assert data.default_prompt("the-verdict") == "Every effort moves you"
    assert data.default_prompt("/some/file.txt") == "Every effort moves you"
    assert data.default_prompt("pydoc") in data.pydoc_text()
