"""Faults a long run meets: divergence, damaged checkpoints, torn metrics, a second run into
the same folder, stale locks, stop signals (and a second one during the save), a full disk.

Each uses the real parts (Orbax files on disk, real signals, a real small filesystem)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import checkpoint, metrics, runguard
from jaxgpt.config import TrainConfig
from jaxgpt.optim import apply_gradients, make_optimizer, skip_nonfinite
from jaxgpt.step import init_train_state
from jaxgpt.train import fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"


def _equal(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- divergence


def _sgd_guard(max_in_row: int) -> optax.GradientTransformationExtraArgs:
    return skip_nonfinite(optax.chain(optax.scale_by_adam(), optax.scale(-0.1)), max_in_row)


@pytest.mark.parametrize("max_in_row,halt_loss", [(0, 1.0), (1, np.inf), (2, 1.0)])
def test_skip_nonfinite_refuses_bad_updates_and_latches(max_in_row: int, halt_loss: float):
    params = {"w": jnp.arange(3.0)}
    tx, plain = _sgd_guard(max_in_row), optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    state, plain_state = tx.init(params), plain.init(params)
    good, bad = {"w": jnp.ones(3)}, {"w": jnp.array([1.0, jnp.nan, 1.0])}
    # A finite update is exactly the inner chain's.
    u, state = tx.update(good, state, params, loss=jnp.float32(2.0))
    pu, plain_state = plain.update(good, plain_state, params)
    _equal(u, pu)
    _equal(state.inner_state, plain_state)
    # Bad updates (nan gradient, or an inf loss with finite gradients) change nothing...
    for i, (g, loss) in enumerate([(bad, 1.0), (good, np.inf)] * 2):
        u, state = tx.update(g, state, params, loss=jnp.float32(loss))
        _equal(u, {"w": jnp.zeros(3)})
        _equal(state.inner_state, plain_state)
        assert int(state.bad_in_row) == i + 1 and int(state.skipped) == i + 1
        # ...and past max_in_row in a row the guard halts at that update (1-based count).
        halted = i + 1 > max_in_row
        assert int(state.halted_at) == (2 + max_in_row if halted else 0)
    assert float(state.halted_loss) == halt_loss  # the loss of the update that halted
    # Once halted, even a finite update is refused: params can never move again.
    u, state = tx.update(good, state, params, loss=jnp.float32(1.0))
    _equal(u, {"w": jnp.zeros(3)})


def test_apply_gradients_adds_inside_the_guard_as_update_then_apply_would():
    """The train step's path: taken updates land as update + apply_updates (float rounding
    aside: the addition is fused into the last pass), refused ones leave params as they were."""
    params = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    tx, plain = _sgd_guard(3), optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    state, plain_state = tx.init(params), plain.init(params)
    good = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([1.0, -3.0])}
    new, state = apply_gradients(tx, good, state, params, loss=jnp.float32(1.0))
    pu, plain_state = plain.update(good, plain_state, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7, atol=0),
        new,
        optax.apply_updates(params, pu),
    )
    assert not np.allclose(new["w"], params["w"])  # it moved
    _equal(state.inner_state, plain_state)
    bad = {"w": jnp.array([0.5, jnp.nan, 2.0]), "b": jnp.ones(2)}
    kept, state = apply_gradients(tx, bad, state, new, loss=jnp.float32(1.0))
    _equal(kept, new)  # bit for bit
    _equal(state.inner_state, plain_state)
    assert int(state.skipped) == 1
    # Without the guard it is update + apply_updates.
    sgd = optax.sgd(0.5)
    moved, _ = apply_gradients(sgd, good, sgd.init(params), params)
    _equal(moved, jax.tree.map(lambda p, g: p - 0.5 * g, params, good))


@pytest.mark.parametrize(
    "grad,refused",
    [
        ([1.0, 3e19, 1.0], True),  # finite, but (3e19)^2 = 9e38 > float32 max 3.4e38
        ([1.0, 1e19, 1.0], False),  # 1e38 fits: taken, as torch's AdamW takes it
        ([1.0, -np.inf, 1.0], True),
    ],
)
def test_skip_nonfinite_refuses_gradients_whose_norm_overflows(grad: list, refused: bool):
    """The guard checks the global norm: a gradient whose square overflows float32 is refused,
    since AdamW's second moment (g^2) would be inf and freeze that weight for good."""
    params = {"w": jnp.zeros(3)}
    tx = _sgd_guard(5)
    state = tx.init(params)
    u, state = tx.update({"w": jnp.asarray(grad, jnp.float32)}, state, params)
    assert int(state.skipped) == int(refused)
    assert bool(jnp.all(u["w"] == 0)) == refused


def test_skip_nonfinite_tolerates_isolated_bad_steps() -> None:
    params = {"w": jnp.arange(3.0)}
    tx = _sgd_guard(1)
    state = tx.init(params)
    bad = {"w": jnp.full(3, jnp.inf)}
    for g in [bad, {"w": jnp.ones(3)}, bad, {"w": jnp.ones(3)}]:  # never 2 in a row
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    assert int(state.halted_at) == 0 and int(state.skipped) == 2
    assert bool(jnp.all(jnp.isfinite(params["w"])))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, verdict_text: str) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")  # ~680 tokens: 10 steps per epoch
    return str(path)


def _tc(corpus: str, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=corpus, out=str(out), batch_size=4, max_steps=6, eval_freq=3, eval_iter=2,
        checkpoint_every=2, keep=3, sample_tokens=2, lr=2e-3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _like(config, tc: TrainConfig):
    tx = make_optimizer(tc, 10)
    return jax.eval_shape(lambda: init_train_state(config, tx, jax.random.key(0)))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_divergence_stops_naming_step_loss_and_last_good_checkpoint(
    tmp_path: Path, corpus: str, tiny_config
) -> None:
    # lr 1e4 (the reproduction) turns the tiny model's loss nan within a few steps.
    tc = _tc(corpus, tmp_path / "run", lr=1e4, max_steps=40, checkpoint_every=1, eval_freq=5)
    with pytest.raises(runguard.NonFiniteError) as info:
        fit(tiny_config, tc, progress=False)
    e = info.value
    steps = checkpoint.list_steps(tmp_path / "run")
    assert steps and max(steps) < e.step  # nothing saved at or after the bad step
    assert e.last_checkpoint == str(tmp_path / "run" / "checkpoints" / str(max(steps)))
    assert f"at step {e.step} (loss {e.loss})" in str(e) and e.last_checkpoint in str(e)
    with checkpoint.manager(tmp_path / "run") as mngr:
        for s in steps:  # every checkpoint holds finite params and optimizer state
            state, _ = checkpoint.restore(mngr, _like(tiny_config, tc), step=s)
            # (the guard's own halted_loss is nan by design until it halts)
            assert _all_finite(state.params) and _all_finite(state.opt_state.inner_state)
    rows = metrics.read_rows(tmp_path / "run" / metrics.METRICS_FILE)
    assert all(r["step"] < e.step for r in rows)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, corpus: str, tiny_config) -> Path:
    """A finished 6-step tiny run with checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("base") / "run"
    fit(tiny_config, _tc(corpus, out), progress=False)
    assert checkpoint.list_steps(out) == [2, 4, 6]
    return out


def _biggest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, how: str) -> None:
    f = _biggest_file(step_dir)  # an array data file (the embedding's moments)
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "deleted":
        f.unlink()
    elif how == "garbage":
        f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
    elif how == "bitflip":  # decodes fine: only the saved fingerprint can tell
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    elif how == "uncommitted":  # a save killed before Orbax's commit marker
        (step_dir / checkpoint.COMMIT_MARKER).unlink()
    elif how == "garbage_metadata":
        (step_dir / "state" / "_METADATA").write_text("{not json")
    else:
        raise AssertionError(how)


# A failed Orbax read leaves an asyncio callback that may fire later in a worker thread
# ("Event loop is closed"); it does not touch the restored state. Known gap (see README).
ORBAX_LEFTOVERS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning",
    "ignore::pytest.PytestUnraisableExceptionWarning",
)


DAMAGES = ["truncated", "deleted", "garbage", "bitflip", "uncommitted", "garbage_metadata"]


@ORBAX_LEFTOVERS
@pytest.mark.parametrize("how", DAMAGES)
def test_restore_skips_a_damaged_newest_checkpoint(
    tmp_path: Path, base_run: Path, tiny_config, caplog, how: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    like = _like(tiny_config, TrainConfig())
    with checkpoint.manager(run) as mngr:
        want, want_meta = checkpoint.restore(mngr, like, step=4)
    _damage(run / "checkpoints" / "6", how)
    with caplog.at_level(logging.WARNING), checkpoint.manager(run) as mngr:
        got, meta = checkpoint.restore(mngr, like)
    # jaxgpt's own warnings; Orbax's leftover asyncio tasks may log errors of their own.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("jaxgpt")
    ]
    assert len(warnings) == 1 and str(run / "checkpoints" / "6") in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert int(got.step) == 4 and meta == want_meta
    _equal(got.params, want.params)
    _equal(got.opt_state, want.opt_state)
    # Readers (generate.py --weights RUN) skip it the same way.
    _, params = checkpoint.load(run)
    _equal(params, want.params)


@ORBAX_LEFTOVERS
def test_no_intact_checkpoint_is_one_error_naming_the_folder(
    tmp_path: Path, base_run: Path, tiny_config
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for step, how in zip((2, 4, 6), ("truncated", "uncommitted", "garbage"), strict=True):
        _damage(run / "checkpoints" / str(step), how)
    with checkpoint.manager(run) as mngr, pytest.raises(ValueError) as info:
        checkpoint.restore(mngr, _like(tiny_config, TrainConfig()))
    msg = str(info.value)
    assert "no intact checkpoint in" in msg and str(run / "checkpoints") in msg
    assert "\n" not in msg


@ORBAX_LEFTOVERS
def test_resume_past_damage_and_a_torn_metrics_line_equals_an_unbroken_run(
    tmp_path: Path, base_run: Path, corpus: str, tiny_config
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    _damage(run / "checkpoints" / "6", "truncated")
    with open(run / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 7, "epoch": 0.7, "tok')  # killed mid-write
    resumed = fit(tiny_config, _tc(corpus, run, max_steps=9), resume=True, progress=False)
    whole = fit(tiny_config, _tc(corpus, tmp_path / "whole", max_steps=9), progress=False)
    _equal(resumed.state.params, whole.state.params)
    _equal(resumed.state.opt_state, whole.state.opt_state)

    def rows(d: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in metrics.read_rows(d)]

    assert rows(run / metrics.METRICS_FILE) == rows(tmp_path / "whole" / metrics.METRICS_FILE)
    assert (run / metrics.METRICS_FILE).read_text().endswith("}\n")  # repaired
    moved = list((run / checkpoint.DAMAGED).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6-")
    assert checkpoint.list_steps(run) == [6, 8, 9]  # 6 written anew, beside the moved one


def test_resume_of_another_models_checkpoint_is_refused_untouched(
    tmp_path: Path, base_run: Path, corpus: str, tiny_config
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    other = tiny_config.replace(emb_dim=16)
    checkpoint.save_run_config(run, other, _tc(corpus, run))  # config.json of another model
    before = sorted((str(p), p.stat().st_size) for p in run.rglob("*"))
    with pytest.raises(ValueError, match="holds another model") as info:
        fit(other, _tc(corpus, run), resume=True, progress=False)
    assert "\n" not in str(info.value)
    assert "['final_norm']['scale']: saved (32,), model (16,)" in str(info.value)
    assert sorted((str(p), p.stat().st_size) for p in run.rglob("*")) == before


def test_torn_metrics_line_is_dropped_but_interior_garbage_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tra')
    assert metrics.read_rows(path) == [{"step": 1}, {"step": 2}]
    metrics.truncate_rows(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nxx\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.read_rows(path)


# ----------------------------------------------------------------------------- the run lock


def test_a_second_run_into_the_same_folder_is_refused(
    tmp_path: Path, base_run: Path, corpus: str, tiny_config
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    with runguard.RunLock(run):  # a run holding the folder (flock: per open file)
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            fit(tiny_config, _tc(corpus, run, max_steps=7), resume=True, progress=False)
    assert checkpoint.list_steps(run) == [2, 4, 6]


def test_a_lock_left_by_a_killed_run_is_free(tmp_path: Path) -> None:
    # The child loads runguard.py by path (no JAX import), takes the lock and is SIGKILLed.
    path = str(ROOT / "jaxgpt" / "runguard.py")
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('rg', {path!r})\n"
        "rg = importlib.util.module_from_spec(spec); spec.loader.exec_module(rg)\n"
        f"rg.RunLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"pid {child.pid}"), runguard.RunLock(tmp_path):
            pass
        child.kill()
        child.wait(timeout=10)
        with runguard.RunLock(tmp_path) as lock:  # the kernel released the dead run's lock
            assert lock.path.read_text().strip() == str(os.getpid())
    finally:
        child.kill()
        child.stdout.close()


# ----------------------------------------------------------------------------- signals


def _train_proc(corpus: str, out: Path, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable, str(TRAIN), "--model", "tiny", "--data", corpus,
        "--out", str(out), "--epochs", "100", "--max-steps", "500", "--batch-size", "4",
        "--eval-freq", "5", "--eval-iter", "1", "--sample-tokens", "1", "--checkpoint-every", "5",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; stderr: {proc.stderr.read()[-2000:]}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_after_the_step_and_prints_the_resume_command(
    tmp_path: Path, corpus: str, sig: int, code: int
) -> None:
    out = tmp_path / "run"
    proc = _train_proc(corpus, out)
    try:
        _wait_for(proc, "(Step 000005)")  # past step 6: training, no save in flight
        proc.send_signal(sig)
        rc, err = _finish(proc)
    finally:
        proc.kill()
    assert rc == code, err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    step = int(last.split("after step ")[1].split(";")[0])
    assert last == (
        f"train.py: error: stopped by {name} after step {step}; checkpoint saved in "
        f"{out / 'checkpoints' / str(step)}; resume with: python scripts/train.py --resume "
        f"--out {out}"
    )
    assert step >= 6 and checkpoint.list_steps(out)[-1] == step
    steps = [r["step"] for r in metrics.read_rows(out / metrics.METRICS_FILE)]
    assert steps == sorted(set(steps)) and steps[-1] <= step


def test_second_signal_during_the_save_keeps_older_checkpoints(
    tmp_path: Path, corpus: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    # emb 128: a ~80 MB state, so a save lasts long enough to be hit by a second signal.
    proc = _train_proc(corpus, out, "--emb-dim", "128")
    try:
        _wait_for(proc, "(Step 000010)")  # checkpoints 5 and 10 are written
        proc.send_signal(signal.SIGTERM)
        tmp = None
        while proc.poll() is None and tmp is None:  # Orbax writes into NAME.orbax-checkpoint-tmp
            tmp = next((p for p in (out / "checkpoints").iterdir() if "tmp" in p.name), None)
            time.sleep(0.001)
        assert tmp is not None, "the save finished before it was seen"
        proc.send_signal(signal.SIGTERM)  # during the save
        rc, err = _finish(proc)
    finally:
        proc.kill()
    assert rc == 143, err
    assert err.strip().splitlines()[-1] == (
        "train.py: error: second SIGTERM: stopped at once; the save in progress was "
        "abandoned, older checkpoints are intact"
    )
    assert checkpoint.list_steps(out) == [5, 10]  # the half-written save is not a checkpoint
    model, tc = checkpoint.load_run_config(out)
    with caplog.at_level(logging.WARNING):
        resumed = fit(model, tc.replace(max_steps=13), resume=True, progress=False)
    assert int(resumed.state.step) == 13 and not caplog.records  # nothing damaged
    assert checkpoint.list_steps(out) == [5, 10, 13] and not tmp.exists()  # Orbax cleaned it


# ----------------------------------------------------------------------------- disk space


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest):
    """A real filesystem of `request.param` MiB (tmpfs); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}m", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("small_disk", [8], indirect=True)
def test_too_little_space_is_refused_before_training(
    small_disk: Path, corpus: str, tiny_config
) -> None:
    with pytest.raises(ValueError, match=r"only \d+ MiB free under .* one checkpoint needs"):
        fit(tiny_config, _tc(corpus, small_disk / "run"), progress=False)
    assert list(small_disk.iterdir()) == []  # nothing written


@ORBAX_LEFTOVERS
@pytest.mark.parametrize("small_disk", [60], indirect=True)
def test_disk_full_at_a_save_is_one_error_with_older_checkpoints_intact(
    small_disk: Path, corpus: str, tiny_config
) -> None:
    # The tiny model's checkpoint is ~24 MB: 2 fit in 60 MiB, the third does not.
    out = small_disk / "run"
    tc = _tc(corpus, out, max_steps=10, keep=5)
    with pytest.raises(runguard.CheckpointWriteError) as info:
        fit(tiny_config, tc, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "step 6" in msg and "(newest: 4)" in msg, msg
    assert checkpoint.list_steps(out) == [2, 4]
    with checkpoint.manager(out) as mngr:
        for s in (2, 4):
            state, _ = checkpoint.restore(mngr, _like(tiny_config, tc), step=s)
            assert int(state.step) == s


def test_train_script_exits_1_with_one_line_on_divergence(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "run"
    args = ["--model", "tiny", "--data", corpus, "--out", str(out), "--lr", "1e4",
            "--max-steps", "40", "--batch-size", "4", "--eval-iter", "1", "--sample-tokens", "1",
            "--checkpoint-every", "2"]  # fmt: skip
    assert mod.main(args) == 1
    captured = capsys.readouterr().err
    err = [x for x in captured.splitlines() if x.startswith("train.py:")]  # not the progress bar
    assert "Traceback" not in captured
    assert len(err) == 1 and err[0].startswith("train.py: error: non-finite"), err
    assert f"last good checkpoint: {out / 'checkpoints'}" in err[0]


def test_resume_of_another_state_layout_is_refused_untouched(tmp_path: Path, tiny_config) -> None:
    # A state saved without the skip_nonfinite guard (as before it existed): same params,
    # another optimizer-state layout. Refused as bad input, never taken for damage.
    from jaxgpt import optim

    plain = optim.chain_state  # the chain inside the guard
    tc = TrainConfig()
    tx = make_optimizer(tc, 10)
    state = init_train_state(tiny_config, tx, jax.random.key(0))
    old = state.replace(opt_state=plain(state.opt_state))
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, old, {})
    before = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*"))
    with checkpoint.manager(tmp_path) as mngr, pytest.raises(ValueError) as info:
        checkpoint.restore(mngr, _like(tiny_config, tc))
    assert "holds a train state of another layout" in str(info.value)
    assert "\n" not in str(info.value)
    assert sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------- lost processes


class _Store:
    """A stand-in for JAX's coordination key-value store: a dict; `down` makes it fail."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        self.values[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watch(store: _Store, pid: int, lost: list) -> runguard.PeerWatch:
    return runguard.PeerWatch(
        store, pid, 3, timeout=0.5, on_lost=lambda *a: lost.append(a), interval=0.05
    )


def test_peer_watch_names_the_silent_process_and_spares_live_ones() -> None:
    store, lost = _Store(), []
    with _watch(store, 1, []), _watch(store, 2, []) as two, _watch(store, 0, lost) as zero:
        assert not zero.wait(1.0) and not lost  # all three beat: no verdict in 2 timeouts
        two.__exit__(None, None, None)  # process 2 stops beating (its watch ends)
        assert zero.wait(3.0)
    assert lost == [("process 2", "no sign of life for over 0.5 s")]


def test_peer_watch_takes_a_silent_store_for_a_lost_coordinator() -> None:
    store, lost = _Store(), []
    with _watch(store, 0, []), _watch(store, 2, []), _watch(store, 1, lost) as one:
        assert not one.wait(1.0)
        store.down = True
        assert one.wait(3.0)
    assert lost[0][0] == "process 0 (the coordinator)" and "has not answered" in lost[0][1]


def test_peer_watch_waits_for_its_verdict_on_a_collective_error() -> None:
    store, lost = _Store(), []
    with _watch(store, 1, []) as one, _watch(store, 2, []):
        watch = runguard.PeerWatch(
            store, 0, 3, 0.5, lambda *a: lost.append(a), 0.05, waits_on=(OSError,)
        )
        with pytest.raises(OSError), watch:
            one.__exit__(None, None, None)
            raise OSError("the peer hung up")  # leaving the block waits for the verdict
        assert lost and lost[0][0] == "process 1"


def test_peer_watch_does_not_wait_out_its_timeout_when_every_peer_is_alive() -> None:
    store, lost = _Store(), []
    with _watch(store, 1, []), _watch(store, 2, []):
        watch = runguard.PeerWatch(
            store, 0, 3, 2.0, lambda *a: lost.append(a), 0.05, waits_on=(ValueError,)
        )
        started = time.monotonic()
        with pytest.raises(ValueError), watch:
            raise ValueError("this process's own error")  # the peers keep beating
        assert time.monotonic() - started < 1.0 and not lost  # not the 2 s timeout
