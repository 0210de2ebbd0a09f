#!/usr/bin/env python3
"""Check and measure everything CUDA-specific in one command, within one short GPU loan (8 minutes on an H100/H200):

    python tools/gpu_check.py --out benchmarks/GPU.md --overwrite     # on a GPU machine
    python tools/gpu_check.py --quick --out /tmp/gpu.md              # tiny sizes on a CPU (what CI runs)
    python tools/gpu_check.py --sections 1,2,3 ...                   # only some sections

Sections, in order: 1 environment (versions, the SDPA backend our attention shapes get, fp8 matmul), 2 parity in bf16
at full width against diffusers, 3 step speed (5B forward + backward at 49x480x720, eager and compiled), 4 sampling
memory against ``--estimate-memory``, 5 training memory against the planner (LoRA, SFT, fp8 storage, block offload),
6 a real training run (NCCL, bf16, ZeRO-2, kill and resume), 7 sequence parallelism (two or more GPUs). Each has its
own time limit; the report is written as rows finish, so a timeout keeps everything done so far.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from sat_video.common.errors import OutputExistsError, UsageError
from sat_video.config.cli import run_tool
from sat_video.gpu_check.check import Check
from sat_video.gpu_check.report import Report
from sat_video.gpu_check.runner import SECTIONS, run_sections

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    return run_tool("gpu_check", run, argv)


def _sections(text: str) -> set[int]:
    known = {section.number for section in SECTIONS}
    try:
        numbers = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise UsageError(f"--sections: expected comma-separated numbers from {sorted(known)}, found {text!r}") from None
    if not numbers or numbers - known:
        raise UsageError(f"--sections: expected numbers from {sorted(known)}, found {text!r}")
    return numbers


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report (written as sections finish)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; a CPU is enough)")
    parser.add_argument("--sections", default=",".join(str(s.number) for s in SECTIONS), help="e.g. 1,2,3 (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sections = _sections(args.sections)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device (run with --quick on a CPU)")
    if not args.device.startswith("cuda") and not args.quick:
        raise UsageError("no GPU here: the full sizes need one; --quick runs the check at tiny sizes on the CPU")
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    command = shlex.join(["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = Report(args.out)
    report.text("# GPU check", "", f"Written by `tools/gpu_check.py` on {now}, host `{platform.node()}` "
                f"({platform.machine()}, {os.cpu_count()} CPU cores), {'quick sizes' if args.quick else 'full sizes'}, "
                f"device `{args.device}`. Regenerate with:", "", f"    {command}")
    with tempfile.TemporaryDirectory(prefix="sat_video_gpu_check_") as workdir:
        check = Check(device=args.device, quick=args.quick, report_path=args.out.resolve(), workdir=Path(workdir),
                      configs=ROOT / "configs", train_script=ROOT / "tools" / "train_video.py")
        outcomes = run_sections(check, sections)
    report.text("", "## Summary")
    report.table(["section", "outcome", "seconds"])
    for outcome in outcomes:
        report.row(f"{outcome.section.number}. {outcome.section.title}", outcome.status, f"{outcome.seconds:.0f}")
    print(f"wrote {args.out}")
    return 0 if all(o.status == "done" or o.status.startswith("skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
