"""One rank of the sequence-parallel parity check (tests/model/test_sequence_parallel.py starts two).

For every variant, at a token count that two ranks do not split evenly, each rank computes the unsplit model
itself, then the same weights split over the two ranks, and prints one JSON line of differences: outputs, the
sum over ranks of parameter gradients (each rank backpropagates loss / S; also with activation checkpointing) and the
latents of a guided sampling run.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from sat_video.diffusion.config import SampleConfig
from sat_video.diffusion.sampling import denoise
from sat_video.model.build import build_dit
from sat_video.training.distributed import exit_process, shutdown
from sat_video.training.sequence_parallel import SequenceParallelGroups
from tests.conftest import VARIANTS, randomize_, tiny_config


def run_variant(variant, groups):
    frames = 2 if "1.5" in variant else 3  # 1.5 patches two latent frames: 1 x 3 x 5 tokens, else 3 x 3 x 5
    cfg = tiny_config(variant, "model.dit.latent_height=6", "model.dit.latent_width=10")
    torch.manual_seed(0)
    dit = randomize_(build_dit(cfg))
    d = cfg.model.dit
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, d.in_channels, 6, 10, generator=generator)
    text = torch.randn(2, d.text_length, d.text_hidden_size, generator=generator)
    timesteps, ofs = torch.tensor([10, 700]), (torch.full((2,), 2.0) if d.ofs_embed_dim else None)
    target = torch.randn(2, frames, d.out_channels, 6, 10, generator=generator)
    settings = SampleConfig(steps=3, guidance_scale=6.0)
    noise = torch.randn(1, frames, d.out_channels, 6, 10, generator=generator)
    i2v_channels = d.in_channels - d.out_channels
    image = torch.randn(1, frames, i2v_channels, 6, 10, generator=generator) if i2v_channels else None

    def forward_backward(share):
        dit.zero_grad(set_to_none=True)
        out = dit(x, timesteps, text, ofs)
        (((out - target) ** 2).mean() * share).backward()
        latents = denoise(dit, noise, text[:1], settings, snr_shift_scale=3.0, image_latents=image,
                          ofs=2.0 if d.ofs_embed_dim else None, generator=torch.Generator().manual_seed(5))
        return out.detach(), {n: p.grad.clone() for n, p in dit.named_parameters()}, latents

    out, grads, latents = forward_backward(1.0)
    groups.add_to(dit)
    tokens_per_rank = []
    hook = dit.transformer.layers[0].register_forward_hook(lambda m, args, o: tokens_per_rank.append(args[0].shape[1]))
    sp_out, sp_grads, sp_latents = forward_backward(1.0 / groups.layout.sequence_size)
    hook.remove()
    dit.activation_checkpointing = True  # backward recomputes each block, its all-to-alls included
    _, checkpointed_grads, _ = forward_backward(1.0 / groups.layout.sequence_size)

    def relative_error(split, whole):  # to the tensor's scale: the all-to-alls change the order of sums
        return (split - whole).abs().max().item() / whole.abs().max().item()

    def gradient_error(split_grads):
        worst = 0.0
        for name, grad in split_grads.items():
            dist.all_reduce(grad)
            scale = max(grads[name].abs().max().item(), 1e-3)  # gradients near zero (a key bias under softmax) are noise
            worst = max(worst, (grad - grads[name]).abs().max().item() / scale)
        return worst

    return {
        "variant": variant,
        "video_tokens": frames // (d.patch_size_t or 1) * 15,
        "tokens_per_rank": tokens_per_rank[0] - d.text_length,
        "output": relative_error(sp_out, out),
        "gradient": gradient_error(sp_grads),
        "gradient_checkpointed": gradient_error(checkpointed_grads),
        "latents": relative_error(sp_latents, latents),
    }


def main():
    deepspeed.init_distributed("gloo", verbose=False)
    torch.set_num_threads(1)
    groups = SequenceParallelGroups.initialize_sequence_parallel(int(sys.argv[1]))
    for variant in VARIANTS:
        result = run_variant(variant, groups)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    del groups  # it holds the process groups, whose gloo threads must end before the interpreter finalizes
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
