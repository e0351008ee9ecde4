"""Writing files safely: every output is written whole or not at all.

`atomic_write` writes to a unique temporary file in the target's folder, then renames it over the
target (atomic on POSIX); a crash or a second concurrent writer never leaves a half-written file,
and the temporary file is removed when writing fails. `write_table_csv` is the one CSV writer of
manifests (synthetic cohort, public layouts, tests); `read_json_record` reads back a JSON record
that a command wrote, checked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import InputError


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


def read_json_record(path: str | Path, what: str, keys: Sequence[str], written_by: str) -> dict:
    """A JSON object with at least `keys`, written by `written_by`; every problem names the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} not found (written by `{written_by}`)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not {_article(what)} {what} ({e})") from None
    if not isinstance(d, dict) or not set(keys) <= set(d):
        raise InputError(f"{p}: not {_article(what)} {what} (expected keys {', '.join(keys)})")
    return d


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
