"""The planner (`train.py --plan`, `jaxgpt.plan`): what each device holds, by arithmetic over the
model's shapes; the command line plans without data or a run folder; bad sizes exit 2.

The test process has 2 CPU devices (conftest.py), so `--mesh fsdp=2` is a real sharded plan.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import pytest

from jaxgpt import parallel
from jaxgpt.commands.train import main as train_main
from jaxgpt.config import TrainConfig
from jaxgpt.model import init_params
from jaxgpt.plan import flops_per_token, parse_size, plan, xla_flops

# Flags every in-process run takes: no host-memory or compilation-cache side effects on pytest.
QUIET = ["--no-reuse-host-memory", "--no-compile-cache"]


def _leaf_sizes(config) -> list[int]:
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return [math.prod(x.shape) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("mesh", ["data=1", "fsdp=2"])
def test_params_bytes_are_4_bytes_per_parameter_over_its_shards(tiny_config, mesh) -> None:
    p = plan(tiny_config, TrainConfig(batch_size=4, mesh=mesh))
    sizes = _leaf_sizes(tiny_config)
    assert p["parameters"] == sum(sizes)
    if mesh == "fsdp=2":
        # Each leaf of at least MIN_SHARD_SIZE (1024) elements is split in two (every tiny
        # leaf has an even dimension); smaller ones (biases, norms) stay whole.
        want = sum(4 * (n // 2 if n >= parallel.MIN_SHARD_SIZE else n) for n in sizes)
        assert want < 4 * sum(sizes) * 0.51  # the embedding dominates: really about half
    else:
        want = 4 * sum(sizes)  # float32 parameters, whole on every device
    b = p["per_device_bytes"]
    assert b["params"] == want and b["gradients"] == want
    # AdamW's two moments mirror the params; the rest are a few int32/float32 scalars.
    assert 0 <= b["opt_state"] - 2 * want < 256
    # XLA's arguments are the state and the batch (two int32 (4, 16) arrays, split by mesh).
    batch = 2 * 4 * 4 * 16 // (1 if mesh == "data=1" else 2)
    assert b["arguments"] - (b["params"] + b["opt_state"] + batch) in range(0, 64)
    assert b["peak"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"]
    assert p["devices"] == (1 if mesh == "data=1" else 2) and p["fits"] is None
    assert p["tokens_per_step"] == 4 * 16


def test_flops_follow_6n_plus_12ldt(tiny_config) -> None:
    """XLA's count of the step's FLOPs against 6N + 12 L d T (N: matmul weights, head included):
    the difference is what the formula leaves out (LayerNorm, softmax, GELU, AdamW), a few %."""
    config = tiny_config.replace(vocab_size=97)
    xla = xla_flops(config, TrainConfig(batch_size=4))
    e, layers, seq, tokens = 32, 2, 16, 64
    formula = flops_per_token(config, seq)["nanogpt"] * tokens
    assert formula == (6 * (12 * layers * e * e + e * 97) + 12 * layers * e * seq) * tokens
    assert 0.9 < xla / formula < 1.5


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5kib") == 1536
    assert parse_size("4096") == 4096
    for bad in ("", "GiB", "80XB", "-1GiB", "0", "80 Gi B"):
        with pytest.raises(ValueError, match="is not a memory size"):
            parse_size(bad)


def test_plan_command_reads_no_data_writes_no_run(tmp_path: Path, capsys) -> None:
    out, plan_json = tmp_path / "run", tmp_path / "plan.json"
    argv = [
        "--model", "tiny", "--batch-size", "4", "--mesh", "fsdp=2", "--scan-layers",
        "--remat", "block", "--data", str(tmp_path / "no-such-corpus.txt"), "--out", str(out),
        "--plan", "--plan-memory", "1MiB", "--plan-json", str(plan_json), *QUIET,
    ]  # fmt: skip
    assert train_main(argv) == 0
    assert not out.exists()  # no run folder, and the corpus (absent) was never read
    text = capsys.readouterr().out
    assert (
        "mesh data=1,fsdp=2" in text and "XLA peak" in text and "does NOT fit in 1.00 MiB" in text
    )
    p = json.loads(plan_json.read_text())
    assert p["devices"] == 2 and p["mesh"] == {"data": 1, "fsdp": 2}
    assert p["tokens_per_step"] == 64 and p["fits"] is False and p["memory"] == 2**20
    assert set(p["per_device_bytes"]) >= {"params", "opt_state", "arguments", "temporaries", "peak"}
    assert set(p["flops_per_step"]) == {"xla", "6N+12LdT"}


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--plan", "--plan-memory", "80XB"], ["--plan-memory", "'80XB' is not a memory size"]),
        (["--plan", "--plan-memory=-2GiB"], ["'-2GiB' is not a memory size", "80GiB"]),
        (["--plan-json", "p.json"], ["--plan-json go with --plan"]),
        (["--plan-memory", "8GiB"], ["--plan-memory and --plan-json go with --plan"]),
    ],
)
def test_bad_plan_flags_are_one_line_exit_2(tmp_path: Path, capsys, flags, needles) -> None:
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "tiny", "--out", str(tmp_path / "run"), *flags, *QUIET])
    assert e.value.code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert list(tmp_path.iterdir()) == []
