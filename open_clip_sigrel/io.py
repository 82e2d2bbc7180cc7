"""Small I/O helpers every tool shares: one JSONL reader, one console table, output-path checks and atomic writes."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_jsonl(path: str | os.PathLike, *, strict: bool = True, missing_ok: bool = False) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line.

    strict: a line that is not a JSON object raises ValueError naming the file and line; with
    ``strict=False`` such lines are skipped (a file another process is still appending to, whose last
    line may be cut short). missing_ok: a missing file reads as no records.
    """
    path = os.fspath(path)
    if missing_ok and not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
                continue
            if isinstance(row, dict):
                rows.append(row)
            elif strict:
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> str:
    """A plain console table: the first column left-aligned, the others right-aligned.

    >>> print(format_table(("run", "loss"), [("a", "0.5"), ("bb", "12.25")]))
    run   loss
    ----------
    a      0.5
    bb   12.25
    """
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    header = line(head)
    out = ([title] if title else []) + [header, "-" * len(header)] + [line(r) for r in rows]
    return "\n".join(out)


def check_writable_dir(path: str | os.PathLike, *, what: str = "--output") -> str:
    """Raise ValueError unless ``path`` is, or can be created as, a directory this process can write into.

    Checked before any work, so a run never fails at its last step. Nothing is left behind: the nearest
    existing ancestor is probed with a temporary file that is removed at once (os.access is not enough:
    it says yes to root on a read-only mount). Returns the path as a string.
    """
    import tempfile

    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: empty path")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{what} {path}: {probe} exists and is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check-", dir=probe)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.remove(tmp)
    return path


def check_writable_file(path: str | os.PathLike, *, what: str = "--output") -> str:
    """Raise ValueError unless the file ``path`` can be written (not a directory; its folder writable)."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: empty path")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a directory, expected a file")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"{what} {path}: its folder")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: readers see
    the old file or the whole new one, never half of it; a failed write leaves nothing behind."""
    import tempfile

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
