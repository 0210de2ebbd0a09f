"""The VAE-training section's full-size prediction: fixed bytes plus a line in voxels fitted to the measured activations
(sat_video/benchmarks/vae_training.py)."""

import pytest

from sat_video.benchmarks import vae_training
from sat_video.benchmarks.vae_training import MIB, decode_chunks, fit_line, predicted_peak, voxels


def test_the_line_is_exact_on_linear_data_and_least_squares_otherwise():
    sizes = [(17, 32, 32), (25, 32, 32), (17, 32, 64)]
    intercept, slope = fit_line([(voxels(size), 5e8 + 1500.0 * voxels(size)) for size in sizes])
    assert (intercept, slope) == (pytest.approx(5e8, rel=1e-9), pytest.approx(1500.0, rel=1e-12))
    assert fit_line([(1, 1.0), (2, 4.0), (3, 5.0)]) == pytest.approx((-2 / 3, 2.0))
    with pytest.raises(ValueError, match="two voxel counts"):
        fit_line([(9216, 1.0), (9216, 2.0)])
    assert voxels((17, 256, 256), batch=2) == 2 * 17 * 256 * 256


def test_the_prediction_is_fixed_plus_the_line_or_the_updates_peak_where_that_is_more():
    fit = {"fixed": 100.0, "intercept": 10.0, "per_voxel": 1.0, "update": 150.0}
    assert predicted_peak(fit, 20) == 150.0
    assert predicted_peak(fit, 80) == 190.0


def test_decode_chunks_follow_diffusers_two_latent_frames_at_a_time():
    # 9 frames: 3 latent frames, one piece; 17: 5 -> 3 + 2; 49: 13 -> 3 + 2 x 5
    assert [decode_chunks(frames) for frames in (1, 9, 17, 25, 49)] == [1, 1, 2, 3, 6]


def _row(trainable, size, mode, activations, fixed, update, time=None):
    return {"trainable": trainable, "size": size, "mode": mode, "held": 0, "activations": activations,
            "backward_peak": fixed + activations, "update_peak": update, "peak": max(fixed + activations, update),
            "time": time}


def test_render_puts_the_predictions_and_zero_residuals_of_exact_data_in_the_table():
    fixed, per_voxel = {"decoder": 2000 * MIB, "all": 3000 * MIB}, {"off": 20_000.0, "on": 4_000.0}
    intercept = 400 * MIB
    sizes = [(17, 32, 32), (25, 32, 32)]
    update = {t: fixed[t] + 500 * MIB for t in fixed}  # above the first size's forward + backward with checkpointing
    rows = [_row(t, size, mode, intercept + per_voxel[mode] * voxels(size), fixed[t], update[t],
                 10.0 if size == sizes[0] else None)
            for t in vae_training.TRAINABLE for size in sizes for mode in vae_training.MODES]
    result = {
        "label": "CogVideoX's VAE", "reps": 3, "rows": rows, "device": "cpu", "command": "python tools/bench.py --only vae",
        "counts": {t: {"parameters": 215_000_000, "trained": 123_000_000, "trained_bytes": 492_000_000, "lpips": 14_700_000,
                       "fixed": fixed[t]}
                   for t in vae_training.TRAINABLE},
        "fits": [{"trainable": t, "mode": m, "fixed": fixed[t], "intercept": intercept, "per_voxel": per_voxel[m],
                  "update": update[t]} for t in vae_training.TRAINABLE for m in vae_training.MODES],
        "recipe": {"trainable": "decoder", "checkpointing": True, "size": (17, 256, 256), "batch": 1, "precision": "bf16",
                   "configs": vae_training.RECIPE},
        "targets": [{"size": (17, 256, 256), "batch": 1}, {"size": (49, 480, 720), "batch": 1}],
    }
    text = "\n".join(vae_training.render(result))
    recipe_gib = (2400 * MIB + 4_000.0 * 17 * 256 * 256) / 2**30
    whole_gib = (2400 * MIB + 4_000.0 * 49 * 480 * 720) / 2**30
    assert (f"| decoder (recipe) | on | 2.0 | 0.39 | 3.9 | +0.0%, +0.0% | 1.00, 1.00 | {recipe_gib:.1f} | {whole_gib:.1f} |"
            in text)
    # 17 x 32 x 32 with checkpointing: 400 + 66 MiB of activations, below the update's 500 above fixed
    assert "| 17x32x32 | decoder | 123.0 M | on | 10.00 | +0% | 2,500 | AdamW update | 466 | 1.6x |" in text
    assert "| 17x32x32 | decoder | 123.0 M | off | 10.00 | +0% | 2,732 | forward/backward | 732 | 1.0x |" in text
    assert "| 25x32x32 | all | 123.0 M | off | - | - |" in text
    assert "timed at 17x32x32 only" in text and "as every clip measured here" in text
