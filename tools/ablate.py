#!/usr/bin/env python3
"""Train every variant of an ablation grid on the same data, seeds and step budget, sample each trained model,
then compare them.

    python tools/ablate.py --base configs/cogvideox_2b.yaml configs/tiny.yaml configs/quickstart.yaml \\
        --grid configs/ablations/latte_shapes.yaml --out runs/latte-shapes --synthetic --seeds 3 train.micro_batch_size=8

    python tools/ablate.py --base configs/cogvideox_2b.yaml configs/tiny.yaml configs/tiny_train.yaml \\
        --grid configs/ablations/latte.yaml --out runs/latte --images my_images --heldout my_heldout_clips \\
        data.sources=[my_clips] model.text_encoder.path=<T5 folder> train.train_iters=200

Each variant trains once per seed (``--seeds N``: ``train.seed``, ``train.seed + 1``, ...) with ``tools/train_video.py``
in its own process (``--nproc N``: under torchrun), one after the other, in ``<out>/<variant>/seed-<s>/run`` with its
merged config in ``config.yaml`` and its output in ``train.log`` next to it.

Then the quality stage (``sat_video/experiments/sample_quality.py``) samples each trained model on a fixed prompt set
with fixed seeds: the captions of the training data (seen) and of the ``--heldout`` clips (never trained on), and
scores the samples against real clips of the same captions: attribute accuracy on the synthetic shapes, a Fréchet
distance of colour and motion statistics (FSD) on any data. The first model that trains is also scored at its initial
weights, as a baseline. ``--synthetic`` writes the shapes study into ``<out>/data`` (36 caption combinations to train
on, 12 held out, a tiny T5 and a PCA first stage; ``sat_video/fixtures/shapes_study.py``) and points the runs at it.

``<out>/results.md`` and ``results.json`` (parameters, FLOPs, loss, step time, memory and quality per variant, mean ±
spread over seeds, the significant differences), ``loss.png`` and ``quality.png`` are rewritten after every run.
Existing variant folders are never replaced unless ``--overwrite`` is given; ``--only <variant>`` runs some variants
and keeps the rows of earlier runs of the others; ``--report-only`` runs nothing and rewrites the reports (after
an upgrade of the report, say). The grid format is described in
``sat_video/experiments/ablation.py``; the study design in ``docs/ablations.md``.

Exit status: 0 at least one run trained, 1 every run failed, 2 bad grid, config, data or arguments.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from sat_video.common.errors import OutputExistsError, UsageError
from sat_video.common.files import atomic_write
from sat_video.config.cli import add_config_arguments, run_tool, split_config_arguments
from sat_video.config.loader import load_config
from sat_video.data.clips import ClipSpec
from sat_video.experiments.ablation import (
    DATA_FOLDER,
    UNTRAINED,
    finished_seeds,
    load_grid,
    measure,
    read_baseline,
    read_run,
    record_baseline,
    record_run,
    seed_folder,
    variant_config,
)

TRAIN_VIDEO = Path(__file__).resolve().with_name("train_video.py")


def train_command(config: Path, nproc: int) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(TRAIN_VIDEO), "--base", str(config)]


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--grid", required=True, help="the grid file (e.g. configs/ablations/latte_shapes.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs and the reports")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant: train.seed, train.seed + 1, ...")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when more than one)")
    parser.add_argument("--images", action="append", default=[], metavar="SOURCE",
                        help="a data source of captioned images for variants with 'images: true' (repeatable)")
    parser.add_argument("--heldout", action="append", default=[], metavar="SOURCE",
                        help="captioned clips kept out of training; the quality stage samples their captions (repeatable)")
    parser.add_argument("--synthetic", action="store_true",
                        help=f"write the synthetic shapes study into <out>/{DATA_FOLDER} and train and score on it")
    parser.add_argument("--quality-prompts", type=int, default=48, metavar="N",
                        help="most prompts the quality stage samples per split (seen, held-out)")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality stage (train and compare losses only)")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only this variant (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the folders of variants that were run before")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the reports from the runs already in --out")
    args = parser.parse_args(argv)
    for flag, value in (("--nproc", args.nproc), ("--seeds", args.seeds), ("--quality-prompts", args.quality_prompts)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, found {value}")
    if args.no_quality and args.heldout:
        parser.error("--heldout clips are only used by the quality stage, which --no-quality skips")
    started = time.perf_counter()

    # 1. every run's config, size and FLOPs before anything runs, so that a bad grid fails at once
    paths, overrides = split_config_arguments(args)
    base = load_config(paths, overrides)
    grid = load_grid(args.grid)
    selected = [] if args.report_only else [v.name for v in grid.select(args.only)]
    existing = [name for name in selected if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{args.out} already holds runs of {', '.join(existing)}; pass --overwrite to replace them, "
                                "or --only to run other variants")
    heldout = list(args.heldout)
    if args.synthetic:
        from sat_video.fixtures.shapes_study import make_shapes_study

        if args.report_only and not (args.out / DATA_FOLDER).exists():
            raise OutputExistsError(f"--report-only --synthetic: {args.out / DATA_FOLDER} holds no shapes study to report on")
        study = make_shapes_study(args.out / DATA_FOLDER, base)
        base = load_config(paths, [*overrides, *study.overrides])
        heldout.insert(0, str(study.heldout))
    seeds = [base.train.seed + k for k in range(args.seeds)]
    variants = {v.name: v for v in grid.variants}
    configs = {(name, seed): variant_config(base, grid, variants[name], save=seed_folder(args.out, name, seed) / "run",
                                            seed=seed, images=args.images) for name in selected for seed in seeds}
    reports = {}
    for variant in grid.variants:
        if variant.name in selected:
            reports[variant.name] = measure(grid, variant, configs[variant.name, seeds[0]])
        elif earlier := finished_seeds(args.out, variant.name):  # earlier runs of variants not selected now stay in the table
            folders = [seed_folder(args.out, variant.name, seed) for seed in earlier]
            reports[variant.name] = measure(grid, variant, load_config(folders[0] / "config.yaml"))
            reports[variant.name].runs = {seed: read_run(folder) for seed, folder in zip(earlier, folders)}
    train = base.train
    setup = [f"base: {' '.join(paths)}" + (f"; overrides: {' '.join(overrides)}" if overrides else ""),
             f"every variant: {train.train_iters} steps, seeds {', '.join(map(str, seeds))}, "
             f"micro-batch {train.micro_batch_size} x "
             f"{train.gradient_accumulation_steps} accumulation step(s) x {args.nproc} process(es)",
             f"data: {', '.join(base.data.sources)}" + (f"; images (variants with images: true): {', '.join(args.images)}"
                                                         if args.images else "")
             + (f"; held out of training: {', '.join(heldout)}" if heldout else "")]

    untrained, prompts, references = None, [], {}
    if not args.no_quality:
        from sat_video.experiments.sample_quality import measure_quality, quality_prompts, reference_frames

        prompts = quality_prompts(base.data.sources, heldout, args.quality_prompts)
        sample = base.sample
        counts = {split: sum(p.split == split for p in prompts) for split in ("seen", "heldout")}
        setup.append(f"quality stage: {counts['seen']} seen and {counts['heldout']} "
                     f"held-out prompts, one sample each ({sample.scheduler}, {sample.steps} steps, guidance "
                     f"{sample.guidance_scale}, noise seeds {sample.seed}..{sample.seed + len(prompts) - 1})")

        def scores(cfg, checkpoint, folder):
            spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
            if spec not in references:
                references[spec] = reference_frames(prompts, cfg)
            return measure_quality(cfg, checkpoint, prompts, references[spec], folder)

        untrained = read_baseline(args.out) if args.report_only else None

    def write_reports(elapsed: str | None):
        from sat_video.experiments.ablation_report import plot_losses, plot_quality, write_json, write_results

        done = setup if elapsed is None else [
            *setup, f"time: {elapsed} for this invocation of tools/ablate.py ({len(jobs)} run(s), training and quality stage)"]
        ordered = list(reports.values())
        write_results(args.out / "results.md", grid=grid, reports=ordered, setup=done, untrained=untrained)
        write_json(args.out / "results.json", grid=grid, reports=ordered, setup=done, untrained=untrained)
        plot_losses(args.out / "loss.png", ordered)
        plot_quality(args.out / "quality.png", ordered, untrained)

    jobs = [(name, seed) for name in selected for seed in seeds]
    if args.report_only:
        if not reports:
            raise UsageError(f"--report-only: {args.out} holds no finished run of any variant of {args.grid}")
        write_reports(None)
        print(f"ablate: rewrote the reports in {args.out} from {sum(len(r.runs) for r in reports.values())} run(s)")
        return 0

    # 2. the runs, one after the other, each in its own process, then sampled and scored; reports rewritten after each
    for name in selected:
        if (args.out / name).exists():
            shutil.rmtree(args.out / name)
    for index, (name, seed) in enumerate(jobs, start=1):
        folder, cfg = seed_folder(args.out, name, seed), configs[name, seed]
        config, log = folder / "config.yaml", folder / "train.log"
        atomic_write(config, lambda tmp, cfg=cfg: OmegaConf.save(cfg, tmp))
        label = f"[{index}/{len(jobs)}] {name} seed {seed}"
        print(f"{label}: training (log: {log})", flush=True)
        with open(log, "w") as handle:
            returncode = subprocess.run(train_command(config, args.nproc), stdout=handle, stderr=subprocess.STDOUT).returncode
        run = reports[name].runs[seed] = record_run(folder, returncode, log)
        if returncode == 0 and not args.no_quality:
            run.quality = scores(cfg, folder / "run", folder)
            if untrained is None:  # the first model that trained, at its initial weights: a config that works
                print(f"quality stage: sampling {len(prompts)} prompts with the untrained {name} (seed {seed})", flush=True)
                untrained = record_baseline(args.out, name, scores(cfg, None, args.out / UNTRAINED))
        print(f"{label}: " + ("ok" if returncode == 0 else f"failed: {run.error}"), flush=True)
        write_reports(f"{(time.perf_counter() - started) / 60:.1f} min")

    print(f"ablate: results in {args.out / 'results.md'} (and results.json, loss.png"
          + ("" if args.no_quality else ", quality.png") + ")")
    return 0 if any(reports[name].runs[seed].returncode == 0 for name, seed in jobs) else 1


def main(argv=None) -> int:
    return run_tool("ablate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
