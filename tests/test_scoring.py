"""Scoring a text (jaxgpt.scoring, scripts/evaluate.py): the windows score every token but the
first exactly once, and the loss equals Hugging Face's documented strided-perplexity loop run
with transformers itself on the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pretrained import hf_model

from jaxgpt import data, scoring, tokenizer
from jaxgpt.commands.evaluate import main as evaluate_main
from jaxgpt.commands.prepare import main as prepare_main

CTX = 31  # windows of 31 inputs: HF's loop feeds 32 tokens (n_positions of the model)


@pytest.mark.parametrize(
    ("n", "ctx", "stride"),
    [(2, 4, 4), (5, 4, 4), (6, 4, 4), (100, 16, 16), (100, 16, 5), (17, 16, 1)],
)
def test_windows_score_each_token_once(n: int, ctx: int, stride: int) -> None:
    w = scoring.windows(n, ctx, stride)
    seen = np.zeros(n, int)
    for s, length, first in zip(w.starts, w.lengths, w.first, strict=True):
        assert 1 <= length <= ctx and 0 <= first < length and s % stride == 0
        seen[s + 1 + first : s + 1 + length] += 1  # positions of the scored targets
    assert seen[0] == 0 and (seen[1:] == 1).all() and w.scored == n - 1
    assert w.starts[-1] + w.lengths[-1] == n - 1  # the last window ends with the text


def test_window_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        scoring.windows(1, 4, 4)
    with pytest.raises(ValueError, match=r"--stride 5 must be in 1\.\.4"):
        scoring.windows(10, 4, 5)


def test_text_bytes_are_the_utf8_bytes(verdict_text: str) -> None:
    text = verdict_text[:2000] + " caf\u00e9 \u2014 \u4e2d\u6587" + tokenizer.ENDOFTEXT + "end"
    ids = tokenizer.encode_array(text)
    assert scoring.text_bytes(ids, 50257) == len(text.encode("utf-8"))
    with pytest.raises(ValueError, match="outside the model's vocabulary of 97"):
        scoring.text_bytes(ids, 97)


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("transformers")
    model = hf_model(seed=3)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("text") / "verdict.txt"
    path.write_text(verdict_text[:1500], encoding="utf-8")
    return path


def _hf_strided_nll(model, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:  # noqa: ANN001
    """Hugging Face's documented loop ("Perplexity of fixed-length models", transformers docs),
    summing the loss over the tokens it scores: (total nats, scored tokens)."""
    import torch

    input_all = torch.as_tensor(ids[None].astype(np.int64))
    seq_len, prev_end, nll_sum, n_tokens = input_all.size(1), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # may differ from stride on the last loop
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss  # mean over the shifted labels
        # The labels the model scores after its shift by one (the doc's snippet subtracts the
        # batch size instead, one token too many when the first label is already masked).
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        if num_loss_tokens > 0:
            nll_sum += float(loss) * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.torch
@pytest.mark.parametrize("stride", [CTX, 8])
def test_evaluate_equals_transformers(hf, text: Path, capsys, stride: int, compiles) -> None:
    model, path = hf
    args = ["--weights", str(path), "--data", str(text), "--context-length", str(CTX)]
    assert evaluate_main([*args, "--stride", str(stride), "--batch-size", "4", "--json"]) == 0
    # The scoring program compiled while the text loaded, off the main thread (at most once:
    # the second stride reuses the first's program).
    assert [t for t, p in compiles if p == "jit(step)"] in (["jaxgpt-compile_0"], [])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tokenizer.encode_array(text.read_text(encoding="utf-8"))
    # HF's window is max_length tokens, the first of which is context only: CTX + 1.
    want_nats, want_tokens = _hf_strided_nll(model, ids, CTX + 1, stride)
    assert got["tokens"] == want_tokens == len(ids) - 1
    # fp32 forward passes in a different order of operations: observed ~1e-7 relative.
    assert got["nats"] == pytest.approx(want_nats, rel=1e-5)
    assert got["loss"] == pytest.approx(want_nats / want_tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want_nats / want_tokens), rel=1e-5)
    nbytes = len(text.read_text(encoding="utf-8").encode("utf-8"))
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(want_nats / math.log(2) / nbytes, rel=1e-5)


@pytest.mark.torch
def test_token_files_score_as_their_text(hf, text: Path, tmp_path: Path, capsys) -> None:
    """--data takes what train.py --data takes: a .bin token file, a folder of .txt files and
    a folder of prepared shards score as the text does (the whole of it: train and
    validation shards in their order)."""
    _, path = hf
    figures = []
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(text.read_text(encoding="utf-8"), encoding="utf-8")
    data.tokenize_to_file(text, tmp_path / "tokens.bin")
    assert prepare_main([str(text), "--out", str(tmp_path / "shards"), "--quiet"]) == 0
    assert data.is_token_shards(tmp_path / "shards")
    for spec in (text, tmp_path / "tokens.bin", folder, tmp_path / "shards"):
        assert evaluate_main(["--weights", str(path), "--data", str(spec), "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len({(f["tokens"], f["nats"], f["bytes"]) for f in figures[:3]}) == 1, figures
    # prepare_data cuts train from validation by bytes and encodes the two apart (as train.py
    # splits a text): the same bytes, here one token more, all of them scored.
    shards = data.load_tokens(str(tmp_path / "shards"), cache_dir=tmp_path)
    assert figures[3]["bytes"] == figures[0]["bytes"] and figures[3]["tokens"] == len(shards) - 1
    assert figures[0]["context_length"] == 32 and figures[0]["stride"] == 32  # the model's


@pytest.mark.torch
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--context-length", "33"], ["--context-length 33", "context of 32", "at most 32"]),
        (["--stride", "40"], ["--stride 40 must be in 1..32"]),
        (["--stride", "9", "--context-length", "8"], ["--stride 9", "--context-length 8"]),
        (["--batch-size", "0"], ["--batch-size 0 must be at least 1"]),
    ],
)
def test_evaluate_bad_input(hf, text: Path, tmp_path: Path, capsys, extra, needles) -> None:
    _, path = hf
    before = sorted(tmp_path.rglob("*"))
    assert evaluate_main(["--weights", str(path), "--data", str(text), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    assert sorted(tmp_path.rglob("*")) == before


def test_evaluate_missing_weights(tmp_path: Path, text: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert evaluate_main(["--weights", str(missing), "--data", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--weights '{missing}' does not exist" in err, err
