"""Tiny training runs for tests: in this process where one rank is enough, launched (``tools/train_video.py`` as a
subprocess, under torchrun for several ranks) where several processes, a kill, a hang or a restart is the point."""

import contextlib
import os
import subprocess
import sys

import torch.distributed as dist

from sat_video import load_config
from sat_video.training.distributed import process_group_threads, shutdown
from sat_video.training.metrics import read_metrics
from sat_video.training.trainer import train
from tests.conftest import ROOT
from tools.train_video import main as train_video

BASE = [str(ROOT / "configs" / name) for name in ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")]


def run_keys(assets, save, *overrides, data=None):
    """The config overrides of a run on ``data`` (default: the assets' clips) into ``save``, then ``overrides``."""
    return [f"data.sources=[{data or assets / 'data'}]", f"model.text_encoder.path={assets / 't5'}", f"train.save={save}",
            "train.report_to=[none]", *overrides]


def arguments(assets, save, *overrides, data=None, base=BASE):
    """``tools/train_video.py``'s arguments for that run."""
    return ["--base", *map(str, base), *run_keys(assets, save, *overrides, data=data)]


def command(assets, save, *overrides, nproc=1, data=None, restarts=0, script=ROOT / "tools" / "train_video.py",
            monitor_interval_s=None):
    """``monitor_interval_s``: how often torchrun looks at its workers; a long one lets the other ranks end by themselves
    (with their own message) when one exits, before torchrun stops them."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={restarts}"]
        if monitor_interval_s is not None:
            launcher.append(f"--monitor-interval={monitor_interval_s}")
    return [*launcher, str(script), *arguments(assets, save, *overrides, data=data)]


def launch(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command(*args, **kwargs), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(save):
    """The training steps' records."""
    return [record for record in read_metrics(save) if "loss" in record]


def evaluations(save):
    """The held-out evaluations' records."""
    return [record for record in read_metrics(save) if "eval_loss" in record]


@contextlib.contextmanager
def one_process_group():
    """Around code that joins a one-process group in this process (``init_distributed`` puts its rendezvous, RANK,
    MASTER_PORT, ..., in ``os.environ``): afterwards no group, no gloo thread and none of those variables is left for
    the tests and launches that follow."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
    assert not dist.is_initialized(), "a process group outlived the run"
    assert process_group_threads() == 0, f"{process_group_threads()} gloo thread(s) outlived the run"


def train_here(assets, save, *overrides, data=None, base=BASE, callbacks=()):
    """A run in this process, as one rank; its final loop state."""
    with one_process_group():
        return train(load_config(base, run_keys(assets, save, *overrides, data=data)), callbacks)


def train_video_here(assets, save, *overrides, data=None) -> int:
    """``tools/train_video.py`` in this process, as one rank: its exit status (its messages are on stderr)."""
    with one_process_group():
        return train_video(arguments(assets, save, *overrides, data=data))
