"""The tools' exit conventions: 2 and one line for a user error, 1 when a run stops, a traceback for a bug."""

import pytest

from sat_video.common.errors import CheckpointError, OutputExistsError, RunStopped
from sat_video.config.cli import run_tool
from tests.conftest import ROOT


def _raising(error):
    def run(argv):
        raise error

    return run


@pytest.mark.parametrize("error", [CheckpointError("ckpt/latest names iteration '9', but ckpt/9 does not exist"),
                                   OutputExistsError("out already exists; choose a new --out")])
def test_a_user_error_exits_2_with_one_line(error, capsys):
    assert run_tool("convert", _raising(error), []) == 2
    assert capsys.readouterr().err == f"convert: error: {error}\n"


def test_a_stopped_run_exits_1(capsys):
    assert run_tool("train_video", _raising(RunStopped("5 steps in a row had a non-finite loss")), []) == 1
    assert capsys.readouterr().err == "train_video: stopped: 5 steps in a row had a non-finite loss\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_tool("train_video", _raising(ZeroDivisionError("division by zero")), [])
    assert run_tool("tool", lambda argv: None, []) == 0


def test_an_invalid_config_stops_before_the_data_is_looked_at(capsys):
    from tools.train_video import main

    args = ["--base", str(ROOT / "configs" / "cogvideox_2b.yaml"), str(ROOT / "configs" / "tiny.yaml"),
            "data.sources=[/nonexistent/videos]", "deepspeed.zero_stage=4", "train.save=/nonexistent/run"]
    assert main(args) == 2
    assert capsys.readouterr().err == ("train_video: error: command-line override: deepspeed.zero_stage: expected one "
                                       "of 0, 1, 2, 3, found 4\n")
