"""Writing files safely: every output is written whole or not at all.

`atomic_write` writes to a unique temporary file in the target's folder, then renames it over the
target (atomic on POSIX); a crash or a second concurrent writer never leaves a half-written file,
and the temporary file is removed when writing fails. `write_table_csv` is the one CSV writer of
manifests (synthetic cohort, public layouts, tests).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` to produce the file, then rename it to `path`; -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_table_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """A CSV table with a header; keys of a row outside `columns` are ignored, missing ones empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
