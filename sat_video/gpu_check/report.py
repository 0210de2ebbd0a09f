"""The report a check writes: Markdown appended and flushed line by line, so a section killed at its time limit (or a
machine taken back) still leaves every row it finished."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class Report:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def text(self, *lines: str) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())

    def table(self, columns: Sequence[str]) -> None:
        """Start a table; its rows follow with :meth:`row`."""
        self.text("", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns))

    def row(self, *cells: object) -> None:
        self.text("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "**FAIL**"
