"""Section *How these figures are measured*: the method behind the other sections' figures."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

HEADING = "## How these figures are measured"
METHOD = """\
* **Timing**: wall clock, the implementations alternating in one process (order ABBA, so drifting load hits
  both alike), {warmup} warm-up round(s), then the median of {reps}. A DiT step is `zero_grad(set_to_none=True)`,
  forward, loss = mean of the squared output in fp32, backward; no optimizer. bf16 means `torch.autocast`
  around the forward with fp32 weights, as in mixed-precision training.
* **Identical models**: diffusers' `CogVideoXTransformer3DModel` is loaded with the weights of the sat_video DiT
  through `sat_video.formats.diffusers_format` (random weights everywhere, the zero-initialised gates included), at the
  model's own latent size; diffusers gets its RoPE tables precomputed, as its pipelines pass them.
* **Peak memory**: bytes allocated during one step above what existed before it (parameters and inputs, the
  same for both, are excluded; gradients are included). On CPU this is `sat_video.common.live_tensors.LiveTensorBytes`, a
  `TorchDispatchMode` that adds up the storages every operator returns (forward and backward) and subtracts them
  when freed; kernels' internal scratch memory is invisible to it for both implementations. On CUDA it is
  `torch.cuda.max_memory_allocated`. Activation memory = that peak minus the gradients' bytes.
* **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over one step (matmuls, convolutions and attention,
  forward and backward, with formulas added for the CPU flash-attention kernels), divided by the median step
  time, as a fraction of the GEMM peak measured above in the same dtype.
* **Training step**: `tools/train_video.py` with `configs/cogvideox_5b.yaml configs/tiny.yaml
  configs/tiny_train.yaml` (tiny DiT, tiny random VAE, tiny T5, DeepSpeed ZeRO-2, fp32) on synthetic mp4
  clips; the median `step_time_s` of its metrics.jsonl after the first quarter of the steps (data loading,
  VAE and T5 encoding, DiT forward and backward, optimizer update); samples/s = micro-batch / step time. The
  "latent cache" row is the same run with `data.latent_cache` from `tools/precompute_latents.py` on the same
  clips (posterior sampling, caption dropout and the DiT step as before; no decoding, VAE or T5); the
  encoding itself is not timed.
* **Sequence parallelism**: activations per rank = bytes allocated during one step above the weights and gradients,
  measured as *Peak memory* above on each rank (rank 0 reported); collectives = the self time of the all-to-all,
  all-gather and all-reduce operators in one profiled step (CPU time under gloo, GPU kernel time under NCCL) over
  the step's total.
* **Data loading**: synthetic mp4 clips decoded by `VideoDataset` (decord, resize to cover, center crop, scale to
  [-1, 1]) through a `DataLoader` with `ClipBatchSampler`, batch 1, after the workers delivered their first clips.
"""


def run(bench: Bench) -> dict[str, int]:
    """Nothing to measure: the warm-up and timed rounds the text names."""
    return {"warmup": bench.preset.warmup, "reps": bench.preset.reps}


def render(rounds: dict[str, int]) -> list[str]:
    return [HEADING, "", METHOD.format(**rounds)]
