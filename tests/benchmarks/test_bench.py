"""tools/bench.py runs end to end at its tiny sizes and writes a complete report (nothing is asserted about speed)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_tiny_writes_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--sizes", "tiny", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert f"python tools/bench.py --sizes tiny --threads 1 --out {out}" in report
    for heading in (
        "## Machine",
        "## Targets",
        "## GEMM peak",
        "## DiT forward + backward",
        "## Where the time goes",
        "## Activation checkpointing",
        "## Training step through the engine",
        "## Data loading",
        "## Sequence parallelism",
        "## Mixed sizes: buckets vs one size",
        "## Sampling memory: VAE decode exact vs tiled",
        "## fp8-stored frozen weights (LoRA)",
        "## Block offload while training (LoRA)",
        "## Training memory: the planner against measured peaks",
        "## Moving average of the weights (train.ema)",
        "## Data at scale: shards vs folder sources",
        "## VAE training: step time and peak memory",
        "## How these figures are measured",
    ):
        assert heading in report
    # each can be replaced alone later
    for name in ("trainers", "fp8_storage", "block_streaming", "training_memory", "ema", "shards", "vae"):
        assert f"<!-- bench:{name} -->" in report and f"`python tools/bench.py --only {name} --sizes tiny" in report
    assert "| torch threads | 1 |" in report
    # one comparison row per dtype, with positive times for both implementations
    rows = re.findall(r"^\| tiny \| (fp32|bf16) \| 72 \| [\d.]+M \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    assert sorted(dtype for dtype, _, _ in rows) == ["bf16", "fp32"]
    assert all(float(ours) > 0 and float(theirs) > 0 for _, ours, theirs in rows)
    assert re.search(r"^\| raw video \| 2 \| 3 \| [\d.]+ \| [\d.]+ \|$", report, re.M)
    assert re.search(r"^\| latent cache \| 2 \| 3 \| [\d.]+ \| [\d.]+ \|$", report, re.M)
    assert re.search(r"^\| training step from latent cache >= 3x faster than from raw video \| [\d.]+x \|", report, re.M)
    assert re.search(r"^\| one size \(64 x 64, cropped\) \| 2 \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \|$", report, re.M)
    assert re.search(r"^\| 3 buckets \(64 x 112, 48 x 64, 112 x 64\) \| 2 \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \|$", report, re.M)
    assert re.search(r"^\| buckets: time per video token <= 1.05x one size \(same clips\) \| [\d.]+x \|", report, re.M)
    split = re.findall(r"^\| ([12]) \| 512 \| (\d+) \| [\d.]+ \| \d+ \| ([\d.]+)x \| \d+% \|$", report, re.M)
    assert split == [("1", "512", "1.00"), ("2", "256", split[1][2])], split  # 8 x 8 x 8 tokens, half per rank
    decode = re.findall(r"^\| (exact|tiled) \| [\d.]+ \| (\d+) \| (\d+) \| ([\d.]*) \|$", report, re.M)
    assert [mode for mode, *_ in decode] == ["exact", "tiled"] and float(decode[1][3]) > 15, decode
    assert int(decode[1][1]) < int(decode[0][1])  # tiles hold less than the whole frame
    # block offload: K = 0, 1, 2 of the tiny DiT's 2 blocks, the device weights as offloaded_bytes predicts them
    offload = re.findall(r"^\| tiny \| fp32 \| (\d) of 2 \| [\d.]+ \| [-+\d]+% \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    assert [k for k, *_ in offload] == ["0", "1", "2"] and all(ours == predicted for _, ours, predicted in offload), offload
    assert float(offload[2][1]) < float(offload[0][1])
    # the planner's validation: one LoRA run under ZeRO-2 at the tiny preset
    assert re.search(r"^\| LoRA \| 2 \| 5x48x80 \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \w[\w ]* \| (yes|\*\*no\*\*) \|$",
                     report, re.M)
    # the average's cost: a step without and with it per dtype; one rank holds all of it
    ema = re.findall(r"^\| tiny \| (fp32|bf16) \| [\d.]+ M \| ([\d.]+) \| ([\d.]+) \| [-+\d.]+% \| (yes|\*\*no\*\*) \|$",
                     report, re.M)
    assert sorted(dtype for dtype, *_ in ema) == ["bf16", "fp32"] and all(float(a) > 0 and float(b) > 0 for _, a, b, _ in ema)
    assert re.search(r"ZeRO-2 on 1 process\(es\), fp32, every weight trained: rank 0 holds [\d.]+ MiB of average "
                     r"\(`ema_memory_gb`\), 1.00 of the whole", report)
    # VAE training: the tiny VAE's decoder step per size and checkpointing mode (timed at the first size), and the
    # full-size prediction of each mode, the recipe's marked
    vae = re.findall(r"^\| 9x16x(16|32) \| decoder \| [\d.]+ M \| (off|on) \| ([\d.]+|-) \|", report, re.M)
    assert len(vae) == 4 and all((time != "-") == (size == "16") for size, _, time in vae), vae
    assert re.search(r"^\| decoder \(recipe\) \| on \| [\d.]+ \| [-\d.]+ \| [-\d.]+ \| [-+\d.]+%, [-+\d.]+% \| "
                     r"[\d.]+, [\d.]+ \| [\d.]+ \| [\d.]+ \|$", report, re.M)
    workers = [int(w) for w in re.findall(r"^\| (\d+) \| [\d.]+ \|$", report, re.M)]  # data loading: 0, 1, ... workers
    assert workers[0] == 0 and len(workers) >= 2 and workers == sorted(set(workers))
