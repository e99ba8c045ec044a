"""Named OpenAI GPT-2 models: a local cache folder, filled from OpenAI's public files on demand.

Transfers resume from a `.part` file with an HTTP Range request, show a tqdm progress bar,
and are checked against the server's Content-Length before they are renamed into place.
"""

from __future__ import annotations

import http.client
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from jaxgpt import host
from jaxgpt.interop.openai import REQUIRED_FILES

logger = logging.getLogger(__name__)

# The location the book's gpt_download.py (ch. 5) reads from.
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
_CHUNK = 1 << 20


def model_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """Cache folder of a named OpenAI model: `<cache_dir>/<size>`, e.g. `.../124M`."""
    if name not in OPENAI_SIZES:
        raise ValueError(f"unknown OpenAI model {name!r}; choose one of {list(OPENAI_SIZES)}")
    root = host.cache_dir() / "openai" if cache_dir is None else Path(cache_dir).expanduser()
    return root / OPENAI_SIZES[name]


def _remote_total(response: Any) -> int | None:
    """Full file size from a 206 Content-Range or a 200 Content-Length."""
    if response.status == 206:
        m = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
        return int(m.group(1)) if m else None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def download_file(url: str, dest: Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if an earlier transfer broke off.

    Raises:
      ValueError: the server's size disagrees with what arrived (the `.part` is kept).
      urllib.error.URLError: network failure (the `.part` is kept for the next try).
    """
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the .part is already complete (or too long)
            raise
        part.unlink()
        return download_file(url, dest, progress=progress, timeout=timeout)
    with response:
        if response.status != 206:
            have = 0  # server ignored Range: start over
        total = _remote_total(response)
        from tqdm.auto import tqdm

        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise ValueError(f"{url}: got {got} of {total} bytes; run again to resume into {part}")
    part.replace(dest)
    return dest


def fetch_openai(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    base_url: str = OPENAI_BASE_URL,
    files: tuple[str, ...] = REQUIRED_FILES,
    progress: bool = True,
) -> Path:
    """Make sure the cache folder of a named OpenAI model holds `files`; download what's missing.

    Args:
      name: "gpt2", "gpt2-medium", "gpt2-large" or "gpt2-xl".
      cache_dir: root of the cache (default `$XDG_CACHE_HOME/jaxgpt/openai`, else
        `~/.cache/jaxgpt/openai`); the model goes in `<cache_dir>/<size>` (124M, 355M, 774M,
        1558M), as in the book's `models_dir`.
      base_url: where `<size>/<file>` is served (OpenAI's public bucket by default).
      files: which files to fetch (those needed to load the weights by default).
      progress: show a progress bar per file.

    Returns:
      the folder. Offline, raises ValueError naming the folder to fill by hand.
    """
    folder = model_folder(name, cache_dir)
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    size = OPENAI_SIZES[name]
    for filename in missing:
        url = f"{base_url.rstrip('/')}/{size}/{filename}"
        logger.info("downloading %s", url)
        try:
            download_file(url, folder / filename, progress=progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(
                f"could not download {url} ({reason}); offline, copy {', '.join(missing)} "
                f"from {base_url}/{size}/ into {folder} by hand"
            ) from e
    return folder
