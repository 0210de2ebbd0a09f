"""Markdown pieces the benchmark sections share."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


# A section that regenerates alone (``STANDALONE = "<name>"`` in its module, ``tools/bench.py --only <name>``) sits in
# the report between these markers, so that a later run can find it and replace it without touching the rest.


def begin_marker(name: str) -> str:
    return f"<!-- bench:{name} -->"


def end_marker(name: str) -> str:
    return f"<!-- /bench:{name} -->"


def marked(name: str, section: str) -> str:
    """``section`` between the markers of ``name`` that :func:`replace_section` finds."""
    return f"{begin_marker(name)}\n{section.strip()}\n{end_marker(name)}"


def replace_section(text: str, name: str, section: str, before: tuple[str, ...] = ()) -> str:
    """``text`` with its section ``name`` (between its markers) replaced by ``section``, the rest unchanged. When ``text``
    has none yet, the section goes in front of the first line of ``before`` found in ``text`` (the headings or markers of
    the sections that follow it in the report, nearest first), else at the end."""
    block = marked(name, section)
    begin, end = begin_marker(name), end_marker(name)
    head, found_begin, rest = text.partition(begin)
    if found_begin:
        _, found_end, tail = rest.partition(end)
        if not found_end:
            raise ValueError(f"{begin} without {end}")
        return f"{head}{block}{tail}"
    for line in before:
        head, found, tail = text.partition(f"\n{line}\n")
        if found:
            return f"{head}\n{block}\n{found}{tail}"
    return f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"


def regenerate_alone(command: str) -> str:
    """The line under a standalone section's heading."""
    return f"Regenerate this section alone (it replaces itself in this file): `{command}`"
