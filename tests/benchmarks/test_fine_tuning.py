"""A standalone section regenerates alone: it replaces itself between its markers, or goes where the report's order puts
it, and leaves the rest of the report as it was (sat_video/benchmarks/markdown.py, report.py)."""

import pytest

from sat_video.benchmarks import fine_tuning
from sat_video.benchmarks.markdown import begin_marker, end_marker, marked, replace_section
from sat_video.benchmarks.report import SECTIONS, assemble, update

BEGIN, END = begin_marker("trainers"), end_marker("trainers")


def test_replace_section_keeps_the_rest_of_the_file():
    first = replace_section("# Results\n\nabove\n", "trainers", "## Fine-tuning\n\nold")
    assert first == f"# Results\n\nabove\n\n{BEGIN}\n## Fine-tuning\n\nold\n{END}\n"
    text = first + "\n## After\n"
    assert replace_section(text, "trainers", "## Fine-tuning\n\nnew") == text.replace("old", "new")
    assert replace_section("", "trainers", "x") == f"{BEGIN}\nx\n{END}\n"
    report = "# Results\n\n## Method\n\ntext\n"
    assert replace_section(report, "trainers", "x", before=("## Absent", "## Method")) == (
        f"# Results\n\n{BEGIN}\nx\n{END}\n\n## Method\n\ntext\n"
    )
    with pytest.raises(ValueError):
        replace_section(f"{BEGIN}\nno end", "trainers", "x")


class _Section:
    def __init__(self, name, standalone=None, heading=None):
        self.__name__ = name
        if standalone:
            self.STANDALONE = standalone
        if heading:
            self.HEADING = heading

    def render(self, rows):
        return [f"## {self.__name__}", "", rows]


def _block(name, rows):
    return marked(name, f"## {name}\n\n{rows}")


def test_update_inserts_missing_sections_in_the_reports_order_before_the_next_present_one():
    a, b, c, plain, last = (_Section("a", "a"), _Section("b", "b"), _Section("c", "c"), _Section("plain"),
                            _Section("last", heading="## last"))
    order = [a, plain, b, c, last]
    report = f"# R\n\n{_block('c', 'old c')}\n\n## last\n\nend\n"
    # a and b go in front of c, the nearest later section present, in their order; c is replaced where it is
    assert update(report, {a: "new a", b: "new b", c: "new c"}, order) == (
        f"# R\n\n{_block('a', 'new a')}\n\n{_block('b', 'new b')}\n\n{_block('c', 'new c')}"
        "\n\n## last\n\nend\n")
    # with no section after it present, a section goes at the end
    assert update("# R\n", {c: "x"}, [a, c]) == f"# R\n\n{_block('c', 'x')}\n"
    with pytest.raises(ValueError, match="plain is not standalone"):
        update(report, {plain: "x"}, order)


def test_a_regenerated_section_reads_back_as_the_whole_report_wrote_it():
    """What ``--only`` writes into a report is what the full run would have put there."""
    rows = {"result": None, "command": "python tools/bench.py --only trainers"}
    whole = assemble([fine_tuning], {fine_tuning: rows}, "cmd")
    assert update(whole, {fine_tuning: rows}) == whole
    stale = whole.replace("Not run", "Stale")
    assert update(stale, {fine_tuning: rows}) == whole
    assert fine_tuning.STANDALONE == "trainers" and fine_tuning in SECTIONS
