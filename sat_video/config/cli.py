"""Command-line conventions shared by the tools: ``--base a.yaml b.yaml ... [key=value ...]`` and exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from sat_video.common.errors import RunStopped, SatVideoError
from sat_video.config.loader import load_config


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--base", nargs="+" if required else "*", required=required, default=[], metavar="YAML",
                        help="config files, merged left to right")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")


def split_config_arguments(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Config paths and overrides; ``key=value`` items written right after ``--base`` count as overrides."""
    return [p for p in args.base if "=" not in p], [*(p for p in args.base if "=" in p), *args.overrides]


def config_from_arguments(args: argparse.Namespace) -> DictConfig:
    paths, overrides = split_config_arguments(args)
    return load_config(paths, overrides)


def run_tool(name: str, run: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a tool's body with the project's exit conventions.

    Returns the body's status (``None`` counts as 0); a :class:`~sat_video.common.errors.RunStopped` prints
    ``<name>: stopped: <message>`` and gives 1; any other :class:`~sat_video.common.errors.SatVideoError` (a config
    key, a data file, a checkpoint, an output that exists: something the user can fix) prints
    ``<name>: error: <message>`` and gives 2. Every other exception is a bug and keeps its traceback.
    """
    try:
        status = run(argv)
    except RunStopped as err:
        print(f"{name}: stopped: {err}", file=sys.stderr)
        return 1
    except SatVideoError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 0 if status is None else status
