"""Tests for scripts/generate.py: help, JSON output, streaming, and one-line errors (exit 2)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxgpt.config import get_preset
from jaxgpt.model import init_params
from jaxgpt.sampling import generate
from jaxgpt.tokenizer import decode, encode

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def test_help_exits_zero() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "--max-new-tokens" in done.stdout and "--num-beams" in done.stdout


def test_json_batch_equals_library_generate(capsys: pytest.CaptureFixture[str]) -> None:
    prompts = ["Every effort moves you", "Hi"]
    argv = ["--model", "tiny", "--seed", "4", "--max-new-tokens", "6", "--json"]
    assert script.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    config = get_preset("tiny")
    want = generate(init_params(config, jax.random.key(4)), config, [encode(p) for p in prompts], 6)
    assert [r["ids"] for r in results] == want
    assert [r["text"] for r in results] == [decode(w) for w in want]
    assert [r["prompt"] for r in results] == prompts


def test_stream_prints_the_same_tokens_as_generate(capsys: pytest.CaptureFixture[str]) -> None:
    # Streaming runs a host loop over single cached steps; with the same seed its draws must be
    # the batched generate's (one row, key folded with the step number in both).
    flags = ["--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "5"]
    flags += ["--temperature", "1.0", "--top-k", "20", "--seed", "9"]
    assert script.main([*flags, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert script.main([*flags, "--json"]) == 0
    batched = json.loads(capsys.readouterr().out)["results"][0]["text"]
    assert streamed.rstrip("\n") == batched


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--temperature", "-1"], "temperature=-1.0"),
        (["--top-k", "0", "--temperature", "1"], "top_k=0"),
        (["--top-k", "50258", "--temperature", "1"], "top_k=50258"),
        (["--top-p", "1.5", "--temperature", "1"], "top_p=1.5"),
        (["--prompt", ""], "--prompt number 1 is empty"),
        (["--max-new-tokens", "-2"], "--max-new-tokens=-2"),
        (["--eos", "eot"], "--eos='eot'"),
        (["--model", "huge"], "huge"),
        (["--weights", "/no/such/run"], "/no/such/run"),
        (["--max-new-tokens", "x"], "invalid int"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--model" not in flags and "--weights" not in flags:
        flags = ["--model", "tiny", *flags]
    with pytest.raises(SystemExit) as exc:
        sys.exit(script.main(flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
