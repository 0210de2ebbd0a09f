"""The sizes the benchmarks run at: ``tiny`` (seconds, what the CI test runs) and ``default`` (benchmarks/RESULTS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sat_video.benchmarks.sampling_memory import DecodeCase
from sat_video.benchmarks.shard_streaming import ShardScale
from sat_video.benchmarks.trainer_comparison import ComparisonSetup
from sat_video.benchmarks.training_memory import MemoryGrid
from sat_video.benchmarks.vae_training import VaeTrainingScale
from sat_video.fixtures.tiny_vae import TINY_VAE_ARCHITECTURE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DiTSize:
    """One model shape compared with diffusers: ``configs/<variant>.yaml`` plus ``overrides``."""

    name: str
    variant: str
    overrides: tuple[str, ...]
    batch: int
    flops_target: bool = False
    """The FLOP/s target (>= 60% of the fp32 GEMM peak) is judged at this size."""

    def load(self, configs: Path):
        """The config of this size, from the folder of the model configs."""
        from sat_video.config.loader import load_config

        return load_config([configs / f"{self.variant}.yaml"], list(self.overrides))


@dataclass(frozen=True)
class Preset:
    dits: tuple[DiTSize, ...]
    checkpointing: str
    """Name of the DiT size the activation-checkpointing comparison runs at."""
    gemm_sizes: tuple[int, ...]
    warmup: int
    reps: int
    clip: tuple[int, int, int]
    """Frames, height, width of the clips the data-loading section decodes."""
    clip_videos: int
    clip_batches: int
    train_videos: int
    train_iters: int
    sequence_parallel: DiTSize
    """A long video (many latent frames, thousands of tokens) at a small width, for the sequence-parallel row."""
    vae_decode: DecodeCase
    """The VAE decode timed exactly and in tiles."""
    full_size: bool
    """Predict full-size sampling memory for the published models (a minute of probes at their real widths)."""
    trainers: ComparisonSetup | None
    """Clips, steps and rounds of the fine-tuning comparison with diffusers' LoRA script; ``None``: not run (the tiny
    preset: a dozen training processes are a benchmark, not a CI test; ``--only trainers --sizes tiny`` still runs it)."""
    training_memory: MemoryGrid
    """The planner's validation runs (a few seconds each)."""
    ema_ranks: int
    """Processes of the ZeRO-2 run whose per-rank share of the moving average is reported (1 in the tiny preset: the
    code path; the tests check the split over two)."""
    shards: ShardScale
    """Sample counts, shard size and decode sizes of the data-at-scale section."""
    vae_training: VaeTrainingScale
    """The VAE and clips of the VAE-training section (``tools/bench.py --only vae``)."""


def _dit(
    name, variant, batch, hidden, layers, heads, latent_hw, frames, text, text_hidden, flops_target=False, **more
) -> DiTSize:
    keys = dict(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, latent_height=latent_hw[0],
                latent_width=latent_hw[1], num_frames=frames, text_length=text, text_hidden_size=text_hidden, **more)
    return DiTSize(name, variant, tuple(f"model.dit.{k}={v}" for k, v in keys.items()), batch, flops_target)


PRESETS = {
    "tiny": Preset(
        dits=(_dit("tiny", "cogvideox_5b", 2, 64, 2, 2, (8, 8), 13, 8, 32),),
        checkpointing="tiny", gemm_sizes=(128, 256), warmup=1, reps=3,
        clip=(9, 64, 64), clip_videos=2, clip_batches=4, train_videos=2, train_iters=4,
        sequence_parallel=_dit("tiny", "cogvideox_5b", 1, 64, 2, 2, (16, 16), 29, 8, 32),
        vae_decode=DecodeCase(9, 64, 96, (32, 48), (8, 8), ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")),
        full_size=False, trainers=None,
        # one run: the section's code path, not the validation
        training_memory=MemoryGrid(recipes=("LoRA",), stages=(2,), sizes=((5, 48, 80),)), ema_ranks=1,
        shards=ShardScale(samples=(20,), folder=(), per_shard=10, decode_sizes=((9, 64, 96),), decode_clips=2),
        vae_training=VaeTrainingScale("The tiny VAE (`TINY_VAE_ARCHITECTURE`)", sizes=((9, 16, 16), (9, 16, 32)),
                                      timed=((9, 16, 16),), reps=1, architecture=TINY_VAE_ARCHITECTURE,
                                      trainable=("decoder",))),  # the code path; all would double its seconds
    "default": Preset(
        dits=(
            # 5B layout (3D RoPE), 4 x 16 x 16 latents -> 256 video + 64 text tokens
            _dit("small", "cogvideox_5b", 2, 256, 4, 4, (16, 16), 13, 64, 512),
            # 5B layout, 4 x 32 x 32 latents -> 1024 video + 226 text tokens
            _dit("mid", "cogvideox_5b", 1, 512, 8, 8, (32, 32), 13, 226, 4096, flops_target=True),
            # CogVideoX-2B's block (1920 wide, 30 heads, sin-cos positions) on one 60 x 90 latent frame, 1 layer
            _dit("2b_layer", "cogvideox_2b", 1, 1920, 1, 30, (60, 90), 1, 226, 4096),
        ),
        checkpointing="mid", gemm_sizes=(1024, 2048, 4096), warmup=2, reps=9,
        clip=(49, 480, 720), clip_videos=4, clip_batches=12, train_videos=4, train_iters=20,
        # 5B layout, 8 x 32 x 32 latents -> 2048 video + 16 text tokens, 4 blocks of width 128
        sequence_parallel=_dit("long", "cogvideox_5b", 1, 128, 4, 4, (32, 32), 29, 16, 64, time_embed_dim=64),
        # CogVideoX's VAE (random weights): 3 latent frames of 12 x 20, tiles of 8 x 12 latents sharing 2 x 3
        vae_decode=DecodeCase(9, 96, 160, (64, 96), (16, 24), ("cogvideox_2b.yaml", "tiny.yaml")),
        full_size=True, trainers=ComparisonSetup(clips=16, steps=32, rounds=3),
        # three sizes that differ in frames and area, none of the planner's tests' (9 and 13 x 64 x 64)
        training_memory=MemoryGrid(recipes=("LoRA", "SFT"), stages=(2, 3), sizes=((5, 48, 80), (9, 80, 96), (13, 96, 128))),
        ema_ranks=2,
        # start-up at 1k to 100k samples (folder sources to 10k: a header read per file); decoding at 1.0's and 1.5's sizes
        shards=ShardScale(samples=(1_000, 10_000, 100_000), folder=(1_000, 10_000), per_shard=1_000,
                          decode_sizes=((49, 480, 720), (49, 768, 1360)), decode_clips=4),
        # CogVideoX's VAE (AutoencoderKLCogVideoX's defaults): 17 and 25 frames at 32 x 32 and 17 at 32 x 64, differing in
        # frames and in area; 5 and 7 latent frames decode in two and three chunks, as every target decodes in several
        vae_training=VaeTrainingScale("CogVideoX's VAE (`AutoencoderKLCogVideoX()`'s default arguments)",
                                      sizes=((17, 32, 32), (25, 32, 32), (17, 32, 64)), timed=((17, 32, 32),), reps=2)),
}
