#!/usr/bin/env python3
"""Train every variant of an ablation grid on the same data, seeds and step budget, then compare them.

    python tools/ablate.py --base configs/cogvideox_2b.yaml configs/tiny.yaml configs/tiny_train.yaml \
        --grid configs/ablations/latte.yaml --out runs/latte --images my_images \
        data.sources=[my_clips] model.text_encoder.path=<T5 folder> train.train_iters=200

Each variant runs ``tools/train_video.py`` in its own process (``--nproc N``: under torchrun), one after the
other, in ``<out>/<variant>/run`` with its merged config in ``<out>/<variant>/config.yaml`` and its output in
``<out>/<variant>/train.log``. ``<out>/results.md`` (parameters, FLOPs per step, final and best loss, step time,
peak memory; a failed variant's row shows its error) and ``<out>/loss.png`` are rewritten after every variant.
Existing variant folders are never replaced unless ``--overwrite`` is given; ``--only <variant>`` runs some
variants and keeps the rows of earlier runs of the others. The grid format is described in ``sat_video/experiments/ablation.py``
and ``docs/mixins.md``.

Exit status: 0 at least one variant trained, 1 every variant failed, 2 bad grid, config or arguments.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from sat_video.common.errors import OutputExistsError
from sat_video.common.files import atomic_write
from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool, split_config_arguments
from sat_video.config.loader import load_config
from sat_video.experiments.ablation import load_grid, measure, plot_losses, read_run, record_run, variant_config, write_results

TRAIN_VIDEO = Path(__file__).resolve().with_name("train_video.py")


def train_command(config: Path, nproc: int) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(TRAIN_VIDEO), "--base", str(config)]


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--grid", required=True, help="the grid file (e.g. configs/ablations/latte.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs, results.md and loss.png")
    parser.add_argument("--nproc", type=int, default=1, help="processes per variant (torchrun when more than one)")
    parser.add_argument("--images", action="append", default=[], metavar="SOURCE",
                        help="a data source of captioned images for variants with 'images: true' (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only this variant (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the folders of variants that were run before")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, found {args.nproc}")

    # 1. every variant's config, size and FLOPs before anything runs, so that a bad grid fails at once
    base = config_from_arguments(args)
    grid = load_grid(args.grid)
    selected = [v.name for v in grid.select(args.only)]
    configs = {v.name: variant_config(base, grid, v, save=args.out / v.name / "run", images=args.images)
               for v in grid.variants if v.name in selected}
    for name in (v.name for v in grid.variants):  # earlier runs of variants not selected now stay in the table
        if name not in configs and (args.out / name / "result.json").is_file():
            configs[name] = load_config(args.out / name / "config.yaml")
    reports = {v.name: measure(grid, v, configs[v.name]) for v in grid.variants if v.name in configs}
    existing = [name for name in selected if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{args.out} already holds runs of {', '.join(existing)}; pass --overwrite to replace them, "
                                "or --only to run other variants")
    for name, report in reports.items():
        if name not in selected:
            report.run = read_run(args.out / name)
    paths, overrides = split_config_arguments(args)
    train = base.train
    setup = [f"base: {' '.join(paths)}" + (f"; overrides: {' '.join(overrides)}" if overrides else ""),
             f"every variant: {train.train_iters} steps, seed {train.seed}, micro-batch {train.micro_batch_size} x "
             f"{train.gradient_accumulation_steps} accumulation step(s) x {args.nproc} process(es)",
             f"data: {', '.join(base.data.sources)}" + (f"; images (variants with images: true): {', '.join(args.images)}"
                                                         if args.images else "")]

    # 2. the runs, one after the other, each in its own process; the results are rewritten after each
    for index, name in enumerate(selected, start=1):
        folder = args.out / name
        if folder.exists():
            shutil.rmtree(folder)
        config, log = folder / "config.yaml", folder / "train.log"
        atomic_write(config, lambda tmp, cfg=configs[name]: OmegaConf.save(cfg, tmp))
        print(f"[{index}/{len(selected)}] {name}: training (log: {log})", flush=True)
        with open(log, "w") as handle:
            returncode = subprocess.run(train_command(config, args.nproc), stdout=handle, stderr=subprocess.STDOUT).returncode
        run = reports[name].run = record_run(folder, returncode, log)
        print(f"[{index}/{len(selected)}] {name}: " + ("ok" if returncode == 0 else f"failed: {run.error}"), flush=True)
        write_results(args.out / "results.md", grid=grid, reports=list(reports.values()), setup=setup)
        plot_losses(args.out / "loss.png", list(reports.values()))

    print(f"ablate: results in {args.out / 'results.md'} and {args.out / 'loss.png'}")
    return 0 if any(reports[name].run.returncode == 0 for name in selected) else 1


def main(argv=None) -> int:
    return run_tool("ablate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
