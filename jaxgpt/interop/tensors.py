"""Reading and writing flat tensor files safely: safetensors first, torch only with weights_only."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like -> NumPy (bfloat16 tensors are widened to float32).

    Tensors are copied: `Tensor.numpy()` shares memory, and JAX on CPU may alias NumPy
    memory too, so in-place torch updates (an optimizer step) would otherwise leak in.
    """
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy().copy()
    return np.asarray(value)


def numpy_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {str(k): as_numpy(v) for k, v in state.items()}


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


@contextlib.contextmanager
def _safetensors(path: str | Path) -> Iterator[Any]:
    """`safe_open(path)` whose errors (in the header or any read) become one ValueError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            yield f
    except Exception as e:  # SafetensorError derives from Exception only
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is not a readable .safetensors file ({_one_line(e)}); is it truncated?"
        ) from e


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, as NumPy; no pickle involved.

    Raises:
      ValueError: a truncated or malformed file (safetensors checks the header and sizes).
    """
    with _safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a .safetensors file, from its header only."""
    with _safetensors(path) as f:
        return list(f.keys())


def read_torch(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never code."""
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"reading {path} needs PyTorch: pip install 'jaxgpt[torch]'") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError on unsafe or bad files
        raise ValueError(
            f"{path} is not a plain tensor file torch can load safely ({_one_line(e)}); "
            "refused without running it: re-save it as a state dict or .safetensors"
        ) from e


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata={"format": "pt", **(metadata or {})})


def write_torch(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """`torch.save` of a plain {name: tensor} dict (loadable with weights_only=True)."""
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"writing {path} needs PyTorch; write .safetensors instead") from e
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(path))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file/folder unless asked (scripts: --force)."""
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; choose another output or pass --force")
