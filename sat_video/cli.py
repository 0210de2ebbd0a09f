"""Command-line conventions shared by the tools: ``--base a.yaml b.yaml ... [key=value ...]``."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig

from .config import load_config


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
