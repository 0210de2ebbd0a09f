"""A section that writes a row, then outlives its time limit (tests/gpu_check/test_gpu_check.py)."""

import time


def run(check) -> None:
    check.report.table(["row"])
    check.report.row("written before the limit")
    time.sleep(60)
    check.report.row("never written")
