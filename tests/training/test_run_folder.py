"""``train.resume``: ``auto`` resumes when it can and otherwise starts cleanly; ``latest`` stays strict."""

import pytest

from sat_video.common.errors import CheckpointError, OutputExistsError
from sat_video.formats.sat_checkpoint import MODEL_STATES
from sat_video.training.run_folder import RunFolder


def checkpoint(run, iteration, latest=True):
    (run / str(iteration)).mkdir(parents=True)
    (run / str(iteration) / MODEL_STATES).write_bytes(b"weights")
    if latest:
        (run / "latest").write_text(f"{iteration}\n")


def test_auto_resumes_from_latest_and_never_deletes_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert RunFolder(run).resolve_resume("auto") is None  # no folder yet: a fresh start
    checkpoint(run, 10)
    checkpoint(run, 20)
    assert RunFolder(run).resolve_resume("auto") == run / "20"
    (run / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"holds checkpoints \[10, 20\] but no 'latest' file"):
        RunFolder(run).resolve_resume("auto")


def test_a_run_killed_before_its_first_checkpoint_is_restarted_only_by_auto(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "hang-rank0.txt"):
        (run / name).write_text("left by the killed run\n")
    (run / ".tmp-5").mkdir()
    folder = RunFolder(run)
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        folder.resolve_resume("latest")
    with pytest.raises(OutputExistsError, match="already holds a run"):  # a plain fresh start still refuses
        folder.start_fresh(overwrite=False)
    assert folder.resolve_resume("auto") is None
    folder.start_fresh(overwrite=True)  # what the trainer does for auto without a checkpoint
    assert sorted(p.name for p in run.iterdir()) == []
