"""Named-model downloads against a local HTTP server that serves the fixture (no network)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import jaxgpt.interop as interop
from jaxgpt.interop.download import fetch_openai
from jaxgpt.interop.openai import REQUIRED_FILES

DATA = "model.ckpt.data-00000-of-00001"


class _Server(http.server.ThreadingHTTPServer):
    root: Path
    ranges: list[str | None]  # Range header of each request for the data file
    cut_next: int  # truncate this many upcoming data-file responses halfway


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves <root>/<file> under /124M/<file>, honouring `Range: bytes=N-` with 206."""

    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.removeprefix("/124M/")
        path = self.server.root / name
        if not self.path.startswith("/124M/") or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if name == DATA:
            self.server.ranges.append(rng)
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if name == DATA and self.server.cut_next:
            self.server.cut_next -= 1
            payload = payload[: len(payload) // 2]  # connection drops mid-transfer
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


Served = tuple[_Server, str]  # the server and its base URL


@pytest.fixture
def server(openai_dir: Path) -> Iterator[Served]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.root, srv.ranges, srv.cut_next = openai_dir, [], 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in REQUIRED_FILES)


def test_downloads_into_cache_and_loads(server: Served, openai_dir: Path, tmp_path: Path) -> None:
    srv, url = server
    cfg, params = interop.load("gpt2", cache_dir=tmp_path, base_url=url, progress=False)
    folder = tmp_path / "124M"
    assert _same_files(folder, openai_dir)
    assert not list(folder.glob("*.part"))
    assert cfg.emb_dim == 8  # the fixture's hparams, not GPT-2's: it came from the server
    # A second load reads the cache without asking the server again.
    srv.ranges.clear()
    interop.load("gpt2", cache_dir=tmp_path, base_url=url, progress=False)
    assert srv.ranges == []


def test_resumes_a_partial_file(server: Served, openai_dir: Path, tmp_path: Path) -> None:
    srv, url = server
    folder = tmp_path / "124M"
    folder.mkdir()
    head = (openai_dir / DATA).read_bytes()[:600_000]
    (folder / (DATA + ".part")).write_bytes(head)
    fetch_openai("gpt2", tmp_path, base_url=url, progress=False)
    assert srv.ranges == ["bytes=600000-"]
    assert _same_files(folder, openai_dir)


def test_broken_transfer_then_resume(server: Served, openai_dir: Path, tmp_path: Path) -> None:
    srv, url = server
    srv.cut_next = 1
    with pytest.raises(ValueError, match="could not download|got .* of .* bytes"):
        fetch_openai("gpt2", tmp_path, base_url=url, progress=False)
    part = tmp_path / "124M" / (DATA + ".part")
    size = (openai_dir / DATA).stat().st_size
    assert 0 < part.stat().st_size < size
    assert not (tmp_path / "124M" / DATA).exists()  # never a truncated file under the real name
    fetch_openai("gpt2", tmp_path, base_url=url, progress=False)
    assert srv.ranges[-1] == f"bytes={size // 2}-"
    assert _same_files(tmp_path / "124M", openai_dir)


def test_offline_error_names_the_folder(tmp_path: Path) -> None:
    # Port 9 on 127.0.0.1 (discard) is closed here: the connection is refused at once.
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "355M"))):
        interop.load(
            "gpt2-medium", cache_dir=tmp_path, base_url="http://127.0.0.1:9", progress=False
        )


def test_cache_follows_xdg_cache_home(
    server: Served, openai_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jaxgpt.commands.convert import main

    monkeypatch.delenv("JAXGPT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _, url = server
    out = str(tmp_path / "p.npz")
    assert main(["--from", "openai", "gpt2", "--base-url", url, "--to", "jaxgpt", out]) == 0
    assert _same_files(tmp_path / "xdg" / "jaxgpt" / "openai" / "124M", openai_dir)


def test_cache_home_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxgpt.host import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "jaxgpt"
    assert cache_dir("~/elsewhere") == tmp_path / "elsewhere"  # given: used, ~ expanded
    for unusable in ("", "relative/path"):  # the XDG rule: unset, empty or relative -> ~/.cache
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert cache_dir() == tmp_path / ".cache" / "jaxgpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / ".cache" / "jaxgpt"


def test_unknown_name() -> None:
    with pytest.raises(FileNotFoundError, match="gpt3"):
        interop.load("gpt3")


@pytest.mark.torch
def test_convert_cli_named_model(
    server: Served, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("torch")
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "convert.py"
    spec = importlib.util.spec_from_file_location("convert_script_dl", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, url = server
    argv = ["--from", "openai", "gpt2", "--cache-dir", str(tmp_path), "--base-url", url]
    assert module.main([*argv, "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    assert (tmp_path / "124M" / "model.ckpt.index").is_file()
