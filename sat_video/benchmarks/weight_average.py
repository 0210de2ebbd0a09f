"""Section *Moving average of the weights*: what ``train.ema`` costs. A full fine-tuning step (forward, backward and the
AdamW update of every weight) with and without the average, interleaved, at the activation-checkpointing comparison's
size; and the bytes of average each rank holds in a real ``tools/train_video.py`` run under ZeRO-2 on
``Preset.ema_ranks`` processes, against the whole average. Regenerates alone: ``tools/bench.py --only ema``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import met, regenerate_alone, table
from sat_video.benchmarks.measure import MIB, interleaved_times, median

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

STANDALONE = "ema"
OVERHEAD_TARGET = 0.03
"""The issue's target: the average adds at most 3% to a step."""
DECAY = 0.9999


def run(bench: Bench) -> dict:
    """``times``: per compute dtype, a step's median without and with the average; ``memory``: the ZeRO-2 run's bytes;
    ``command``: what regenerates the section."""
    size = next(s for s in bench.preset.dits if s.name == bench.preset.checkpointing)
    times = [_step_times(bench, size, label, dtype) for label, dtype in bench.dtypes.items()]
    return {"size": size.name, "times": times, "memory": _per_rank_memory(bench), "command": bench.command_alone(STANDALONE)}


def _step_times(bench: Bench, size, label: str, dtype: torch.dtype) -> dict:
    from sat_video.model.build import build_dit
    from sat_video.model.config import DiTConfig
    from sat_video.training.config import EmaConfig, OptimizerConfig
    from sat_video.training.ema import ExponentialMovingAverage
    from sat_video.training.optim import FiniteAdamW

    cfg = size.load(bench.configs)
    torch.manual_seed(0)
    model = build_dit(cfg).to(bench.device).train()
    dit = DiTConfig.from_config(cfg)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size.batch, dit.latent_frames, dit.in_channels, dit.latent_height, dit.latent_width,
                    generator=generator).to(bench.device)
    context = torch.randn(size.batch, dit.text_length, dit.text_hidden_size, generator=generator).to(bench.device)
    timesteps = torch.randint(0, 1000, (size.batch,), generator=generator).to(bench.device)
    # fp32 master weights, as DeepSpeed hands its optimizer; the forward in the compute dtype
    optimizers = {"without": FiniteAdamW(model.parameters(), OptimizerConfig()),
                  "with": FiniteAdamW(model.parameters(), OptimizerConfig(),
                                      ExponentialMovingAverage(EmaConfig(enabled=True, decay=DECAY)))}

    def step(optimizer):
        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(bench.device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, timesteps, context).float().square().mean()
            loss.backward()
            optimizer.step()

        return run

    measured = interleaved_times({name: step(opt) for name, opt in optimizers.items()}, device=bench.device,
                                 warmup=bench.preset.warmup, reps=bench.preset.reps)
    row = {"dtype": label, "parameters": sum(p.numel() for p in model.parameters()),
           **{name: median(values) for name, values in measured.items()}}
    print(f"ema {size.name} {label}: {row['without']:.4f}s without, {row['with']:.4f}s with the average", flush=True)
    return row


def _per_rank_memory(bench: Bench) -> dict:
    from sat_video.benchmarks.training_steps import run_program, train_assets
    from sat_video.config.loader import load_config
    from sat_video.model.build import build_dit
    from sat_video.training.metrics import read_metrics
    from sat_video.training.optim import select_trainable

    ranks, assets = bench.preset.ema_ranks, train_assets(bench)
    save = bench.workdir / "ema-zero2"
    keys = [f"data.sources=[{assets.clips}]", f"model.text_encoder.path={assets.t5}", f"train.save={save}",
            "train.report_to=[none]", "train.train_iters=2", "train.save_interval=2", "train.micro_batch_size=1",
            "deepspeed.zero_stage=2", "deepspeed.precision=fp32", "train.ema.enabled=true", "train.log_interval=1"]
    python, script = bench.commands.train[0], bench.commands.train[1:]
    launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [python]
    run_program([*launcher, *script, "--base", *map(str, assets.base), *keys])
    records = read_metrics(save)
    with torch.device("meta"):
        dit = build_dit(load_config(list(assets.base), keys))
    trainable = sum(dit.get_parameter(name).numel() for name in select_trainable(dit, ["*"]))
    return {"ranks": ranks, "rank0": records[-1]["ema_memory_gb"] * 2**30, "whole": 4 * trainable}


def render(result: dict) -> list[str]:
    memory = result["memory"]
    share = memory["rank0"] / memory["whole"]
    rows = [[result["size"], t["dtype"], f"{t['parameters'] / 1e6:.1f} M", f"{t['without']:.4f}", f"{t['with']:.4f}",
             f"{t['with'] / t['without'] - 1:+.1%}", met(t["with"] / t["without"] - 1 <= OVERHEAD_TARGET)]
            for t in result["times"]]
    return [
        "## Moving average of the weights (train.ema)",
        "",
        regenerate_alone(result["command"]),
        "",
        f"A full fine-tuning step (forward, backward, the AdamW update of every weight; decay {DECAY}) without and with "
        "the average, which the optimizer updates after its step (`sat_video/training/ema.py`); medians of interleaved "
        f"repetitions. Target: at most {OVERHEAD_TARGET:.0%} more per step.",
        "",
        table(["size", "dtype", "trainable", "step without (s)", "step with (s)", "overhead", "target"], rows),
        "",
        f"Per-rank memory: `tools/train_video.py` under ZeRO-2 on {memory['ranks']} process(es), fp32, every weight "
        f"trained: rank 0 holds {memory['rank0'] / MIB:.3f} MiB of average (`ema_memory_gb`), {share:.2f} of the whole "
        f"{memory['whole'] / MIB:.3f} MiB (4 bytes per trainable parameter); the rest is on the other ranks, as Adam's "
        "moments are.",
    ]
