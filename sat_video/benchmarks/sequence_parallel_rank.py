"""One rank of the sequence-parallel section (DiT forward + backward, fp32).

    python -m sat_video.benchmarks.sequence_parallel_rank '<json args>'                         # S = 1
    torchrun --nproc_per_node 2 -m sat_video.benchmarks.sequence_parallel_rank '<json args>'    # S = 2

Args (JSON): ``config`` (a model config file, or a list of them stacked), ``overrides`` (config keys of the model),
``batch``, ``warmup``, ``reps``, ``device`` (one process; under torchrun each rank takes its own GPU, or the CPU);
optional ``dtype`` (``bfloat16``: weights and inputs in it; default fp32) and ``checkpointing`` (activation
checkpointing). Under torchrun the
model is split over all processes. Rank 0 prints one JSON line: the median step time, this rank's peak activation
bytes (allocated during the step, above the weights and gradients that exist before it), the share of one
profiled step spent in collectives, and the first step's loss (the mean squared output over all ranks' tokens).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sat_video.benchmarks.measure import interleaved_times, median, step_peak_bytes, synchronize

COLLECTIVES = ("all_to_all", "alltoall", "all_gather", "allgather", "all_reduce", "allreduce", "nccl")


def communication_share(step, device: torch.device) -> float:
    """Fraction of one profiled step spent in collectives: their kernels' share of GPU time on CUDA (NCCL runs
    asynchronously), their self CPU time on CPU (gloo blocks the calling thread)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        step()
        synchronize(device)
    events = prof.key_averages()
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(spent(e) for e in events)
    return sum(spent(e) for e in events if any(c in e.key.lower() for c in COLLECTIVES)) / total if total else 0.0


def measure(args: dict) -> dict:
    """Build the model of ``args``, split it over this job's processes (when more than one), time it."""
    from sat_video.config.loader import load_config
    from sat_video.model.build import build_dit
    from sat_video.model.config import DiTConfig

    configs = args["config"] if isinstance(args["config"], list) else [args["config"]]
    cfg = load_config(configs, args["overrides"])
    split = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.get("device", "cpu"))
    torch.manual_seed(0)
    dit = build_dit(cfg)
    if split > 1:
        from sat_video.training.distributed import init_distributed
        from sat_video.training.sequence_parallel import SequenceParallelGroups

        device = init_distributed().device
        SequenceParallelGroups.initialize_sequence_parallel(split).add_to(dit)
    dtype = getattr(torch, args.get("dtype", "float32"))
    dit.to(device, dtype)
    dit.activation_checkpointing = args.get("checkpointing", False)
    d = DiTConfig.from_config(cfg)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args["batch"], d.latent_frames, d.in_channels, d.latent_height, d.latent_width, generator=generator)
    text = torch.randn(args["batch"], d.text_length, d.text_hidden_size, generator=generator)
    x, text, timesteps = x.to(device, dtype), text.to(device, dtype), torch.full((args["batch"],), 500, device=device)
    losses = []

    def step():
        dit.zero_grad(set_to_none=False)
        loss = dit(x, timesteps, text).float().square().mean() / split
        loss.backward()
        losses.append(loss.detach())

    step()  # allocates the gradients, so that the peak below is the activations'
    loss = losses[0]
    if split > 1:
        torch.distributed.all_reduce(loss)
    times = interleaved_times({"step": step}, device=device, warmup=args["warmup"], reps=args["reps"])["step"]
    tokens = d.token_grid(d.num_frames, d.latent_height, d.latent_width).num_tokens
    return {
        "split": split,
        "video_tokens": tokens,
        "tokens_per_rank": -(-tokens // split),
        "time": median(times),
        "activations": step_peak_bytes(step, device),  # above the weights and gradients, which exist before the step
        "communication": communication_share(step, device) if split > 1 else 0.0,
        "loss": loss.item(),
    }


def main(argv: list[str]) -> int:
    result = measure(json.loads(argv[0]))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result), flush=True)
    if result["split"] > 1:
        from sat_video.training.distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
