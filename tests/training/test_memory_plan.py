"""The training memory planner against the trainer's own measurement (CPU: weights and states held plus the live-tensor
peak), and ``tools/train_video.py --estimate-memory`` on the full-size configs."""

import pytest

from sat_video import load_config
from sat_video.training.memory_plan import Settings, TrainingMemoryPlan
from tests.conftest import ROOT
from tests.training.runs import BASE, metrics, run_keys, train_here
from tools.train_video import main as train_video

# DeepSpeed's default gradient bucket (5e8 elements, allocated whatever the model's size) would be nearly all of a tiny
# run's peak; a small one leaves the activations, states and frozen stages to be checked.
SMALL_BUCKETS = "deepspeed.extra.zero_optimization.reduce_bucket_size=20000"
RECIPES = {"sft": [], "lora": ["model.dit.mixins.lora.type=lora", "model.dit.mixins.lora.rank=8",
                               "train.trainable=[mixins.lora.*]"]}


def _run_keys(assets, save, size, recipe, zero_stage):
    frames, height, width = size
    return run_keys(assets, save, "train.train_iters=2", "train.measure_memory=true", "data.prefetch=0", SMALL_BUCKETS,
                    f"deepspeed.zero_stage={zero_stage}", f"model.dit.num_frames={frames}", f"data.height={height}",
                    f"data.width={width}", "train.activation_checkpointing=true", *RECIPES[recipe])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "sft"])
def test_estimate_within_20_percent_of_the_measured_peak(recipe, train_assets, tmp_path):
    for size in ((9, 64, 64), (13, 64, 64)):
        save = tmp_path / f"run-{size[0]}"
        train_here(train_assets, save, *_run_keys(train_assets, save, size, recipe, 2)[4:])
        measured = max(record["peak_memory_gb"] for record in metrics(save))
        cfg = load_config(BASE, _run_keys(train_assets, save, size, recipe, 2))
        predicted = TrainingMemoryPlan(cfg).predict().peak_gib
        assert predicted == pytest.approx(measured, rel=0.2), (size, predicted, measured)


@pytest.mark.slow
def test_cli_names_a_fitting_setting_for_5b_lora_on_24_gib(capsys):
    configs = [str(ROOT / "configs" / name) for name in ("cogvideox_5b.yaml", "lora.yaml")]
    assert train_video(["--base", *configs, "--estimate-memory", "--gpus", "8", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    for term in ("weights", "gradients", "optimizer states", "activations", "frozen stages", "peak"):
        assert f"\n  {term} " in out
    fitting = out.splitlines()[-1]
    assert fitting.startswith("fastest predicted to fit"), out
    overrides = fitting.split(": ", 1)[1].split()
    cfg = load_config(configs, overrides)  # the override line is a valid config and says what was predicted
    assert sorted(Settings.of(cfg).overrides(Settings.of(load_config(configs, []))).split()) == sorted(overrides)
    assert TrainingMemoryPlan(cfg, 8).predict().peak_gib <= 0.9 * 24


def test_gpu_sizes_without_the_estimate_are_refused(capsys):
    configs = [str(ROOT / "configs" / name) for name in ("cogvideox_5b.yaml", "lora.yaml")]
    assert train_video(["--base", *configs, "--gpus", "8"]) == 2
    assert "--gpus and --gpu-memory go with --estimate-memory" in capsys.readouterr().err
