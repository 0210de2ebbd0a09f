#!/usr/bin/env python3
"""The built-in default, end to end on a CPU in a few minutes: data, training, sampling, export.

1. writes a synthetic dataset of real mp4 clips with captions ("a red circle moving left", ...);
2. builds the frozen stages it needs without downloads: a tiny T5 and its sentencepiece tokenizer trained on
   the captions, and a linear PCA first stage fitted to the clips (CogVideoX's VAE compression: 8x8 pixels,
   4 frames, 16 channels; no real VAE can be trained on a CPU in minutes, see configs/quickstart.yaml);
3. encodes the clips and captions once with ``tools/precompute_latents.py`` and trains a small CogVideoX-5B-layout
   DiT from that latent cache with ``torchrun --nproc_per_node 2 tools/train_video.py`` (DeepSpeed ZeRO-2, gloo);
4. samples one video per caption with ``CogVideoXDDIMScheduler`` and classifier-free guidance, writes the
   mp4s and a contact sheet, and reads shape, colour and direction back from every sample to count how many
   match their captions (``sat_video.fixtures.synthetic.describe_clip``);
5. exports the checkpoint with ``tools/convert_to_diffusers.py`` and checks that diffusers' transformer
   loads it and gives the same output.

Everything goes into a new folder under ``--out`` (default ``runs/``); nothing existing is touched.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sat_video.model.config import DiTConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = [ROOT / "configs" / name for name in ("cogvideox_5b.yaml", "tiny.yaml", "quickstart.yaml")]
TOLERANCE = 1e-5


def new_run_folder(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for index in range(1, 10_000):
        folder = out / f"quickstart-{index}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"{out} holds too many quickstart folders")


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def caption_check(videos) -> str:
    """Read shape, colour and direction back from every sample (``describe_clip``) and compare with its caption."""
    from sat_video.fixtures.synthetic import describe_clip, parse_caption

    counts = {"shape": 0, "colour": 0, "direction": 0}
    for video in videos:
        wanted = dict(zip(("shape", "colour", "direction"), parse_caption(video.prompt)))
        try:
            seen = dict(zip(("shape", "colour", "direction"), describe_clip(video.frames.numpy())))
        except ValueError:  # an untrained model may draw nothing at all
            print(f"  {video.prompt:<32} shows no shape")
            continue
        for key in counts:
            counts[key] += seen[key] == wanted[key]
        misses = [f"{key} {seen[key]}" for key in counts if seen[key] != wanted[key]]
        print(f"  {video.prompt:<32} {'matches' if not misses else 'shows ' + ', '.join(misses)}")
    return ", ".join(f"{key} {count}/{len(videos)}" for key, count in counts.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs"), help="parent folder of the new run folder")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    parser.add_argument("--num-videos", type=int, default=16, help="clips in the synthetic dataset")
    parser.add_argument("--train-iters", type=int, help="default: train.train_iters of configs/quickstart.yaml")
    parser.add_argument("--num-samples", type=int, default=8, help="captions to sample (the first ones of the dataset)")
    args = parser.parse_args(argv)

    import sat_video
    from sat_video.data.clips import ClipSpec
    from sat_video.fixtures.shapes_study import make_frozen_stages, write_shapes

    started = time.perf_counter()
    run = new_run_folder(Path(args.out))
    overrides = [f"data.sources=[{run / 'data'}]", f"model.text_encoder.path={run / 't5'}",
                 f"model.first_stage.path={run / 'first_stage.safetensors'}", f"train.save={run / 'train'}"]
    if args.train_iters:
        overrides.append(f"train.train_iters={args.train_iters}")
    cfg = sat_video.load_config(BASE, overrides)
    dit_config = DiTConfig.from_config(cfg)

    step(f"1. synthetic dataset: {args.num_videos} mp4 clips in {run / 'data'}")
    items = write_shapes(run / "data", cfg, args.num_videos, seed=0)
    captions = [caption for _, caption in items]

    step("2. frozen stages: tiny T5 + sentencepiece tokenizer trained on the captions; PCA first stage fitted to the clips")
    make_frozen_stages(run, cfg, captions, [run / "data"])
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)

    step(f"3. latent cache, then training {cfg.train.train_iters} steps: torchrun --nproc_per_node {args.nproc} "
         "tools/train_video.py (DeepSpeed ZeRO-2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank: the ranks share the cores
    cache = [str(ROOT / "tools" / "precompute_latents.py"), "--base", *map(str, BASE), *overrides, "--out", str(run / "latents")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    training = [
        str(ROOT / "tools" / "train_video.py"),
        "--base",
        *map(str, BASE),
        *overrides,
        f"data.latent_cache={run / 'latents'}",
    ]
    for name, command in (("precomputing latents", [sys.executable, *cache]), ("training", [*launcher, *training])):
        if subprocess.run(command, cwd=ROOT, env=env).returncode:
            print(f"quickstart: {name} failed (see above)", file=sys.stderr)
            return 1

    step(f"4. sampling {args.num_samples} videos (DDIM, {cfg.sample.steps} steps, guidance {cfg.sample.guidance_scale})")
    from sat_video.diffusion.sampling import VideoGenerator, write_samples
    from sat_video.model.build import build_frozen_stages

    with torch.device("meta"):
        dit = sat_video.build_dit(cfg)
    sat_video.load_checkpoint(dit, run / "train")
    stages = build_frozen_stages(cfg.model)
    video_generator = VideoGenerator(dit.eval(), stages, snr_shift_scale=cfg.model.diffusion.snr_shift_scale)
    videos = video_generator.generate(
        captions[: args.num_samples], cfg.sample, num_frames=dit_config.num_frames, height=spec.height, width=spec.width
    )
    written = write_samples(run / "samples", videos, cfg.data.fps)
    matches = caption_check(videos)

    step("5. export to diffusers and compare")
    from diffusers import CogVideoXTransformer3DModel

    from sat_video.formats.diffusers_format import diffusers_rotary_embedding
    from tools.convert_to_diffusers import main as convert_to_diffusers

    base_args = ["--base", *map(str, BASE), *overrides]
    if convert_to_diffusers([*base_args, "--ckpt", str(run / "train"), "--out", str(run / "diffusers")]):
        return 1
    hf = CogVideoXTransformer3DModel.from_pretrained(run / "diffusers" / "transformer").eval()
    latents = torch.stack([v.latents for v in videos[:2]])
    text = stages.encode_text(captions[:2])
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        ours = dit(latents, timesteps, text)
        theirs = hf(
            latents,
            text,
            timesteps,
            image_rotary_emb=diffusers_rotary_embedding(dit_config, latents.shape[1], *latents.shape[3:]),
            return_dict=False,
        )[0]
    diff = (ours - theirs).abs().max().item()

    minutes = (time.perf_counter() - started) / 60
    print(f"\nquickstart finished in {minutes:.1f} min; everything is in {run}")
    print(f"  contact sheet   {written[-1]}")
    print(f"  caption check   {matches}")
    print(f"  videos          {run / 'samples'}/*.mp4")
    print(f"  checkpoint      {run / 'train'} (SAT layout; metrics.jsonl, tensorboard/)")
    print(f"  diffusers       {run / 'diffusers'} (max |sat_video - diffusers| = {diff:.2e})")
    if diff > TOLERANCE:
        print(f"quickstart: the diffusers export differs by {diff:.2e} > {TOLERANCE}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `tools.convert_to_diffusers` from a checkout
    sys.exit(main())
