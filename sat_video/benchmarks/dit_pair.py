"""A sat_video DiT and diffusers' ``CogVideoXTransformer3DModel`` with the same weights and inputs, ready to time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sat_video.benchmarks.measure import autocast


class DiTPair:
    """sat_video's DiT (random weights everywhere, zero-initialised parts included), diffusers' model with the
    same weights, and inputs at the model's own latent size (so diffusers uses its stored position table). Building it
    runs one fp32 step of each and refuses models whose gradients differ.

    Args:
        cfg: a loaded config (``model.dit`` is used); diffusers must be able to express it.
        batch: samples per step.
        device: where both models and the inputs live.
    """

    def __init__(self, cfg, batch: int, device: torch.device):
        from sat_video.formats.diffusers_format import diffusers_rotary_embedding
        from sat_video.model.build import build_dit
        from sat_video.model.config import DiTConfig

        dit_config = DiTConfig.from_config(cfg)
        torch.manual_seed(0)
        self.ours = build_dit(cfg)
        with torch.no_grad():
            for param in self.ours.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        self.theirs = diffusers_twin(self.ours, dit_config)
        self.ours.to(device).train()
        self.theirs.to(device).train()
        self.device = device

        self.x = torch.randn(
            batch,
            dit_config.latent_frames,
            dit_config.in_channels,
            dit_config.latent_height,
            dit_config.latent_width,
            device=device,
        )
        self.context = torch.randn(batch, dit_config.text_length, dit_config.text_hidden_size, device=device)
        self.timesteps = torch.randint(0, 1000, (batch,), device=device)
        rope = diffusers_rotary_embedding(dit_config, dit_config.latent_frames, dit_config.latent_height, dit_config.latent_width)
        self.rope = tuple(r.to(device) for r in rope) if rope is not None else None
        grid = dit_config.token_grid(dit_config.num_frames, dit_config.latent_height, dit_config.latent_width)
        self.tokens = dit_config.text_length + grid.num_tokens
        self.params = sum(p.numel() for p in self.ours.parameters())

        for fn in self.steps(torch.float32).values():
            fn()
        check_same_gradients(self.ours, self.theirs, dit_config)

    def forward(self, model: torch.nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def run():
            with autocast(self.device, dtype):
                if model is self.theirs:
                    return model(self.x, self.context, self.timesteps, image_rotary_emb=self.rope, return_dict=False)[0]
                return model(self.x, self.timesteps, self.context)

        return run

    def step(self, model: torch.nn.Module, dtype: torch.dtype) -> Callable[[], None]:
        """One training step's forward and backward (no optimizer): loss = mean squared output, in fp32."""
        forward = self.forward(model, dtype)

        def run():
            model.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()

        return run

    def steps(self, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
        return {"sat_video": self.step(self.ours, dtype), "diffusers": self.step(self.theirs, dtype)}


def diffusers_twin(ours: torch.nn.Module, dit_config) -> torch.nn.Module:
    """diffusers' ``CogVideoXTransformer3DModel`` holding ``ours``'s weights, built on the device ``ours`` is on."""
    from diffusers import CogVideoXTransformer3DModel

    from sat_video.formats.diffusers_format import to_diffusers_config, to_diffusers_state_dict

    device = next(ours.parameters()).device
    with torch.device(device):
        theirs = CogVideoXTransformer3DModel(**to_diffusers_config(dit_config))
    theirs.to(device)  # a table made on the host (numpy) would stay there otherwise
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict(), dit_config), strict=True)
    return theirs


def check_same_gradients(ours, theirs, dit_config) -> None:
    """Refuse to time two models that do not compute the same gradients (fp32): the comparison would be void."""
    from sat_video.formats.diffusers_format import to_diffusers_state_dict

    expected = to_diffusers_state_dict({name: p.grad for name, p in ours.named_parameters()}, dit_config)
    # Some gradients are zero up to rounding (the key bias without RoPE: softmax ignores a shift shared by all keys),
    # so errors are relative to each tensor's largest gradient, or to 1e-3 of the largest one overall if larger.
    floor = 1e-3 * max(g.abs().max() for g in expected.values())
    for name, param in theirs.named_parameters():
        if name.startswith("norm_final."):  # its weights carry the final-layer eps fold, so its gradient is rescaled
            continue
        error = (param.grad - expected[name]).abs().max() / expected[name].abs().max().clamp_min(floor)
        if error > 1e-4:
            raise AssertionError(f"{name}: the gradients of sat_video and diffusers differ (relative {error:.1e})")
