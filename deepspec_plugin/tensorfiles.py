"""Safetensors files read strictly, from their headers: nothing is loaded, nothing unpickled.

The reader checks what ``safetensors`` itself would only find late or not at all: a truncated file,
overlapping or out-of-range offsets, a byte count that does not match the shape. A directory with
only pickle weights (``.bin``, ``.pt``...) is refused with the fix; such files are never opened.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deepspec_plugin.errors import DspecError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER = 100 << 20  # safetensors' own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    name: str
    path: Path
    offset: int  # absolute position of the first byte in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def corrupt_fix(path: Path) -> str:
    return f"re-save or re-copy {path.name} (it is corrupt or was cut short)"


def read_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, with every offset checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise DspecError(f"{path} is not a safetensors file (only {size} bytes)",
                                 corrupt_fix(path))
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise DspecError(f"{path} has a header length of {n} bytes in a {size}-byte file",
                                 corrupt_fix(path))
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DspecError(f"{path} is missing", "point at a directory with its weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DspecError(f"{path} has a corrupt safetensors header", corrupt_fix(path)) from None
    if not isinstance(header, dict):
        raise DspecError(f"{path} has a corrupt safetensors header", corrupt_fix(path))
    base = 8 + n
    out: dict[str, StoredTensor] = {}
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = e["dtype"], tuple(int(d) for d in e["shape"]), \
                e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DspecError(f"{path}: tensor {name} has a malformed header entry",
                             corrupt_fix(path)) from None
        if dtype not in DTYPE_SIZES:
            raise DspecError(f"{path}: tensor {name} has unknown dtype {dtype!r}",
                             corrupt_fix(path))
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - start != nbytes or start < 0:
            raise DspecError(f"{path}: tensor {name} {dtype}{list(shape)} needs {nbytes} bytes, "
                             f"its offsets span {end - start}", corrupt_fix(path))
        if base + end > size:
            raise DspecError(f"{path} is truncated: tensor {name} ends at byte {base + end}, the "
                             f"file has {size}", corrupt_fix(path))
        spans.append((start, end, name))
        out[name] = StoredTensor(name, path, base + start, nbytes, dtype, shape)
    spans.sort()
    for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise DspecError(f"{path}: tensors {n1} and {n2} overlap", corrupt_fix(path))
    return out


def read_dir(model_dir: str | Path, files: Iterable[str] | None = None) -> dict[str, StoredTensor]:
    """Every tensor of a model directory (all ``*.safetensors``, or the named files)."""
    model_dir = Path(model_dir)
    paths = [model_dir / f for f in files] if files is not None \
        else sorted(model_dir.glob("*.safetensors"))
    index: dict[str, StoredTensor] = {}
    for p in paths:
        for name, t in read_tensors(p).items():
            if name in index:
                raise DspecError(f"tensor {name} is stored twice in {model_dir} "
                                 f"({index[name].path.name} and {p.name})", "remove the stale file")
            index[name] = t
    return index


def safetensors_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def tensor_index(model_dir: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a model directory, refusing one without safetensors weights."""
    model_dir = Path(model_dir)
    if not safetensors_files(model_dir):
        refuse_missing_weights(model_dir)
    return read_dir(model_dir)


def refuse_missing_weights(model_dir: Path) -> None:
    """Raise the error for a directory without ``*.safetensors``, naming pickle files found."""
    model_dir = Path(model_dir)
    pickles = (
        [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if model_dir.is_dir()
        else []
    )
    if pickles:
        raise DspecError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}); "
            "pickle checkpoints are not loaded; convert to safetensors",
            "load it once where you trust it and save_pretrained(..., safe_serialization=True)",
        )
    raise DspecError(
        f"{model_dir} has no *.safetensors weights",
        "point at a model directory with safetensors weights",
    )
