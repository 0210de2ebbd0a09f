"""The reports of ``tools/ablate.py``: ``results.md``, ``results.json``, ``loss.png`` and ``quality.png``.

Every variant's metrics are summarised over its training seeds (mean ± standard deviation), and every pair of
variants is tested for a significant difference (:mod:`~sat_video.experiments.seed_statistics`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sat_video.common.files import atomic_write
from sat_video.experiments.ablation import Baseline, Grid, RunSummary, VariantReport
from sat_video.experiments.seed_statistics import Estimate, accuracy_estimate, significant


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    read: Callable[[RunSummary], float | None]
    prompts: Callable[[RunSummary], int] | None = None
    """For accuracies: the prompts one run's value counts (its binomial error)."""


def _accuracy(split: str, attribute: str) -> Callable[[RunSummary], float | None]:
    def read(run: RunSummary) -> float | None:
        quality = run.quality
        return quality.accuracy[split][attribute] if quality and quality.accuracy and split in quality.accuracy else None
    return read


def _prompts(split: str) -> Callable[[RunSummary], int]:
    return lambda run: run.quality.samples[split]


QUALITY_METRICS = (
    Metric("heldout_all", "held-out: all three", True, _accuracy("heldout", "all"), _prompts("heldout")),
    Metric("heldout_shape", "held-out: shape", True, _accuracy("heldout", "shape"), _prompts("heldout")),
    Metric("heldout_colour", "held-out: colour", True, _accuracy("heldout", "colour"), _prompts("heldout")),
    Metric("heldout_direction", "held-out: direction", True, _accuracy("heldout", "direction"), _prompts("heldout")),
    Metric("seen_all", "seen: all three", True, _accuracy("seen", "all"), _prompts("seen")),
    Metric("fsd", "FSD", False, lambda run: run.quality.fsd if run.quality else None),
)
FINAL_LOSS = Metric("final_loss", "final loss", False, lambda run: run.final_loss if run.returncode == 0 else None)
EVAL_METRICS = (
    Metric("eval_loss", "held-out loss", False, lambda run: run.eval_loss if run.returncode == 0 else None),
    Metric("eval_ema_loss", "held-out loss (EMA)", False, lambda run: run.eval_ema_loss if run.returncode == 0 else None),
)
"""``train.eval``'s last held-out loss, with the live weights and their moving average."""
COMPARED = ("heldout_all", "seen_all", "fsd", "final_loss", "eval_loss", "eval_ema_loss")
"""Metrics every pair of variants is tested on."""


def estimate(report: VariantReport, metric: Metric) -> Estimate:
    """``metric`` over the seeds of ``report`` whose run produced it."""
    runs = [run for _, run in sorted(report.runs.items()) if metric.read(run) is not None]
    values = [metric.read(run) for run in runs]
    if metric.prompts and runs:
        return accuracy_estimate(values, metric.prompts(runs[0]))
    return Estimate(tuple(values))


def _metrics(reports: Sequence[VariantReport]) -> list[Metric]:
    """The quality metrics some run measured, the final loss, then the held-out losses some run measured."""
    measured = lambda metrics: [m for m in metrics if any(m.read(run) is not None for r in reports  # noqa: E731
                                                           for run in r.runs.values())]
    return [*measured(QUALITY_METRICS), FINAL_LOSS, *measured(EVAL_METRICS)]


def _quality(reports: Sequence[VariantReport]) -> list[Metric]:
    return [m for m in _metrics(reports) if m in QUALITY_METRICS]


@dataclass(frozen=True)
class Difference:
    metric: Metric
    better: str
    worse: str
    better_estimate: Estimate
    worse_estimate: Estimate

    def describe(self) -> str:
        gap = abs(self.better_estimate.mean - self.worse_estimate.mean)
        return (f"{self.metric.label}: **{self.better}** {self.better_estimate.format()} beats **{self.worse}** "
                f"{self.worse_estimate.format()} (difference {gap:.3g})")


def significant_differences(reports: Sequence[VariantReport]) -> list[Difference]:
    """Every pair of variants that differs significantly on one of the compared metrics."""
    found = []
    for metric in (m for m in _metrics(reports) if m.key in COMPARED):
        for a, b in itertools.combinations(reports, 2):
            ea, eb = estimate(a, metric), estimate(b, metric)
            if significant(ea, eb):
                a_better = (ea.mean > eb.mean) == metric.higher_is_better
                better, worse = (a, b) if a_better else (b, a)
                found.append(Difference(metric, better.variant.name, worse.variant.name, *((ea, eb) if a_better else (eb, ea))))
    return found


# ---------------------------------------------------------------------- results.md


def _si(value: int) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _status(report: VariantReport) -> str:
    if not report.runs or all(run.returncode is None for run in report.runs.values()):
        return "not run yet"
    failed = [f"seed {seed} failed (exit {run.returncode}): {run.error} (log: `{run.log}`)"
              for seed, run in sorted(report.runs.items()) if run.returncode not in (0, None)]
    return "; ".join(failed) or "ok"


def _optional(values: Sequence[float | None], reduce: Callable, digits: int = 3) -> str:
    present = [v for v in values if v is not None]
    return f"{reduce(present):.{digits}g}" if present else "-"


def _seeds(reports: Sequence[VariantReport]) -> int:
    return max((len(r.runs) for r in reports), default=0)


def write_results(path: Path, *, grid: Grid, reports: Sequence[VariantReport], setup: Sequence[str],
                  untrained: Baseline | None = None) -> None:
    """``results.md``: training and quality tables (mean ± spread over seeds), the significant differences, the variants."""
    seeds = _seeds(reports)
    spread_note = f"mean ± standard deviation over {seeds} training seeds" if seeds > 1 else "one training seed"
    held_out = [m for m in _metrics(reports) if m in EVAL_METRICS]
    lines = [f"# Ablation: `{grid.path}`", "", *(f"- {item}" for item in setup), "", "## Training", "",
             _row(["variant", "parameters", "FLOPs / step", "final loss", "best loss", *(m.label for m in held_out),
                   "step time (s)", "peak memory (GB)", "status"]),
             "|---" * (8 + len(held_out)) + "|"]
    for report in reports:
        total, trainable = report.parameters
        runs = list(report.runs.values())
        lines.append(_row([
            report.variant.name,
            _si(total) + (f" ({_si(trainable)} trainable)" if trainable != total else ""),
            _si(report.flops),
            estimate(report, FINAL_LOSS).format(4),
            _optional([run.best_loss for run in runs], min, 4),
            *(estimate(report, m).format(4) for m in held_out),
            _optional([run.step_time_s for run in runs], np.median),
            _optional([run.peak_memory_gb for run in runs], max),
            _status(report),
        ]))
    lines += [
        "",
        f"- final loss: the last logged training loss ({spread_note}); best loss: the lowest over all seeds."
        + (" Held-out loss: the last `train.eval` loss (fixed clips, timesteps and noise, the same function in every "
           "variant)." if held_out else ""),
        "- parameters: of the DiT. FLOPs / step: one optimizer step of one process: forward and backward of the DiT on a "
        "video micro-batch at the config's shape, times the gradient-accumulation steps. Counted by "
        "`torch.utils.flop_counter` (matrix products, convolutions and attention; backward only for trainable weights); "
        "element-wise operations and the frozen VAE and T5 are not counted. Image batches of joint variants cost less.",
        "- step time: median of the logged `step_time_s` over all seeds. Peak memory: CUDA: the allocator's peak "
        "(`memory_allocated_gb`); CPU: peak resident memory of the rank-0 process (`cpu_peak_rss_gb`, frozen stages and "
        "data loading included); the highest over the seeds.",
    ]
    quality = _quality(reports)
    if quality:
        lines += ["", "## Sample quality", "", _row(["variant", *(m.label for m in quality)]), "|---" * (len(quality) + 1) + "|"]
        for report in reports:
            lines.append(_row([report.variant.name, *(estimate(report, m).format() for m in quality)]))
        if untrained is not None:
            probe = RunSummary(quality=untrained.scores)
            lines.append(_row([f"*untrained* ({untrained.variant} at its initial weights)",
                               *(f"{m.read(probe):.3g}" if m.read(probe) is not None else "-" for m in quality)]))
        lines += ["", f"- {spread_note}; accuracies are shares of the samples (see `docs/ablations.md`).",
                  "- held-out: captions never seen in training; seen: captions of the training clips. *all three*: shape, "
                  "colour and direction all match the caption (`describe_clip`).",
                  "- FSD: Fréchet statistics distance between samples and real clips of the same captions; lower is better."]
    differences = significant_differences(reports)
    compared_metrics = [m for m in _metrics(reports) if m.key in COMPARED]
    compared = ", ".join(m.label for m in compared_metrics)
    tests = len(compared_metrics) * len(reports) * (len(reports) - 1) // 2
    lines += ["", "## Significant differences", ""]
    if seeds < 2:
        lines.append("Not tested: one training seed gives no spread; run with `--seeds 2` or more.")
    else:
        lines += [f"Tested for every pair of variants on {compared}: significant when the difference of the means exceeds "
                  "its standard error times Student's t (95 %, two-sided); each mean's error comes from its spread over "
                  "seeds, never below the binomial error of an accuracy (`sat_video/experiments/seed_statistics.py`). "
                  f"{len(differences)} of {tests} tests came out significant; about {0.05 * tests:.1f} would by chance "
                  "if no variant differed.", ""]
        lines += [f"- {d.describe()}" for d in differences] or ["- no significant difference between any two variants"]
    lines += ["", "## Variants", ""]
    for report in reports:
        variant = report.variant
        settings = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in variant.settings) or "the defaults"
        extra = "; plus the `--images` sources" if variant.images else ""
        description = variant.description + ". " if variant.description else ""
        lines.append(f"- **{variant.name}**: {description}Settings: {settings}{extra}.")
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def write_json(path: Path, *, grid: Grid, reports: Sequence[VariantReport], setup: Sequence[str],
               untrained: Baseline | None = None) -> None:
    """``results.json``: every run's numbers, each variant's summary over seeds, and the significant differences."""
    metrics = _metrics(reports)
    variants = {}
    for report in reports:
        runs = {}
        for seed, run in sorted(report.runs.items()):
            runs[str(seed)] = {"returncode": run.returncode, "error": run.error, "log": run.log, "final_loss": run.final_loss,
                               "best_loss": run.best_loss, "step_time_s": run.step_time_s, "peak_memory_gb": run.peak_memory_gb,
                               "eval_loss": run.eval_loss, "eval_ema_loss": run.eval_ema_loss,
                               "quality": asdict(run.quality) if run.quality else None}
        summary = {}
        for metric in metrics:
            value = estimate(report, metric)
            summary[metric.key] = {"mean": value.mean if value.n else None, "spread": value.spread if value.n else None,
                                   "standard_error": value.standard_error if value.n else None, "seeds": value.n}
        variant = report.variant
        variants[variant.name] = {"description": variant.description, "settings": dict(variant.settings),
                                  "parameters": report.parameters[0], "trainable_parameters": report.parameters[1],
                                  "flops_per_step": report.flops, "runs": runs, "summary": summary}
    document = {"grid": str(grid.path), "setup": list(setup), "variants": variants,
                "untrained": {"variant": untrained.variant, **asdict(untrained.scores)} if untrained else None,
                "significant": [{"metric": d.metric.key, "better": d.better, "worse": d.worse}
                                for d in significant_differences(reports)]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n"))


# ---------------------------------------------------------------------- plots


def plot_losses(path: Path, reports: Sequence[VariantReport]) -> None:
    """``loss.png``: per variant, the mean loss curve over its seeds and the band from the lowest to the highest
    seed (a variant with failed seeds dashed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    axes = figure.subplots()
    for report in reports:
        curves = [run for run in report.runs.values() if run.steps]
        if not curves:
            continue
        length = min(len(run.steps) for run in curves)
        losses = np.array([run.losses[:length] for run in curves])
        steps = curves[0].steps[:length]
        failed = any(run.returncode not in (0, None) for run in report.runs.values())
        (line,) = axes.plot(steps, losses.mean(0), label=report.variant.name, linestyle="--" if failed else "-")
        if len(curves) > 1:
            axes.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss" + (" (mean; band: lowest to highest seed)" if _seeds(reports) > 1 else ""))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"), suffix=".png")


def plot_quality(path: Path, reports: Sequence[VariantReport], untrained: Baseline | None = None) -> bool:
    """``quality.png``: bars of each quality metric per variant (mean over seeds, error bar: ± the spread; dots:
    the seeds; distances on a log scale), the untrained baseline as a grey line. Returns False (and writes nothing)
    when nothing was measured."""
    metrics = [m for m in _quality(reports) if m.key in (*COMPARED, "heldout_shape")]
    if not metrics:
        return False
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(metrics), 4.2), dpi=120)
    names = [r.variant.name for r in reports]
    for axes, metric in zip(np.atleast_1d(figure.subplots(1, len(metrics))), metrics):
        estimates = [estimate(r, metric) for r in reports]
        positions = np.arange(len(reports))
        axes.bar(positions, [e.mean if e.n else 0 for e in estimates], yerr=[e.spread for e in estimates], capsize=3,
                 color="tab:blue" if metric.higher_is_better else "tab:orange", alpha=0.75)
        for position, value in zip(positions, estimates):
            axes.plot([position] * value.n, value.values, "k.", markersize=4)
        baseline = None if untrained is None else metric.read(RunSummary(quality=untrained.scores))
        if baseline is not None:
            axes.axhline(baseline, color="grey", linestyle=":", label="untrained")
            axes.legend(fontsize="x-small")
        axes.set_title(metric.label + (" (higher is better)" if metric.higher_is_better else " (lower is better)"),
                       fontsize="small")
        axes.set_xticks(positions, names, rotation=45, ha="right", fontsize="small")
        if metric.prompts:
            axes.set_ylim(0, 1.05)
        else:  # an untrained model's distance is often orders of magnitude above the trained ones'
            axes.set_yscale("log")
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"), suffix=".png")
    return True
