#!/usr/bin/env python3
"""The built-in tiny default: every shipped CogVideoX variant, end to end, in under a minute on a CPU.

For each of the five model configs, stacked with ``configs/tiny.yaml``: build the model from config
with random weights, save it as a SAT checkpoint, export it with ``tools/convert_to_diffusers.py``,
load the export with diffusers and compare outputs, then import it back with
``tools/convert_from_diffusers.py`` and compare weights. Writes everything under a new folder of
``--out`` (default ``runs/``) and exits non-zero if any check fails.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sat_video  # noqa: E402
from sat_video.config import dit_config  # noqa: E402
from sat_video.diffusers_export import diffusers_rotary_embedding  # noqa: E402

VARIANTS = ["cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"]
TOLERANCE = 1e-5


def _tool(name, *args):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr}")
    return result.stdout.strip()


def run_variant(variant: str, out: Path) -> tuple[int, float, bool]:
    from diffusers import CogVideoXTransformer3DModel

    base = [ROOT / "configs" / f"{variant}.yaml", ROOT / "configs" / "tiny.yaml"]
    cfg = sat_video.load_config(base)
    dims = cfg.model.dit
    generator = torch.Generator().manual_seed(0)
    model = sat_video.build_dit(cfg).eval()
    with torch.no_grad():  # random weights everywhere, zero-initialised modulations included
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    sat_video.save_checkpoint(model, out / "sat", 1)
    _tool("convert_to_diffusers.py", "--base", *base, "--ckpt", out / "sat", "--out", out / "diffusers")

    hf = CogVideoXTransformer3DModel.from_pretrained(out / "diffusers" / "transformer").eval()
    x = torch.randn(1, 4, dims.in_channels, dims.latent_height, dims.latent_width, generator=generator)
    context = torch.randn(1, dims.text_length, dims.text_hidden_size, generator=generator)
    timestep, ofs = torch.tensor([500]), (torch.tensor([2.0]) if dims.ofs_embed_dim else None)
    rope = diffusers_rotary_embedding(dit_config(cfg), 4, dims.latent_height, dims.latent_width)
    with torch.no_grad():
        diff = (model(x, timestep, context, ofs=ofs) - hf(x, context, timestep, ofs=ofs, image_rotary_emb=rope,
                                                           return_dict=False)[0]).abs().max().item()

    _tool("convert_from_diffusers.py", "--diffusers", out / "diffusers", "--out", out / "sat_from_diffusers")
    back = sat_video.build_dit(sat_video.load_config(out / "sat_from_diffusers" / "config.yaml"))
    sat_video.load_checkpoint(back, out / "sat_from_diffusers")
    same = all(torch.allclose(v, back.state_dict()[k], rtol=1e-6, atol=0) for k, v in model.state_dict().items())
    return sum(p.numel() for p in model.parameters()), diff, same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs"), help="parent folder; a new quickstart-<time> folder is made in it")
    args = parser.parse_args()
    run_dir = Path(args.out) / time.strftime("quickstart-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    print("sat_video quickstart: tiny random CogVideoX variants -> SAT checkpoint -> diffusers -> back\n")
    print(f"{'config':<22} {'params':>9} {'max |ours - diffusers|':>24} {'weights after round trip':>26}")
    ok, start = True, time.time()
    for variant in VARIANTS:
        params, diff, same = run_variant(variant, run_dir / variant)
        ok &= diff <= TOLERANCE and same
        print(f"{variant:<22} {params:>9,} {diff:>24.2e} {'identical' if same else 'DIFFERENT':>26}")
    print(f"\n{'all checks passed' if ok else 'CHECKS FAILED'} in {time.time() - start:.1f} s (tolerance {TOLERANCE:g}, fp32)")
    print(f"outputs: {run_dir}/<config>/{{sat, diffusers, sat_from_diffusers}}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
