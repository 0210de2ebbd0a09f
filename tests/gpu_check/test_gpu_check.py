"""tools/gpu_check.py: the --quick mode runs every section at tiny sizes on the CPU (so the GPU check never rots), the
report names each section's outcome, and bad arguments are refused before anything runs."""

import os
import re
import subprocess
import sys

import pytest

from sat_video.gpu_check.runner import SECTIONS
from tests.conftest import ROOT
from tools.gpu_check import main as gpu_check


@pytest.mark.slow
def test_quick_check_runs_every_section_and_reports_rows(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--quick", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    report = out.read_text()
    assert proc.returncode == 0, proc.stderr[-3000:] + report[-3000:]
    for section in SECTIONS:
        body = report.split(f"## {section.number}. {section.title}")[1].split("\n## ")[0]
        assert re.search(r"_done, \d+ s of \d+ s\._", body), f"section {section.number}:\n{body}"
        assert "| " in body, f"section {section.number} wrote no table:\n{body}"
        assert "**FAIL" not in body and "**failed**" not in body, body
    assert "| cogvideox1.5_5b |" in report and "bit-identical losses" in report
    summary = report.split("## Summary")[1]
    assert summary.count("| done |") == len(SECTIONS)


def test_arguments_are_checked_before_anything_runs(tmp_path, capsys):
    existing = tmp_path / "kept.md"
    existing.write_text("earlier report")
    assert gpu_check(["--quick", "--out", str(existing)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err and existing.read_text() == "earlier report"
    assert gpu_check(["--quick", "--out", str(tmp_path / "a.md"), "--sections", "2,9"]) == 2
    assert "--sections: expected numbers from [1, 2, 3, 4, 5, 6, 7], found '2,9'" in capsys.readouterr().err
    if "cuda" not in sys.modules or not __import__("torch").cuda.is_available():
        assert gpu_check(["--out", str(tmp_path / "b.md")]) == 2
        assert "no GPU here" in capsys.readouterr().err
    assert not (tmp_path / "a.md").exists() and not (tmp_path / "b.md").exists()


def test_a_section_over_its_limit_is_killed_and_its_rows_stay(tmp_path, monkeypatch):
    from sat_video.gpu_check import runner
    from sat_video.gpu_check.check import Check

    monkeypatch.setattr(runner, "SECTIONS", (runner.Section(1, "Sleeper", "tests.gpu_check.sleeper_section", 1, 1),))
    out = tmp_path / "r.md"
    check = Check(device="cpu", quick=True, report_path=out, workdir=tmp_path, configs=ROOT / "configs",
                  train_script=ROOT / "tools" / "train_video.py")
    outcomes = runner.run_sections(check, {1})
    assert outcomes[0].status.startswith("timed out at its 1 s limit")
    report = out.read_text()
    assert "| written before the limit |" in report and "never written" not in report
