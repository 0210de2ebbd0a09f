"""benchmarks/RESULTS.md is assembled from a list of sections: each renders its own rows, in the list's order, and the
summaries run after the sections they read (sat_video/benchmarks/report.py, context.py)."""

import importlib
import pkgutil

import pytest
import torch

import sat_video.benchmarks
from sat_video.benchmarks.context import Bench, Commands, measure
from sat_video.benchmarks.presets import PRESETS
from sat_video.benchmarks.report import SECTIONS, assemble


class _Section:
    def __init__(self, name: str, ran: list[str], summary: bool = False):
        self.__name__, self.ran, self.SUMMARY = name, ran, summary

    def run(self, bench):
        self.ran.append(self.__name__)
        return f"{self.__name__} rows"

    def render(self, rows):
        return [f"## {self.__name__}", "", rows]


def _bench(tmp_path) -> Bench:
    return Bench(PRESETS["tiny"], torch.device("cpu"), {}, 1, tmp_path, tmp_path, Commands((), (), ()))


def test_the_report_is_every_rendering_in_the_lists_order_and_summaries_run_last(tmp_path):
    ran = []
    sections = [_Section("first", ran), _Section("summary", ran, summary=True), _Section("last", ran)]
    bench = _bench(tmp_path)
    measure(sections, bench)
    assert ran == ["first", "last", "summary"]
    report = assemble(sections, bench.results, "python tools/bench.py --sizes tiny")
    assert report.startswith("# Benchmarks: sat_video vs diffusers\n")
    assert report.endswith("    python tools/bench.py --sizes tiny\n\n"
                           "## first\n\nfirst rows\n\n## summary\n\nsummary rows\n\n## last\n\nlast rows")


def test_reading_a_section_that_has_not_run_names_it(tmp_path):
    bench = _bench(tmp_path)
    measure([_Section("first", [])], bench)
    with pytest.raises(LookupError, match=r"later has not run \(sections run so far: first\)"):
        bench.rows(_Section("later", []))


def test_every_section_module_is_in_the_report():
    modules = [importlib.import_module(info.name)
               for info in pkgutil.iter_modules(sat_video.benchmarks.__path__, "sat_video.benchmarks.")]
    assert {m for m in modules if hasattr(m, "run") and hasattr(m, "render")} == set(SECTIONS)
