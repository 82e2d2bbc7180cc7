"""Small I/O helpers every tool shares: one JSONL reader, one console table."""
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
