"""README keeps exactly two set-up commands, CI runs the test one verbatim, and the main job works."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _setup_commands():
    section = ROOT.joinpath("README.md").read_text().split("## Set-up commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_two_set_up_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "torch==2.13.0" in main_job and "tools/quickstart.py" in main_job
    assert "torch==2.13.0" in tests and "pytest" in tests
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert tests in ci
    lint = next(index for index, line in enumerate(ci) if "ruff check ." in line)  # the lint step comes first
    assert lint < ci.index(tests)


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    # the README's default trains for minutes; a few steps exercise the same path
    args = ["--out", str(tmp_path), "--train-iters", "10", "--num-videos", "4", "--num-samples", "2"]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "quickstart.py"), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    run = tmp_path / "quickstart-1"
    assert len(list((run / "samples").glob("*.mp4"))) == 2 and (run / "samples" / "contact_sheet.png").is_file()
    assert (run / "diffusers" / "transformer" / "config.json").is_file()
    assert (run / "train" / "latest").read_text().strip() == "10"
