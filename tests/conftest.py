"""Shared helpers: tiny configs of every shipped model, randomised weights, inputs."""

import os
from pathlib import Path

import pytest
import torch

import sat_video

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"]


def tiny_config(variant: str, *overrides: str):
    return sat_video.load_config([ROOT / "configs" / f"{variant}.yaml", ROOT / "configs" / "tiny.yaml"], overrides)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised parts (modulations, gates, tables) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def tiny_inputs(cfg, batch=2, frames=4, height=None, width=None, seed=0):
    dit_config = cfg.model.dit
    generator = torch.Generator().manual_seed(seed)
    height, width = height or dit_config.latent_height, width or dit_config.latent_width
    x = torch.randn(batch, frames, dit_config.in_channels, height, width, generator=generator)
    context = torch.randn(batch, dit_config.text_length, dit_config.text_hidden_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    ofs = torch.full((batch,), 2.0) if dit_config.ofs_embed_dim else None
    return x, timesteps, context, ofs


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """Real mp4 clips of moving shapes with captions (SFT layout) and a tiny T5 trained on those captions."""
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5

    root = tmp_path_factory.mktemp("train_assets")
    items = make_moving_shapes(root / "data", num_videos=4, num_frames=16, height=64, width=64, fps=8, seed=0)
    make_tiny_t5([caption for _, caption in items], root / "t5", d_model=32)
    return root
