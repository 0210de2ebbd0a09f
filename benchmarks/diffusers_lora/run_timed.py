#!/usr/bin/env python3
"""Run diffusers' ``train_cogvideox_lora.py`` unmodified and time it from outside:

    python benchmarks/diffusers_lora/run_timed.py OUT.json train_cogvideox_lora.py [script arguments ...]

Class methods are wrapped to add up where the time goes, then the script runs with ``runpy`` as ``__main__`` (its
arguments in ``sys.argv``), with this folder's torchvision stand-in importable unless torchvision is installed. A step
ends when the optimizer has stepped (torch's global optimizer hooks) and begins where the previous one ended, the
first one when the training loop asks the data loader for its first batch. OUT.json gets the start-up (process start
to the end of the first step), each step's time, epoch and buckets, the buckets spent before the loop, and the
process's peak RSS at the last step, also when the script fails.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import runpy
import sys
import time
import traceback
from pathlib import Path

BUCKETS = ("data_s", "encode_s", "forward_s", "backward_s", "optimizer_s")
"""Per-step buckets, named like sat_video's metrics.jsonl keys; ``encode_s`` is the VAE and T5 (here: T5 only, the
script encodes every video once before training)."""


def process_age_s() -> float:
    """Seconds since this process started (``sat_video.training.metrics.process_age_s``, Linux ``/proc``)."""
    started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return float(Path("/proc/uptime").read_text().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")


class StepClock:
    def __init__(self):
        self.buckets = dict.fromkeys(BUCKETS, 0.0)
        self.before_loop: dict[str, float] | None = None
        self.steps: list[dict] = []
        self.epoch = -1
        self.step_start: float | None = None
        self.startup_s: float | None = None
        self.peak_rss_gib: float | None = None

    def timed(self, bucket: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.buckets[bucket] += time.perf_counter() - start

        return wrapper

    def loader_started(self) -> None:
        """A data loader begins an epoch; the first time, the training loop begins."""
        self.epoch += 1
        if self.step_start is None:
            self.before_loop, self.buckets = self.buckets, dict.fromkeys(BUCKETS, 0.0)
            self.step_start = time.perf_counter()

    def optimizer_stepped(self) -> None:
        now = time.perf_counter()
        if self.startup_s is None:
            self.startup_s = process_age_s()
        self.steps.append({"step_time_s": now - self.step_start, "epoch": self.epoch, **self.buckets})
        # as sat_video logs it with each step: the script loads the whole pipeline again after training
        self.peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        self.buckets, self.step_start = dict.fromkeys(BUCKETS, 0.0), now


def install(clock: StepClock) -> None:
    from accelerate import Accelerator
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    from transformers import T5EncoderModel

    AutoencoderKLCogVideoX.encode = clock.timed("encode_s", AutoencoderKLCogVideoX.encode)
    T5EncoderModel.forward = clock.timed("encode_s", T5EncoderModel.forward)
    CogVideoXTransformer3DModel.forward = clock.timed("forward_s", CogVideoXTransformer3DModel.forward)
    Accelerator.backward = clock.timed("backward_s", Accelerator.backward)
    Accelerator.clip_grad_norm_ = clock.timed("optimizer_s", Accelerator.clip_grad_norm_)
    # the inner torch iterator: accelerate's loader wraps it (and fetches one batch ahead), each epoch anew
    _BaseDataLoaderIter.__next__ = clock.timed("data_s", _BaseDataLoaderIter.__next__)
    iterate = DataLoader.__iter__

    @functools.wraps(iterate)
    def epoch_iter(self):
        clock.loader_started()
        return iterate(self)

    DataLoader.__iter__ = epoch_iter
    started: list[float] = []

    def pre_step(optimizer, args, kwargs):
        started.append(time.perf_counter())

    def post_step(optimizer, args, kwargs):
        clock.buckets["optimizer_s"] += time.perf_counter() - started.pop()
        clock.optimizer_stepped()

    register_optimizer_step_pre_hook(pre_step)
    register_optimizer_step_post_hook(post_step)


def main() -> int:
    out, script, *script_args = sys.argv[1:]
    # This folder holds the torchvision stand-in and Python put it first on sys.path. transformers decides once (and
    # caches) whether torchvision is installed, and imports much more of it when it is: it must decide before the
    # stand-in is importable, which only the script's own three imports need.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from transformers.utils.import_utils import is_torchvision_available

    clock = StepClock()
    install(clock)
    if not is_torchvision_available():
        sys.path.insert(0, str(here))
    error = None
    sys.argv = [script, *script_args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        error = None if exit_.code in (None, 0) else traceback.format_exc()
    except BaseException:  # the record says how the script ended
        error = traceback.format_exc()
    record = {
        "startup_s": clock.startup_s,
        "steps": clock.steps,
        "before_loop": clock.before_loop,
        "peak_rss_gib": clock.peak_rss_gib,
        "error": error,
    }
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    if error:
        print(error, file=sys.stderr)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
