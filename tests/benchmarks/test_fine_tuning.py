"""The fine-tuning section regenerates alone: it replaces itself between its markers and leaves the rest of the report
(sat_video/benchmarks/fine_tuning.py)."""

import pytest

from sat_video.benchmarks.fine_tuning import SECTION_BEGIN, SECTION_END, replace_section


def test_replace_section_keeps_the_rest_of_the_file():
    first = replace_section("# Results\n\nabove\n", "## Fine-tuning\n\nold")
    assert first == f"# Results\n\nabove\n\n{SECTION_BEGIN}\n## Fine-tuning\n\nold\n{SECTION_END}\n"
    text = first + "\n## After\n"
    assert replace_section(text, "## Fine-tuning\n\nnew") == text.replace("old", "new")
    assert replace_section("", "x") == f"{SECTION_BEGIN}\nx\n{SECTION_END}\n"
    report = "# Results\n\n## Method\n\ntext\n"
    assert replace_section(report, "x", before="## Method") == (
        f"# Results\n\n{SECTION_BEGIN}\nx\n{SECTION_END}\n\n## Method\n\ntext\n"
    )
    with pytest.raises(ValueError):
        replace_section(f"{SECTION_BEGIN}\nno end", "x")
