"""Bad input through the three command lines: one line on stderr naming the value and the fix,
exit 2, no traceback, nothing on disk changed. The scripts' `main` runs in-process (their
`__main__` block only sets up logging), so each case costs no interpreter start-up."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint
from jaxgpt.config import get_preset
from jaxgpt.model import init_params

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "openai-gpt2-tiny"


def script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (loaded once)."""
    spec = importlib.util.spec_from_file_location(
        f"_script_{name}", ROOT / "scripts" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train_main():
    return script("train").main


@pytest.fixture(scope="module")
def generate_main():
    return script("generate").main


@pytest.fixture(scope="module")
def convert_main():
    return script("convert").main


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _stamped(root: Path) -> list[tuple[str, int, int]]:
    """Each path under `root` with its modification time and size."""
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def one_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """The captured stderr, checked to be one line holding each needle and no traceback."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


class _RunsCode:
    """Unpickling this calls `Path.touch(marker)`: a stand-in for any code a .pth could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- all four


@pytest.mark.parametrize("name", ["train", "generate", "convert", "prepare_data"])
def test_unknown_flag_is_one_line_exit_2(capsys, name: str) -> None:
    """argparse's own errors (jaxgpt.cli.Parser): one line, no usage dump, exit 2."""
    with pytest.raises(SystemExit) as e:
        script(name).main(["--no-such-flag", "1"])
    assert e.value.code == 2
    err = one_error(capsys, "error:")
    assert "usage:" not in err


# ----------------------------------------------------------------------------- train.py


@pytest.fixture
def corpus_dir(tmp_path: Path, verdict_text: str) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(verdict_text[:3000], encoding="utf-8")
    return d


def _tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "4",
        "--batch-size", "2", "--eval-iter", "1", "--sample-tokens", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "case,needles",
    [
        ("latin1", ["is not UTF-8", "b.txt", "iconv"]),
        ("empty", ["empty file", "b.txt", "remove it"]),
        ("warmup", ["warmup_steps=4", "not shorter than the run (4 steps)"]),
        ("skip", ["skip_nonfinite=-1"]),
        ("unwritable", ["not writable", "choose another --out"]),
        ("file_parent", ["not writable", "choose another --out"]),
    ],
)
def test_train_bad_input(train_main, capsys, tmp_path: Path, corpus_dir: Path, case, needles):
    out = tmp_path / "run"
    extra: list[str] = []
    if case == "latin1":
        (corpus_dir / "b.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    if case == "empty":
        (corpus_dir / "b.txt").write_text("  \n", encoding="utf-8")
    if case == "warmup":
        extra = ["--warmup-steps", "4"]
    if case == "skip":
        extra = ["--skip-nonfinite", "-1"]
    if case == "unwritable":
        out = Path("/proc/jaxgpt-run")  # procfs refuses mkdir, even for root
    if case == "file_parent":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
    before = _listing(tmp_path)
    assert train_main(_tiny(corpus_dir, out, *extra)) == 2
    one_error(capsys, *needles)
    assert _listing(tmp_path) == before


@pytest.fixture
def no_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad process flags must be refused before JAX's distributed runtime starts: reaching it
    fails the test at once (a real start would wait minutes on a coordinator that is not there)."""

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("jax.distributed.initialize reached with bad flags")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)


COORD = ["--coordinator", "localhost:1234"]
TWO = ["--num-processes", "2", "--process-id", "0"]
# case -> (flags, needles); the test process has 2 CPU devices (conftest.py).
SCALE_CASES = {
    "mesh_too_big": (["--mesh", "data=3"], ["'data=3' needs 3 devices but 2", "at most 2"]),
    "mesh_product_too_big": (["--mesh", "data=2,fsdp=2"], ["needs 4 devices but 2"]),
    "mesh_zero": (["--mesh", "data=0"], ["'data=0' is not AXIS=SIZE", "SIZE >= 1", "e.g. --mesh"]),
    "mesh_not_int": (["--mesh", "fsdp=x"], ["'fsdp=x' is not AXIS=SIZE", "e.g. --mesh"]),
    "mesh_unknown_axis": (["--mesh", "foo=2"], ["'foo=2' is not AXIS=SIZE", "['data', 'fsdp']"]),
    "mesh_axis_twice": (["--mesh", "data=2,data=2"], ["names 'data' twice", "each axis once"]),
    "mesh_empty": (["--mesh", ""], ["--mesh ''", "is not AXIS=SIZE"]),
    "only_coordinator": (COORD, ["go together", "pass all three"]),
    "no_coordinator": (TWO, ["go together", "pass all three"]),
    "id_too_big": ([*COORD, *TWO[:3], "2"], ["--process-id=2 is not in 0..1", "0 to 1"]),
    "id_negative": ([*COORD, *TWO[:3], "-1"], ["--process-id=-1 is not in 0..1", "0 to 1"]),
    "zero_processes": ([*COORD, *TWO[:1], "0", *TWO[2:]], ["--num-processes=0", "least 1"]),
    "no_port": (["--coordinator", "localhost", *TWO], ["'localhost' is not HOST:PORT"]),
    "port_too_big": (["--coordinator", "h:99999", *TWO], ["'h:99999' is not", "1..65535"]),
    "no_host": (["--coordinator", ":1234", *TWO], ["':1234' is not HOST:PORT"]),
    "heartbeat_too_short": (["--heartbeat-timeout", "1", *COORD, *TWO], ["heartbeat_timeout=1"]),
    # refused before the runtime starts, which would wait for the other processes
    "mesh_with_processes": (["--mesh", "data=0", *COORD, *TWO], ["'data=0' is not AXIS=SIZE"]),
}


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_train_bad_scale_flags(
    train_main, capsys, no_distributed, tmp_path: Path, corpus_dir: Path, case: str
) -> None:
    extra, needles = SCALE_CASES[case]
    out = tmp_path / "run"
    before = _listing(tmp_path)
    assert train_main(_tiny(corpus_dir, out, *extra)) == 2
    one_error(capsys, *needles)
    assert _listing(tmp_path) == before and not out.exists()


def test_resume_onto_a_mesh_too_big_leaves_the_run_as_it_was(
    train_main, capsys, tmp_path: Path, corpus_dir: Path
) -> None:
    out = tmp_path / "run"
    quiet = ["--no-compile-cache", "--no-reuse-host-memory"]  # nothing outside tmp_path
    assert train_main(_tiny(corpus_dir, out, *quiet)) == 0
    capsys.readouterr()
    before = _stamped(out)
    args = [*_tiny(corpus_dir, out, "--max-steps", "8"), "--resume", "--mesh", "data=3"]
    assert train_main(args) == 2
    one_error(capsys, "'data=3' needs 3 devices but 2", "at most 2")
    assert _stamped(out) == before  # no lock taken, nothing moved, repaired or written


# ----------------------------------------------------------------------------- generate.py


@pytest.fixture(scope="module")
def small_vocab_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = get_preset("tiny").replace(vocab_size=97)
    path = tmp_path_factory.mktemp("w") / "tiny97.npz"
    checkpoint.save_params(path, config, init_params(config, jax.random.key(0)))
    return path


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens=0", ">= 1"]),
        (["--max-new-tokens", "-3"], ["--max-new-tokens=-3", ">= 1"]),
        (["--eos", "99999"], ["eos_id=99999", "[0, 50257)"]),
        (["--weights", "W97", "--prompt", "Hello"], ["token id", "outside [0, 97)"]),
    ],
)
def test_generate_bad_input(generate_main, capsys, small_vocab_weights, args, needles) -> None:
    args = [str(small_vocab_weights) if a == "W97" else a for a in args]
    if "--weights" not in args:
        args += ["--model", "tiny"]
    assert generate_main(args) == 2
    one_error(capsys, *needles)


def test_generate_trims_a_long_prompt_with_a_warning(generate_main, capsys) -> None:
    prompt = "Every effort moves you " * 10  # 41 tokens; tiny's context is 16
    assert generate_main(["--model", "tiny", "--prompt", prompt, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr()
    warning = [x for x in out.err.splitlines() if x.strip()]
    assert len(warning) == 1 and "41 tokens" in warning[0] and "last 16" in warning[0], out.err
    assert out.out.startswith(prompt)


# ----------------------------------------------------------------------------- convert.py


@pytest.fixture(scope="module")
def book_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jaxgpt.interop import export_book

    config = get_preset("tiny").replace(vocab_size=97)
    path = tmp_path_factory.mktemp("book") / "tiny.safetensors"
    export_book(config, init_params(config, jax.random.key(1)), path)
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "case,needles",
    [
        ("pickled_code", ["refused without running it"]),
        ("truncated_safetensors", ["not a readable .safetensors file", "truncated"]),
        ("truncated_openai", ["model.ckpt"]),
        ("shape_vs_preset", ["emb_dim=32", "preset 'gpt2'"]),
        ("shape_vs_format", ["shapes disagree", "(50257, 8) != (50257, 16)", "matching config"]),
    ],
)
def test_convert_bad_input(convert_main, capsys, tmp_path: Path, book_file, case, needles) -> None:
    marker = tmp_path / "code-ran"
    if case == "pickled_code":
        pytest.importorskip("torch")
        src = tmp_path / "evil.pth"
        src.write_bytes(pickle.dumps({"tok_emb.weight": _RunsCode(marker)}))
        args = ["--from", "book", str(src)]
    elif case == "truncated_safetensors":
        src = tmp_path / "tiny.safetensors"
        shutil.copy(book_file, src)
        _truncate(src)
        args = ["--from", "book", str(src)]
    elif case == "truncated_openai":
        src = tmp_path / "openai"
        shutil.copytree(FIXTURE, src)
        _truncate(src / "model.ckpt.data-00000-of-00001")
        args = ["--from", "openai", str(src)]
    elif case == "shape_vs_preset":
        src = tmp_path / "tiny.safetensors"
        shutil.copy(book_file, src)
        args = ["--from", "book", str(src), "--model", "gpt2"]
    else:  # an OpenAI folder whose hparams.json claims another width than its tensors
        src = tmp_path / "openai"
        shutil.copytree(FIXTURE, src)
        hp = (src / "hparams.json").read_text().replace('"n_embd": 8', '"n_embd": 16')
        (src / "hparams.json").write_text(hp)
        args = ["--from", "openai", str(src)]
    before = _listing(tmp_path)
    assert convert_main([*args, "--to", "jaxgpt", str(tmp_path / "out.npz")]) == 2
    one_error(capsys, *needles)
    assert not marker.exists()  # the pickle's code never ran
    assert _listing(tmp_path) == before


def test_np_load_never_unpickles(tmp_path: Path) -> None:
    """jaxgpt's own .npz loader reads arrays only (allow_pickle=False)."""
    path = tmp_path / "p.npz"
    np.savez(path, __config__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        checkpoint.load(path)
