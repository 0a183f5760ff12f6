"""Export directories are staged and renamed: an existing export is never half-overwritten.

Everything is written into a temp directory beside ``out``; only a finished, checked export is
renamed into place (the old one, with ``overwrite``, is swapped out by renames and removed after).
A failed or interrupted export leaves ``out`` as it was and no temp directory behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import atomic_dir
from deepspec_plugin.models import copy_tokenizer_files


def refuse_existing(out: Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise DspecError(
            f"{out} already exists",
            "pass --overwrite to replace it (the old export stays until the new one is complete), "
            "or choose another --out",
        )


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` when the block ends without an error."""
    out = Path(out)
    refuse_existing(out, overwrite)
    with atomic_dir(out, overwrite=True) as tmp:
        yield tmp


__all__ = ["copy_tokenizer_files", "refuse_existing", "staged_output"]
