"""`scripts/train.py --init-from` and `--trainable`, through the command line (its `main`, in
process): the first evaluation is the source model's loss by transformers on the same windows,
training lowers it, a frozen fine-tune resumes bit for bit with its frozen leaves untouched
and optimizer state for its trainable ones only; bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from pretrained import OPENAI_DIR, book_model, hf_model, openai_as_hf, token_nats

import jaxgpt.interop as interop
from jaxgpt import checkpoint, finetune, metrics, parallel, tokenizer
from jaxgpt.commands.train import main as train_main
from jaxgpt.interop.reference import reference_model
from jaxgpt.model import flatten_params, init_params

FROZEN_CHOICE = "(trf_blocks_1|final_norm)/.*"  # the fixture's head is tied to tok_emb


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "verdict.txt"
    path.write_text(verdict_text[:8000], encoding="utf-8")  # ~1.8k tokens: 12 batches of 4x32
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _args(corpus: Path, out: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--init-from", str(OPENAI_DIR), "--data", str(corpus), "--out", str(out),
        "--batch-size", "4", "--max-steps", str(steps), "--eval-freq", "2", "--eval-iter", "2",
        "--sample-tokens", "2", "--checkpoint-every", "3", "--lr", "3e-3",
        "--cache-dir", str(cache), *extra,
    ]  # fmt: skip


def _first_eval(stdout: str) -> tuple[float, float]:
    """The untrained evaluation the run printed (the book's two lines), full precision."""
    train = re.search(r"^Training loss: (\S+)$", stdout, re.MULTILINE)
    val = re.search(r"^Validation loss: (\S+)$", stdout, re.MULTILINE)
    return float(train[1]), float(val[1])


def _book_eval(model, ids: list[int], ctx: int, batch: int, n: int, drop_last: bool) -> float:  # noqa: ANN001
    """The book's calc_loss_loader over GPTDatasetV1 windows (stride = ctx, no shuffle): the
    mean of the first `n` batches' mean token losses, by a torch model."""
    starts = list(range(0, len(ids) - ctx, ctx))
    rows = [(ids[i : i + ctx], ids[i + 1 : i + ctx + 1]) for i in starts]
    cut = len(rows) - len(rows) % batch if drop_last else len(rows)
    chunks = [rows[i : i + batch] for i in range(0, cut, batch)][:n]
    losses = [token_nats(model, *map(np.array, zip(*c, strict=True))).mean() for c in chunks]
    return float(np.mean(losses))


def _opt_paths(run: Path, step: int) -> list[str]:
    """Param paths under the AdamW moment `mu` in a checkpoint, read without a target."""
    with checkpoint.manager(run, read_only=True) as mngr:
        raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path(raw["state"]["opt_state"])[0]
    out = []
    for path, _ in flat:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if "mu" in keys:
            out.append("/".join(keys[keys.index("mu") + 1 :]))
    return sorted(out)


@pytest.mark.torch
def test_frozen_finetune_from_openai(tmp_path: Path, corpus, cache, capsys) -> None:
    """--init-from an OpenAI checkpoint with --trainable: the first evaluation is the source's
    loss, training lowers it, the frozen leaves stay the source's, only the trainable ones
    have optimizer state, and a stopped run resumed equals the unbroken one bit for bit."""
    source_dir = (tmp_path / "gpt2-tiny").resolve()  # a copy, deleted before the resume
    shutil.copytree(OPENAI_DIR, source_dir)
    frozen = ("--init-from", str(source_dir), "--trainable", FROZEN_CHOICE, "--drop-rate", "0.1")
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert train_main(_args(corpus, unbroken, cache, 6, *frozen)) == 0
    start = capsys.readouterr().out
    train0, val0 = _first_eval(start)
    # The bar: transformers' loss of the same weights (mapped by hand from the TF arrays) on
    # the same windows, 1e-5 relative (fp32 in another order of operations: observed ~1e-7).
    text = corpus.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))  # the book's split by characters
    hf = openai_as_hf()
    want_train = _book_eval(hf, tokenizer.encode(text[:cut]), 32, 4, 2, drop_last=True)
    want_val = _book_eval(hf, tokenizer.encode(text[cut:]), 32, 4, 2, drop_last=False)
    assert train0 == pytest.approx(want_train, rel=1e-5)
    assert val0 == pytest.approx(want_val, rel=1e-5)
    assert metrics.read_rows(unbroken / metrics.METRICS_FILE)[-1]["val_loss"] < val0 - 0.01
    fingerprint = checkpoint.fingerprint(interop.load(OPENAI_DIR)[1])
    assert f"Initialised from {source_dir} (openai, fingerprint {fingerprint})" in start
    # 872 in the last block, 16 in the final norm; AdamW's mu and nu: 2 x 4 bytes each.
    assert "Trainable parameters: 888 of 404,072; optimizer state 7.0 KiB (3.1 MiB saved" in start
    assert train_main(_args(corpus, broken, cache, 3, *frozen)) == 0
    shutil.rmtree(source_dir)  # a resume reads its checkpoint, never the source
    assert train_main(["--resume", "--out", str(broken), "--max-steps", "6"]) == 0
    assert "from step 3" in capsys.readouterr().out
    got, want = (
        metrics.read_rows(broken / "metrics.jsonl"),
        metrics.read_rows(unbroken / "metrics.jsonl"),
    )
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 3, 5, 6]
    for g, w in zip(got, want, strict=True):
        assert (g["train_loss"], g["val_loss"], g["grad_norm"]) == (
            w["train_loss"], w["val_loss"], w["grad_norm"],
        )  # fmt: skip
    # The checkpoints hold the same params; the frozen ones are the source's, bit for bit.
    source = flatten_params(interop.load(OPENAI_DIR)[1])
    a, b = (flatten_params(checkpoint.load_run(r)[1]) for r in (unbroken, broken))
    trainable = sorted(p for p in source if re.fullmatch(FROZEN_CHOICE, p))
    assert len(trainable) == 18  # 16 in a block with QKV biases, 2 in the final norm
    for path in source:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
        moved = not np.array_equal(a[path], source[path])
        assert moved == (path in trainable), path
    assert _opt_paths(broken, 6) == trainable  # optimizer state for the trainable only
    saved = json.loads((broken / checkpoint.CONFIG_FILE).read_text())  # rewritten by --resume
    assert saved["train"]["trainable"] == FROZEN_CHOICE and saved["model"]["emb_dim"] == 8
    assert saved["init_from"] == {
        "source": str(source_dir), "format": "openai", "fingerprint": fingerprint,
    }  # fmt: skip


def test_place_puts_each_shard_on_its_device() -> None:
    """On an fsdp mesh the weights go to the devices shard by shard: each device holds its
    slice of every sharded leaf (never the whole leaf), equal to the source's."""
    source = finetune.load_source(str(OPENAI_DIR))
    config = finetune.model_config(source, context_length=16, scan_layers=True, vocab_pad=64)
    mesh = parallel.make_mesh("fsdp=2")
    like = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shardings = parallel.tree_shardings(like, mesh)
    params = finetune.place(source, config, shardings)
    emb = params["tok_emb"]["embedding"]  # (50304, 8): padded to 64, split over 2 devices
    assert emb.shape == (50304, 8) and emb.sharding == shardings["tok_emb"]["embedding"]
    pieces = sorted(emb.addressable_shards, key=lambda s: s.index[0].start or 0)
    assert [p.data.shape for p in pieces] == [(25152, 8), (25152, 8)]
    whole = np.pad(source.params["tok_emb/embedding"], ((0, 47), (0, 0)))
    np.testing.assert_array_equal(np.concatenate([np.asarray(p.data) for p in pieces]), whole)
    stacked = np.asarray(params["trf_blocks"]["ff"]["layers_0"]["kernel"])  # (layers, 8, 32)
    np.testing.assert_array_equal(stacked[1], source.params["trf_blocks_1/ff/layers_0/kernel"])
    np.testing.assert_array_equal(
        np.asarray(params["pos_emb"]["embedding"]), source.params["pos_emb/embedding"][:16]
    )


# ----------------------------------------------------------------------------- bad input


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--emb-dim", "16"], ["--emb-dim 16 contradicts", "(emb_dim=8)", "drop it"]),
        (["--n-layers", "3"], ["--n-layers 3 contradicts", "(n_layers=2)"]),
        (["--model", "gpt2"], ["--model gpt2 (context_length=1024) contradicts", "=32)"]),
        (["--context-length", "64"], ["--context-length 64 is longer", "at most 32"]),
        (["--trainable", "out_head"], ["--trainable 'out_head' matches no parameter path"]),
        (["--trainable", "(open"], ["--trainable '(open' is not a regular expression"]),
        (["--resume"], ["--init-from", "--resume", "pass only one of them"]),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, corpus, cache, capsys, extra, needles) -> None:
    before = _listing(tmp_path)
    assert train_main(_args(corpus, tmp_path / "run", cache, 2, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    assert _listing(tmp_path) == before  # nothing written


def test_missing_source_is_one_line(tmp_path: Path, corpus, cache, capsys) -> None:
    args = _args(corpus, tmp_path / "run", cache, 2)
    args[1] = str(tmp_path / "no-such-model")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err and "does not exist" in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- slow


def _source(kind: str, tmp: Path, cache: Path, corpus: Path):  # noqa: ANN202
    """(path, extra flags, torch reference model) of a source of `kind`, written by its own
    library (transformers' save_pretrained, torch.save of the book's model) or by jaxgpt."""
    import torch

    if kind == "openai":
        return OPENAI_DIR, [], openai_as_hf()
    if kind == "book-pth":
        model = book_model(seed=2)
        torch.save(model.state_dict(), tmp / "model.pth")
        return tmp / "model.pth", ["--n-heads", "2"], model
    model = hf_model(seed=1)
    model.save_pretrained(tmp / "hf")
    if kind == "hf-folder":
        return tmp / "hf", [], model
    if kind == "hf-safetensors":  # the bare weights file does not say n_heads
        return tmp / "hf" / "model.safetensors", ["--n-heads", "2"], model
    cfg, params = interop.load(tmp / "hf")
    if kind == "jaxgpt-npz":
        checkpoint.save_params(tmp / "params.npz", cfg, params)
        return tmp / "params.npz", [], model
    run = tmp / "pre"  # a jaxgpt run folder: one step from the HF weights
    assert train_main(_args(corpus, run, cache, 1, "--init-from", str(tmp / "hf"))) == 0
    cfg, params = checkpoint.load_run(run)
    return run, [], reference_model("jaxgpt", run, cfg, params)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize(
    "kind", ["openai", "hf-folder", "hf-safetensors", "book-pth", "jaxgpt-npz", "jaxgpt-run"]
)
def test_init_from_each_source_kind(kind: str, tmp_path: Path, corpus, cache, capsys) -> None:
    path, extra, model = _source(kind, tmp_path, cache, corpus)
    capsys.readouterr()
    out = tmp_path / "run"
    args = _args(corpus, out, cache, 6, *extra)
    args[1] = str(path)  # --init-from
    assert train_main(args) == 0
    train0, val0 = _first_eval(capsys.readouterr().out)
    text = corpus.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    want_train = _book_eval(model, tokenizer.encode(text[:cut]), 32, 4, 2, drop_last=True)
    want_val = _book_eval(model, tokenizer.encode(text[cut:]), 32, 4, 2, drop_last=False)
    assert train0 == pytest.approx(want_train, rel=1e-5)
    assert val0 == pytest.approx(want_val, rel=1e-5)
    assert metrics.read_rows(out / metrics.METRICS_FILE)[-1]["val_loss"] < val0


@pytest.mark.slow
@pytest.mark.torch
def test_scanned_fsdp_frozen_finetune_resumes_on_another_layout(
    tmp_path: Path, corpus, cache, capsys
) -> None:
    """A frozen fine-tune on an fsdp mesh with scanned, rematerialised layers, XLA attention, a
    padded vocabulary and a shorter context starts at the source's loss and resumes unrolled
    on a data mesh: the same run as one left unbroken (float32 in another order: rtol 1e-5)."""
    switches = ("--trainable", FROZEN_CHOICE, "--context-length", "16", "--vocab-pad", "64")
    first = ("--mesh", "fsdp=2", "--scan-layers", "--remat", "block", "--attention", "xla")
    first = (*first, *switches)
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert train_main(_args(corpus, unbroken, cache, 6, *first)) == 0
    train0, val0 = _first_eval(capsys.readouterr().out)
    text = corpus.read_text(encoding="utf-8")
    hf = openai_as_hf()
    want_val = _book_eval(hf, tokenizer.encode(text[int(0.9 * len(text)) :]), 16, 4, 2, False)
    assert val0 == pytest.approx(want_val, rel=1e-5)
    assert train_main(_args(corpus, broken, cache, 3, *first)) == 0
    resume = ["--resume", "--out", str(broken), "--max-steps", "6", "--no-scan-layers"]
    assert train_main([*resume, "--mesh", "data=2"]) == 0
    got, want = (metrics.read_rows(r / metrics.METRICS_FILE) for r in (broken, unbroken))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for k in ("train_loss", "val_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=0), (g["step"], k)
    source = flatten_params(interop.load(OPENAI_DIR)[1])
    final = flatten_params(checkpoint.load_run(broken)[1])
    for path in source:  # frozen: bit for bit (the position table cut to 16, the vocab padded)
        if not re.fullmatch(FROZEN_CHOICE, path):
            want = source[path][:16] if path == "pos_emb/embedding" else source[path]
            np.testing.assert_array_equal(final[path][: len(want)], want, err_msg=path)


@pytest.mark.slow
@pytest.mark.torch
def test_fit_reads_the_source_itself(tmp_path: Path, corpus) -> None:
    """The Python way in: `fit` with `TrainConfig.init_from` and no `source` loads it."""
    from jaxgpt.config import TrainConfig
    from jaxgpt.train import fit

    config = finetune.model_config(finetune.load_source(str(OPENAI_DIR)), drop_rate=0.0)
    tc = TrainConfig(
        data=str(corpus), out=str(tmp_path / "run"), init_from=str(OPENAI_DIR), batch_size=4,
        max_steps=2, eval_iter=2, sample_tokens=1, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    events = {}
    fit(config, tc, on_event=lambda name, e: events.setdefault(name, e), progress=False)
    text = corpus.read_text(encoding="utf-8")
    want = _book_eval(
        openai_as_hf(), tokenizer.encode(text[int(0.9 * len(text)) :]), 32, 4, 2, False
    )
    assert events["untrained"]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert events["start"]["init_from"]["format"] == "openai"
    with pytest.raises(ValueError, match="emb_dim=16 does not fit the weights"):
        fit(config.replace(emb_dim=16), tc.replace(out=str(tmp_path / "other")))
