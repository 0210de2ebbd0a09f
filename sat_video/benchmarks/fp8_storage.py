"""Section *fp8-stored frozen weights*: a LoRA step (forward and backward) with the frozen weights stored in the
compute dtype vs fp8 (``model.dit.storage_dtype``): step time, DiT weight bytes, what the forward pass keeps for
backward, and how far the output moves; plus the weight bytes of the published models (built on the meta device).
Regenerates alone: ``tools/bench.py --only fp8_storage``."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import regenerate_alone, table
from sat_video.benchmarks.measure import MIB, interleaved_times, median, saved_bytes
from sat_video.model.config import DiTConfig
from sat_video.model.storage_dtype import STORAGE_DTYPES, store_frozen_weights, weight_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from sat_video.benchmarks.context import Bench

LORA = ["model.dit.mixins.lora.rank=16", "model.dit.mixins.lora.targets=[attention.query_key_value, attention.dense]"]
FULL_SIZE = ("cogvideox_2b", "cogvideox_5b")
GIB = 2**30
STANDALONE = "fp8_storage"


def _lora_dit(configs: Path, variant: str, overrides: list[str], device: torch.device | str):
    from sat_video.config.loader import load_config
    from sat_video.model.build import build_dit
    from sat_video.training.optim import select_trainable

    cfg = load_config([configs / f"{variant}.yaml", configs / "lora.yaml"], [*overrides, *LORA])
    with torch.device(device):
        model = build_dit(cfg)
    select_trainable(model, ["mixins.lora.*"])
    return cfg, model


def run(bench: Bench) -> dict:
    """``rows``: per compute dtype and storage, at the preset's checkpointing size; ``full_size``: weight bytes of the
    published models in bf16 and fp8 storage; ``command``: what regenerates the section."""
    size = next(s for s in bench.preset.dits if s.name == bench.preset.checkpointing)
    rows = [row for label, dtype in bench.dtypes.items() for row in _rows(bench, size, label, dtype)]
    return {"rows": rows, "full_size": [_full_size(bench.configs, variant) for variant in FULL_SIZE],
            "command": bench.command_alone(STANDALONE)}


def _rows(bench: Bench, size, label: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)  # the same weights in every run
    cfg, base = _lora_dit(bench.configs, size.variant, list(size.overrides), "cpu")
    with torch.no_grad():  # trained-like weights: non-zero gates and LoRA B, so every weight reaches the output
        for param in base.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    base.to(bench.device, dtype).train()  # the engine's cast: every weight in the compute dtype
    models = {label: base}
    for storage in STORAGE_DTYPES:
        models[storage] = copy.deepcopy(base)
        store_frozen_weights(models[storage], storage)
    dit = DiTConfig.from_config(cfg)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size.batch, dit.latent_frames, dit.in_channels, dit.latent_height, dit.latent_width,
                    generator=generator).to(bench.device, dtype)
    context = torch.randn(size.batch, dit.text_length, dit.text_hidden_size, generator=generator).to(bench.device, dtype)
    timesteps = torch.randint(0, 1000, (size.batch,), generator=generator).to(bench.device)

    def forward(model):
        return lambda: model(x, timesteps, context)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x, timesteps, context).float().square().mean().backward()

        return run

    times = interleaved_times({name: step(m) for name, m in models.items()}, device=bench.device,
                              warmup=bench.preset.warmup, reps=bench.preset.reps)
    with torch.no_grad():
        reference = base(x, timesteps, context).float()
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            out = model(x, timesteps, context).float()
        rows.append({"size": size.name, "dtype": label, "storage": name, "time": median(times[name]),
                     "weights": weight_bytes(model), "saved": saved_bytes(forward(model), bench.device),
                     "error": ((out - reference).norm() / reference.norm()).item()})
        print(f"fp8 storage {size.name} {label} {name}: {rows[-1]['time']:.4f}s, weights {rows[-1]['weights'] / MIB:.2f} MiB, "
              f"output error {rows[-1]['error']:.2e}", flush=True)
    return rows


def _full_size(configs: Path, variant: str) -> dict:
    _, model = _lora_dit(configs, variant, [], "meta")
    model.to(torch.bfloat16)
    lora = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.startswith("mixins.lora."))
    bf16 = weight_bytes(model) - lora  # the DiT's own weights; LoRA's factors are the same in both
    store_frozen_weights(model, "float8_e4m3fn")
    return {"variant": variant, "bf16": bf16, "fp8": weight_bytes(model) - lora}


def render(result: dict) -> list[str]:
    return [
        "## fp8-stored frozen weights (LoRA)",
        "",
        regenerate_alone(result["command"]),
        "",
        "`model.dit.storage_dtype`: the attention and MLP weights of the blocks are kept in fp8 and upcast to the compute "
        "dtype before each matmul; norms, embeddings, AdaLN modulations and the output head stay in the compute dtype "
        "(docs/lora_and_i2v.md). A LoRA step (forward and backward, rank 16 on `attention.*`); *error*: relative L2 "
        "distance of the output from compute-dtype storage.",
        "",
        table(
            ["size", "compute dtype", "storage", "step (s)", "extra time", "DiT weights (MiB)", "vs compute dtype",
             "saved after forward (MiB)", "output error"],
            [
                [r["size"], r["dtype"], r["storage"], f"{r['time']:.4f}", f"{r['time'] / first['time'] - 1:+.0%}",
                 f"{r['weights'] / MIB:.2f}", f"{r['weights'] / first['weights']:.3f}", f"{r['saved'] / MIB:.1f}",
                 f"{r['error']:.1e}"]
                for first, r in _with_baseline(result["rows"])
            ],
        ),
        "",
        "Full size, DiT weights without LoRA's factors (built on the meta device):",
        "",
        table(
            ["model", "bf16 storage (GiB)", "fp8 storage (GiB)", "ratio"],
            [[r["variant"], f"{r['bf16'] / GIB:.2f}", f"{r['fp8'] / GIB:.2f}", f"{r['fp8'] / r['bf16']:.3f}"]
             for r in result["full_size"]],
        ),
    ]


def _with_baseline(rows: list[dict]) -> list[tuple[dict, dict]]:
    baseline: dict = {}
    pairs = []
    for row in rows:
        if row["storage"] not in STORAGE_DTYPES:
            baseline = row
        pairs.append((baseline, row))
    return pairs
