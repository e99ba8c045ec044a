"""`.ci/run` end to end on a stand-in checkout: it runs the README's test command and fails
when a test skips for another reason than the `gpu` marker, saying what ran and skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Shaped like the README's command (the line .ci/run greps), but quick: no venv, no install.
COMMAND = (
    "python3 -m venv --help >/dev/null && echo pip install --no-deps -r requirements/test.txt"
    " && python -m pytest -q -p skipreport -p no:cacheprovider -o markers=gpu ."
)
PASSING = """
import pytest

def test_runs():
    pass

@pytest.mark.gpu
@pytest.mark.skip(reason="needs a GPU")
def test_on_a_gpu():
    pass
"""
SKIPPING = """
import pytest

@pytest.mark.skip(reason="shared data folder ../shared is missing")
def test_needs_files_beside_the_repo():
    pass
"""
MODULE_SKIP = 'import pytest\n\npytest.importorskip("no_such_module_here")\n'


def _ci(tmp_path: Path, tests: dict[str, str]) -> subprocess.CompletedProcess:
    repo = tmp_path / "checkout"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    (repo / "README.md").write_text(f"# x\n\n```bash\n{COMMAND}\n```\n", encoding="utf-8")
    for name, text in tests.items():
        (repo / name).write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=120
    )


def test_passes_with_only_gpu_skips(tmp_path: Path) -> None:
    done = _ci(tmp_path, {"test_a.py": PASSING})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ci: 1 passed, 0 failed, 0 errors, 1 skipped (1 for the gpu marker, 0 for other" in (
        done.stdout
    )
    assert "ci:   1 skipped (gpu): needs a GPU" in done.stdout


@pytest.mark.parametrize(
    ("tests", "why"),
    [
        ({"test_b.py": SKIPPING}, "test_b.py::test_needs_files_beside_the_repo: shared data"),
        ({"test_c.py": MODULE_SKIP}, "test_c.py: could not import 'no_such_module_here'"),
    ],
)
def test_fails_on_a_skip_that_is_not_gpu(tmp_path: Path, tests: dict, why: str) -> None:
    done = _ci(tmp_path, {"test_a.py": PASSING, **tests})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 for the gpu marker, 1 for other reasons" in done.stdout
    assert f"ci:   skipped: {why}" in done.stdout
    assert "1 tests skipped for another reason than the gpu marker" in done.stderr


def test_fails_without_a_report(tmp_path: Path) -> None:
    # The suite never reached its summary (here a conftest that stops pytest at start-up).
    done = _ci(tmp_path, {"test_a.py": PASSING, "conftest.py": "raise SystemExit(3)\n"})
    assert done.returncode != 0
    assert "ci: error: no test report" in done.stderr
