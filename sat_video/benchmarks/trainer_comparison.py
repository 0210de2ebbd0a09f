"""The fine-tuning comparison: sat_video's trainer (``tools/train_video.py``) against diffusers'
``examples/cogvideo/train_cogvideox_lora.py``, both LoRA fine-tuning the same tiny CogVideoX-2B-layout DiT (same
initial weights) with the same VAE, T5 and clips, on CPU in fp32, each in its own process (the commands that start
them come from the caller: :class:`~sat_video.benchmarks.context.Commands`).

The diffusers script runs unmodified through ``benchmarks/diffusers_lora/run_timed.py``, which times steps and
phases from outside and lends it the torchvision stand-in of that folder. sat_video's figures come from its
``metrics.jsonl`` (``train.log_interval=1``: one record per step). ``fine_tuning.py`` writes the section.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from sat_video.benchmarks.machine import load_average
from sat_video.common.errors import ConfigError

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Commands

DIFFUSERS_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"
DIFFUSERS_SCRIPT = "examples/cogvideo/train_cogvideox_lora.py"
DIFFUSERS_SCRIPT_SHA256 = "bb2c35429e5467cb"
"""First 16 hex digits of the script's sha256 at ``DIFFUSERS_COMMIT``: the version RESULTS.md reports."""
DIFFUSERS_SCRIPT_ENV = "SAT_VIDEO_DIFFUSERS_SCRIPT"

MODEL_CONFIGS = ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")
DIT_SIZES = {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 2, "time_embed_dim": 64, "latent_height": 8,
             "latent_width": 8, "num_frames": 13, "text_length": 16, "text_hidden_size": 64}
"""CogVideoX-2B's layout (sin-cos positions, per-frame patches) at 13 x 64 x 64 pixels: 4 x 8 x 8 latents, 64 video
+ 16 text tokens."""
CLIP = (13, 64, 64)
FPS = 8
SAT_LOADER_WORKERS = 1
"""sat_video decodes in a loader worker while its training process encodes and trains (tiny_train.yaml's 0 keeps tests
light); diffusers' script decodes every clip before its loop, so its loader has nothing to overlap."""
BUCKETS = ("data_s", "encode_s", "forward_s", "backward_s", "optimizer_s")
"""Per-step profile keys of sat_video's metrics.jsonl (``data_wait_s`` read as ``data_s``) and of run_timed.py."""

PIPELINE_INDEX = {"_class_name": "CogVideoXPipeline", "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
                  "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                  "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"]}


@dataclass(frozen=True)
class ComparisonSetup:
    clips: int = 16
    batch: int = 2
    steps: int = 32
    """Optimizer steps per run; with 16 clips in batches of 2, 8 steps are an epoch."""
    rounds: int = 3
    """Runs of each row, in turn (reversed every other round), so drifting machine load hits all alike."""
    rank: int = 16
    threads: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.clips / self.batch)


@dataclass(frozen=True)
class Assets:
    clips: Path
    """SAT's SFT layout (``videos/``, ``labels/``) plus the script's ``prompt.txt`` and ``videos.txt``."""
    pipeline: Path
    """diffusers folder: ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``."""
    checkpoint: Path
    """The same DiT weights in SAT's layout, for ``train.init_checkpoint``."""


def model_config(configs: Path, overrides: Sequence[str] = ()):
    """The comparison's model from the folder of the model configs."""
    from sat_video.config.loader import load_config

    return load_config([configs / name for name in MODEL_CONFIGS], [*dit_overrides(), *overrides])


def dit_overrides() -> list[str]:
    return [f"model.dit.{key}={value}" for key, value in DIT_SIZES.items()]


def build_assets(configs: Path, workdir: Path, setup: ComparisonSetup) -> Assets:
    import sentencepiece
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
    from transformers import T5Tokenizer

    from sat_video.diffusion.schedule import scheduler_config
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5
    from sat_video.formats.diffusers_format import write_diffusers_folder
    from sat_video.formats.sat_checkpoint import save_checkpoint
    from sat_video.model.build import build_dit
    from sat_video.model.config import DiTConfig

    clips, pipeline, checkpoint = workdir / "clips", workdir / "pipeline", workdir / "sat_dit"
    frames, height, width = CLIP
    items = make_moving_shapes(clips, setup.clips, frames, height, width, FPS, seed=0)
    (clips / "prompt.txt").write_text("".join(f"{caption}\n" for _, caption in items))
    (clips / "videos.txt").write_text("".join(f"{path.relative_to(clips)}\n" for path, _ in items))

    cfg = model_config(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = build_dit(cfg)
        with torch.no_grad():  # as a trained model: no zero-initialised gates or output layer
            for param in dit.parameters():
                # Values exact in fp16: the script loads the transformer in fp16 (see diffusers_arguments), then casts to fp32.
                param.add_(torch.randn_like(param) * 0.02).copy_(param.half())
    save_checkpoint(dit, checkpoint, iteration=0)
    write_diffusers_folder(dit.state_dict(), DiTConfig.from_config(cfg), pipeline,
                           snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
                           num_train_timesteps=cfg.model.diffusion.num_train_timesteps)
    # the script loads CogVideoXDPMScheduler (the export writes the DDIM one, for sampling)
    CogVideoXDPMScheduler(**scheduler_config(cfg.model.diffusion.snr_shift_scale,
                                             cfg.model.diffusion.num_train_timesteps)).save_pretrained(pipeline / "scheduler")

    first_stage = cfg.model.first_stage
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(first_stage.init_seed)
        vae = AutoencoderKLCogVideoX(**OmegaConf.to_container(first_stage.architecture), scaling_factor=first_stage.scale_factor)
    vae.save_pretrained(pipeline / "vae")
    make_tiny_t5([caption for _, caption in items], pipeline / "text_encoder", d_model=DIT_SIZES["text_hidden_size"])
    # transformers 5's T5Tokenizer ignores a vocab_file; given the pieces and scores it tokenizes as sentencepiece does
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(pipeline / "text_encoder" / "spiece.model"))
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(pipeline / "tokenizer")
    # read by the script's final CogVideoXPipeline.from_pretrained, after training
    (pipeline / "model_index.json").write_text(json.dumps(PIPELINE_INDEX, indent=1) + "\n")
    return Assets(clips, pipeline, checkpoint)


# ---------------------------------------------------------------------- the diffusers script


def diffusers_script(given: Path | None = None) -> tuple[Path, str]:
    """The script to run (``--diffusers-script``, else ``$SAT_VIDEO_DIFFUSERS_SCRIPT``) and where it came from.

    Raises:
        ConfigError: neither names a file; the message says how to get the pinned script.
    """
    path = given or (Path(os.environ[DIFFUSERS_SCRIPT_ENV]) if os.environ.get(DIFFUSERS_SCRIPT_ENV) else None)
    origin = "--diffusers-script" if given else f"${DIFFUSERS_SCRIPT_ENV}"
    if path is None or not path.is_file():
        found = (f"{origin} is {path}, which is not a file" if path else
                 f"neither --diffusers-script nor ${DIFFUSERS_SCRIPT_ENV} is set")
        raise ConfigError(
            f"the fine-tuning comparison runs diffusers' {DIFFUSERS_SCRIPT}, and {found}. Get the pinned version with "
            f"'git clone https://github.com/huggingface/diffusers && git -C diffusers show "
            f"{DIFFUSERS_COMMIT}:{DIFFUSERS_SCRIPT} > train_cogvideox_lora.py', then pass "
            f"--diffusers-script train_cogvideox_lora.py or set {DIFFUSERS_SCRIPT_ENV}=train_cogvideox_lora.py")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if digest == DIFFUSERS_SCRIPT_SHA256:
        return path, f"huggingface/diffusers@{DIFFUSERS_COMMIT[:12]} `{DIFFUSERS_SCRIPT}`, sha256 {digest}"
    return path, (f"`{path.name}`, sha256 {digest} (not the pinned diffusers@{DIFFUSERS_COMMIT[:12]} version, "
                  f"sha256 {DIFFUSERS_SCRIPT_SHA256})")


def diffusers_arguments(configs: Path, assets: Assets, setup: ComparisonSetup, output: Path) -> list[str]:
    """The script's flags for the run sat_video's config describes (same sizes, LoRA, optimizer and schedule)."""
    train = model_config(configs).train
    optimizer, schedule = train.optimizer, train.lr_schedule
    frames, height, width = CLIP
    return [
        # relative to the run's folder: the script loads the transformer in bf16 if this path contains "5b", else fp16
        f"--pretrained_model_name_or_path={assets.pipeline.name}", f"--instance_data_root={assets.clips}",
        "--caption_column=prompt.txt", "--video_column=videos.txt",
        f"--height={height}", f"--width={width}", f"--fps={FPS}", f"--max_num_frames={frames}",
        "--skip_frames_start=0", "--skip_frames_end=0",
        f"--rank={setup.rank}", f"--lora_alpha={setup.rank}",  # scale alpha / rank = 1, as sat_video's below
        "--mixed_precision=no", f"--train_batch_size={setup.batch}", f"--max_train_steps={setup.steps}",
        f"--checkpointing_steps={setup.steps + 1}",  # never inside the run; the final LoRA save comes after it
        "--dataloader_num_workers=0", "--seed=0", f"--output_dir={output}",
        "--optimizer=adamw", f"--learning_rate={optimizer.lr}", f"--adam_beta1={optimizer.betas[0]}",
        f"--adam_beta2={optimizer.betas[1]}", f"--adam_epsilon={optimizer.eps}",
        f"--adam_weight_decay={optimizer.weight_decay}", f"--max_grad_norm={train.grad_clip}",
        f"--lr_scheduler={schedule.decay_style}", f"--lr_warmup_steps={schedule.warmup_iters}",
    ]


def run_diffusers(commands: Commands, configs: Path, script: Path, assets: Assets, setup: ComparisonSetup,
                  workdir: Path) -> dict:
    out = workdir / f"diffusers-{len(list(workdir.glob('diffusers-*')))}"
    out.mkdir()
    command = [*commands.diffusers, str(out / "timings.json"), str(script),
               *diffusers_arguments(configs, assets, setup, out / "output")]
    env = {**_env(setup), "HF_HUB_OFFLINE": "1"}  # run_timed.py puts its torchvision stand-in on sys.path itself
    _run(command, env, out / "log.txt", cwd=assets.pipeline.parent)
    record = json.loads((out / "timings.json").read_text())
    return {"steps": record["steps"], "startup_s": record["startup_s"], "peak_rss_gib": record["peak_rss_gib"],
            "before_loop": record["before_loop"], "encode_overlapped": False}


# ---------------------------------------------------------------------- sat_video


def sat_overrides(assets: Assets, setup: ComparisonSetup) -> list[str]:
    """Model and data of the comparison (what a latent cache records too)."""
    return [*dit_overrides(), f"data.sources=[{assets.clips}]", f"model.first_stage.path={assets.pipeline / 'vae'}",
            f"model.text_encoder.path={assets.pipeline / 'text_encoder'}",
            f"model.dit.mixins.lora.rank={setup.rank}", f"model.dit.mixins.lora.alpha={setup.rank}"]


def _sat_base(configs: Path) -> list[str]:
    return [str(configs / name) for name in (*MODEL_CONFIGS, "lora.yaml")]


def precompute_latents(commands: Commands, configs: Path, assets: Assets, setup: ComparisonSetup,
                       workdir: Path) -> tuple[Path, float]:
    """``tools/precompute_latents.py`` over the clips: the cache folder and the seconds it took."""
    out = workdir / "latents"
    command = [*commands.precompute, "--base", *_sat_base(configs), *sat_overrides(assets, setup), "--out", str(out)]
    start = time.perf_counter()
    _run(command, _env(setup), workdir / "precompute-log.txt")
    return out, time.perf_counter() - start


def run_sat(commands: Commands, configs: Path, assets: Assets, setup: ComparisonSetup, workdir: Path,
            extra: Sequence[str] = ()) -> dict:
    from sat_video.training.metrics import read_metrics

    save = workdir / f"sat-{len(list(workdir.glob('sat-*')))}"
    command = [
        *commands.train, "--base", *_sat_base(configs), *sat_overrides(assets, setup),
        f"train.init_checkpoint={assets.checkpoint}", f"train.save={save}", f"train.train_iters={setup.steps}",
        f"train.save_interval={setup.steps}", f"train.micro_batch_size={setup.batch}", "deepspeed.precision=fp32",
        "train.log_interval=1", "train.report_to=[none]", "train.seed=0", f"data.num_workers={SAT_LOADER_WORKERS}", *extra,
    ]
    _run(command, _env(setup), workdir / f"{save.name}-log.txt")
    records = read_metrics(save)
    data = OmegaConf.load(save / "config.yaml").data
    return {"steps": [sat_step(r, setup.steps_per_epoch) for r in records],
            "startup_s": next((r["startup_s"] for r in records if "startup_s" in r), None),
            "peak_rss_gib": max(r["cpu_peak_rss_gb"] for r in records),  # ru_maxrss / 2**20: GiB
            "encode_overlapped": data.get("prefetch", 0) > 0}  # batches, cached ones too, encoded ahead in a thread


def sat_step(record: dict, steps_per_epoch: int) -> dict:
    """One metrics.jsonl record (log_interval 1) as a step: time, epoch (counted from 0; from the step number
    when the trainer logs none) and whichever profile buckets it logs."""
    step = {"step_time_s": record["step_time_s"], "epoch": record.get("epoch", (record["step"] - 1) // steps_per_epoch)}
    for key, bucket in zip(("data_wait_s", *BUCKETS[1:]), BUCKETS):
        if key in record:
            step[bucket] = record[key]
    if record.get("cache_hit_rate") is not None:  # null for a step that looked nothing up
        step["cache_hit_rate"] = record["cache_hit_rate"]
    return step


def _env(setup: ComparisonSetup) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(setup.threads)}


def _run(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------------- the comparison


def split_cold_warm(steps: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Steps of the first epoch and of the later ones, without the run's very first step (warm-up of both
    trainers: lazy initialisation, first allocations)."""
    later = steps[1:]
    return [s for s in later if s["epoch"] == 0], [s for s in later if s["epoch"] > 0]


def profile_split(steps: Sequence[dict], encode_overlapped: bool) -> dict[str, float] | None:
    """Share of the steps' total time per bucket; ``other`` is the rest of the step, which the encoding is not part of
    when it ran in another thread (``encode_overlapped``: its time is then work hidden behind the step, or waited for
    in ``data_s``). ``None`` when the steps log no buckets."""
    total = sum(s["step_time_s"] for s in steps)
    if not steps or not total or not any(bucket in steps[0] for bucket in BUCKETS):
        return None
    shares = {bucket: sum(s.get(bucket, 0.0) for s in steps) / total for bucket in BUCKETS}
    in_step = sum(share for bucket, share in shares.items() if not (encode_overlapped and bucket == "encode_s"))
    return {**shares, "other": 1.0 - in_step}


def summarize(runs: Sequence[dict]) -> dict:
    """Medians over the pooled steps (cold, warm) and over the runs (start-up, peak RSS) of one row."""
    cold, warm = [], []
    for run in runs:
        run_cold, run_warm = split_cold_warm(run["steps"])
        cold += run_cold
        warm += run_warm
    hits = [s["cache_hit_rate"] for s in warm if "cache_hit_rate" in s]
    # start-up and first epoch together: where each trainer puts its encoding of the clips does not matter
    first_epoch = [r["startup_s"] + sum(s["step_time_s"] for s in split_cold_warm(r["steps"])[0]) for r in runs
                   if r["startup_s"]]
    return {
        "cold": statistics.median(s["step_time_s"] for s in cold) if cold else None,
        "warm": statistics.median(s["step_time_s"] for s in warm) if warm else None,
        "cold_steps": len(cold), "warm_steps": len(warm), "runs": len(runs),
        "startup": statistics.median(r["startup_s"] for r in runs) if all(r["startup_s"] for r in runs) else None,
        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs),
        "first_epoch_done": statistics.median(first_epoch) if len(first_epoch) == len(runs) else None,
        "profile_cold": profile_split(cold, runs[0]["encode_overlapped"]),
        "profile_warm": profile_split(warm, runs[0]["encode_overlapped"]),
        "encode_overlapped": runs[0]["encode_overlapped"],
        "warm_cache_hit_rate": statistics.mean(hits) if hits else None,
    }


SAT_RAW, SAT_CACHE, DIFFUSERS = "sat_video, raw video (default)", "sat_video, explicit latent cache", "diffusers"


def compare(commands: Commands, configs: Path, workdir: Path, setup: ComparisonSetup, script: Path | None = None) -> dict:
    """Build the assets from the model configs in ``configs``, run every row ``setup.rounds`` times in turn, and
    summarise each row."""
    script, provenance = diffusers_script(script)  # before minutes of work, so that a missing script fails at once
    assets = build_assets(configs, workdir, setup)
    cache, precompute_s = precompute_latents(commands, configs, assets, setup, workdir)
    rows = {
        SAT_RAW: lambda: run_sat(commands, configs, assets, setup, workdir),
        SAT_CACHE: lambda: run_sat(commands, configs, assets, setup, workdir, [f"data.latent_cache={cache}"]),
        DIFFUSERS: lambda: run_diffusers(commands, configs, script, assets, setup, workdir),
    }
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    load_before = load_average()
    for round_ in range(setup.rounds):
        for name in list(rows) if round_ % 2 == 0 else reversed(list(rows)):
            runs[name].append(rows[name]())
            print(f"trainers round {round_ + 1}/{setup.rounds}: {name} done", flush=True)
    load = [load_before, load_average()] if load_before else []
    before_loop = [r["before_loop"]["encode_s"] for r in runs[DIFFUSERS] if r["before_loop"]]
    return {
        "rows": {name: summarize(row_runs) for name, row_runs in runs.items()},
        "diffusers": provenance,
        "precompute_s": precompute_s,
        "diffusers_encode_before_loop_s": statistics.median(before_loop) if before_loop else None,
        "load": load,
        "setup": setup,
    }

