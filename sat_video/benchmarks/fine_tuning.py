"""Section *Fine-tuning*: ``tools/train_video.py`` against diffusers' LoRA script (:mod:`.trainer_comparison`).

It also regenerates alone (``tools/bench.py --only trainers``, a dozen training processes): ``STANDALONE``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sat_video.benchmarks.markdown import met, regenerate_alone, table
from sat_video.benchmarks.trainer_comparison import DIFFUSERS, DIT_SIZES, SAT_CACHE, SAT_LOADER_WORKERS, SAT_RAW, compare

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

HEADING = "## Fine-tuning: sat_video vs diffusers' train_cogvideox_lora.py"
STANDALONE = "trainers"
PROFILE_LABELS = {"data_s": "data", "encode_s": "VAE + T5", "forward_s": "DiT forward", "backward_s": "backward",
                  "optimizer_s": "clip + optimizer"}


def run(bench: Bench) -> dict:
    """``result``: the comparison (``None`` when ``bench.trainers`` is), ``command``: what regenerates the section."""
    if bench.trainers is None:
        return {"result": None, "command": bench.command_alone(STANDALONE)}
    workdir = bench.workdir / "trainers"
    workdir.mkdir()
    result = compare(bench.commands, bench.configs, workdir, bench.trainers, bench.diffusers_script)
    for name, row in result["rows"].items():
        print(f"fine-tuning, {name}: {_seconds(row['cold'], 3)} s/step first epoch, {_seconds(row['warm'], 3)} later, "
              f"start-up {_seconds(row['startup'], 1)} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return {"result": result, "command": bench.command_alone(STANDALONE)}


def render(rows: dict) -> list[str]:
    if rows["result"] is None:
        return [HEADING, "", f"Not run at these sizes; `{rows['command']}` runs it."]
    return _lines(rows["result"], rows["command"])


def _seconds(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _profile_cell(row: dict, name: str, epochs: str) -> str:
    profile = row[f"profile_{epochs}"]
    if profile is None:
        return "n/a"
    labels = {**PROFILE_LABELS, "data_s": "data wait" if name != DIFFUSERS else "data",
              "encode_s": "T5" if name == DIFFUSERS else "VAE + T5"}
    in_step = [key for key in PROFILE_LABELS if not (row["encode_overlapped"] and key == "encode_s")]
    share = {key: round(value, 2) + 0.0 for key, value in profile.items()}  # + 0.0: no "-0%" for rounding noise
    cell = ", ".join(f"{labels[key]} {share[key]:.0%}" for key in in_step) + f", other {share['other']:.0%}"
    if row["encode_overlapped"]:
        cell += f"; in a background thread, ahead of the step: encoding {share['encode_s']:.0%}"
    return cell


def _lines(result: dict, command: str) -> list[str]:
    setup, rows = result["setup"], result["rows"]
    theirs = rows[DIFFUSERS]
    comparison = []
    for name in (SAT_RAW, SAT_CACHE, DIFFUSERS):
        row = rows[name]
        cold, warm = _ratio(row["cold"], theirs.get("cold")), _ratio(row["warm"], theirs.get("warm"))
        comparison.append([name, _seconds(row["cold"], 3), _seconds(row["warm"], 3),
                           f"{_times(cold)} / {_times(warm)}", _seconds(row["startup"], 1),
                           _seconds(row["first_epoch_done"], 1),
                           f"{row['peak_rss_gib']:.2f}", _profile_cell(row, name, "cold"), _profile_cell(row, name, "warm")])
    raw = rows[SAT_RAW]
    targets = []
    for label, key, limit in (("later epochs' step time", "warm", 1.0), ("first epoch's step time", "cold", 1.5),
                              ("start-up", "startup", 1.0), ("peak RSS", "peak_rss_gib", 1.1)):
        ratio = _ratio(raw[key], theirs.get(key))
        targets.append([f"raw video: {label} <= {limit:.1f}x diffusers'", _times(ratio),
                        "n/a" if ratio is None else met(ratio <= limit)])
    hits = raw["warm_cache_hit_rate"]
    load = result["load"]
    return [
        HEADING,
        "",
        regenerate_alone(command),
        "",
        f"LoRA fine-tuning (rank {setup.rank}, alpha {setup.rank}: scale 1, on q, k, v and the attention output; base "
        "weights frozen) of one tiny CogVideoX-2B-layout DiT (`configs/cogvideox_2b.yaml configs/tiny.yaml "
        "configs/tiny_train.yaml` with " + ", ".join(f"{k}={v}" for k, v in DIT_SIZES.items()) + "), the same "
        f"initial weights, VAE (`tiny_train.yaml`'s), T5 and tokenizer for both, on {setup.clips} synthetic clips of "
        f"13 x 64 x 64 at 8 fps; batch {setup.batch}, {setup.steps} optimizer steps per run ({setup.steps_per_epoch} "
        f"an epoch), fp32 on the CPU with {setup.threads} thread(s), AdamW with the schedule of `tiny_train.yaml`; "
        f"sat_video decodes in {SAT_LOADER_WORKERS} loader worker(s) and encodes `data.prefetch` batches ahead. "
        f"Each row ran {setup.rounds} time(s), the rows in turn (reversed every other round). diffusers: "
        f"{result['diffusers']}, unmodified, run by `benchmarks/diffusers_lora/run_timed.py` (its README says how).",
        "",
        table(["trainer", "s/step, first epoch (cold)", "s/step, later epochs (warm)", "vs diffusers (cold / warm)",
               "start-up (s)", "first epoch done (s)", "peak RSS (GiB)", "where a first-epoch step's time goes",
               "where a later step's time goes"], comparison),
        "",
        table(["target", "measured", "met"], targets),
        "",
        f"* Cold: steps of the first epoch, warm: of the later ones, medians over the steps of all runs of a row; the very "
        f"first step of every run (both trainers: lazy initialisation, first allocations) is left out "
        f"({raw['cold_steps']} cold and {raw['warm_steps']} warm steps per sat_video row).",
        "* Start-up: process start (`/proc/self/stat`) to the end of the first optimizer step, median over the runs. "
        "diffusers' includes decoding every clip and encoding it with the VAE before its loop "
        f"({_seconds(result['diffusers_encode_before_loop_s'], 1)} s of VAE encoding); the explicit-cache row's does not "
        f"include `tools/precompute_latents.py` ({result['precompute_s']:.1f} s, once, not in any row). *First epoch "
        "done*: start-up plus the first epoch's other steps, the same work for both trainers wherever they encode.",
        "* Peak RSS: `ru_maxrss` of the training process at its last step (sat_video: `cpu_peak_rss_gb` of metrics.jsonl).",
        "* Where the time goes: each phase's share of the steps' total time (cold or warm steps). sat_video's phases are "
        "the per-step keys of its metrics.jsonl; diffusers' come from `run_timed.py`, which wraps the data "
        "loader, `T5EncoderModel.forward`, `CogVideoXTransformer3DModel.forward`, `Accelerator.backward`, "
        "`Accelerator.clip_grad_norm_` and the optimizer step. *Other*: the rest of the step (noise, schedule, "
        "loss, logging).",
        "* Per step, diffusers encodes the prompts with T5 every step and samples latents from the posteriors it "
        "encoded before training; sat_video's raw-video row decodes and encodes each clip (VAE and T5) the first time "
        "it is drawn, ahead of the step in a thread, and keeps posterior and text embedding in its in-run cache"
        + (f" ({hits:.0%} cache hits in the warm steps)" if hits is not None else "")
        + "; the explicit-cache row reads both from `tools/precompute_latents.py`'s cache. Both train v-prediction "
        "(diffusers' x0 loss weighted by 1 / (1 - abar) is the same loss); sat_video also drops 10% of the captions "
        "(`model.diffusion.text_dropout`).",
        "* Load average (1/5/15 min) " + (f"before: {' / '.join(f'{x:.2f}' for x in load[0])}, after: "
                                          f"{' / '.join(f'{x:.2f}' for x in load[-1])}" if load else "not available") + ".",
    ]
