"""tools/ablate.py and sat_video/experiments/ablation.py: grids are checked before anything runs, every variant of
configs/ablations/latte.yaml trains, the quality stage ranks trained models above the untrained one over seeds on the
shapes study, a failed variant is reported while the others run, and joint image + video training works under
torchrun with DeepSpeed ZeRO-2."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sat_video
from sat_video.common.errors import GridError
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.sources import discover
from sat_video.experiments.ablation import Variant, error_line, load_grid, measure, seed_folder, variant_config
from sat_video.training.metrics import read_metrics
from tests.conftest import ROOT

BASE = [str(ROOT / "configs" / name) for name in ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")]
QUICKSTART = [str(ROOT / "configs" / name) for name in ("cogvideox_2b.yaml", "tiny.yaml", "quickstart.yaml")]
LATTE = ROOT / "configs" / "ablations" / "latte.yaml"
LATTE_SHAPES = ROOT / "configs" / "ablations" / "latte_shapes.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two captioned still images in SAT's SFT layout."""
    root = tmp_path_factory.mktemp("images")
    (root / "videos").mkdir()
    (root / "labels").mkdir()
    for name, color in (("red_square", (220, 30, 30)), ("blue_square", (30, 30, 220))):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[16:48, 16:48] = color
        Image.fromarray(pixels).save(root / "videos" / f"{name}.png")
        (root / "labels" / f"{name}.txt").write_text(f"a {name.replace('_', ' ')}\n")
    return root


def ablate(out, *args, grid=LATTE, base=BASE):
    command = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--base", *base, "--grid", str(grid), "--out", str(out),
               *args, "train.report_to=[none]"]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def table(results, section="Training"):
    """``{variant: {column: cell}}`` of a table of results.md."""
    text = results.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    rows = [[cell.strip() for cell in line.strip().removeprefix("| ").removesuffix(" |").split(" | ")] for line in lines[1:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def losses(run):
    return [record["loss"] for record in read_metrics(run)]


# ---------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_latte_variant_trains_10_steps_with_finite_loss(train_assets, images, tmp_path):
    out = tmp_path / "latte"
    # 4 blocks, so that interleaved (S T S T) and sequential (S S T T) differ
    proc = ablate(out, "--images", str(images), "--no-quality", f"data.sources=[{train_assets / 'data'}]",
                  f"model.text_encoder.path={train_assets / 't5'}", "train.train_iters=10", "model.dit.num_layers=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = table(out / "results.md")
    assert list(rows) == [v.name for v in load_grid(LATTE).variants]
    seed = sat_video.load_config(BASE).train.seed
    for name, row in rows.items():
        assert row["status"] == "ok", row
        curve = losses(seed_folder(out, name, seed) / "run")
        assert len(curve) == 10 and all(math.isfinite(loss) for loss in curve), (name, curve)
        assert float(row["final loss"]) == pytest.approx(curve[-1], rel=1e-3)
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC) and not (out / "quality.png").exists()
    assert "## Sample quality" not in (out / "results.md").read_text()


@pytest.mark.slow
def test_the_quality_stage_ranks_trained_models_above_the_untrained_one_over_seeds(tmp_path):
    """The shapes study end to end (--synthetic): two seeds of a variant train, and every trained model samples
    closer to the real clips (FSD) and draws more of its captions' colours than the untrained model; the report shows
    the spread over seeds; a failed variant is reported while the others still run; --report-only rebuilds the report."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n"
                    "  too_long_clips:\n    description: the 16-frame videos are too short for 49-frame clips\n"
                    "    set: {model.dit.num_frames: 49}\n"
                    "  full_attention: {}\n")
    out = tmp_path / "out"
    # the quickstart's model at tiny.yaml's sizes: 500 steps take 15 s and already draw every colour
    settings = ["--synthetic", "--seeds", "2", "--quality-prompts", "6", "train.train_iters=500", "train.micro_batch_size=8",
                "train.log_interval=10", "train.save_interval=1000", "train.lr_schedule.warmup_iters=20", "sample.steps=10",
                "model.dit.hidden_size=64", "model.dit.num_layers=2", "model.dit.num_attention_heads=2",
                "model.dit.time_embed_dim=64"]
    base = [str(ROOT / "configs" / name) for name in ("cogvideox_5b.yaml", "tiny.yaml", "quickstart.yaml")]
    proc = ablate(out, *settings, grid=grid, base=base)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    untrained = results["untrained"]
    assert untrained["samples"] == {"seen": 6, "heldout": 6}
    trained = results["variants"]["full_attention"]["runs"]
    assert list(trained) == ["42", "43"]
    for seed, run in trained.items():
        quality = run["quality"]
        assert run["returncode"] == 0 and quality["samples"] == {"seen": 6, "heldout": 6}
        assert quality["fsd"] < 0.75 * untrained["fsd"], (seed, quality, untrained)
        for split in ("seen", "heldout"):
            colour = quality["accuracy"][split]["colour"]
            assert colour >= 0.8 and colour > untrained["accuracy"][split]["colour"], (seed, quality, untrained)
        sheet = seed_folder(out, "full_attention", int(seed)) / "samples" / "contact_sheet.png"
        assert sheet.read_bytes().startswith(PNG_MAGIC)
    summary = results["variants"]["full_attention"]["summary"]["fsd"]
    assert summary["seeds"] == 2
    assert summary["mean"] == pytest.approx((trained["42"]["quality"]["fsd"] + trained["43"]["quality"]["fsd"]) / 2)

    rows, quality = table(out / "results.md"), table(out / "results.md", "Sample quality")
    assert rows["full_attention"]["status"] == "ok" and " ± " in rows["full_attention"]["final loss"]
    assert " ± " in quality["full_attention"]["FSD"] and quality["full_attention"]["held-out: all three"] != "-"
    assert "untrained" in " ".join(quality)
    failed = rows["too_long_clips"]["status"]
    assert failed.startswith("seed 42 failed (exit 2): train_video: error: no usable sample") and "too few frames" in failed
    assert str(seed_folder(out, "too_long_clips", 42) / "train.log") in failed
    assert all((out / name).read_bytes().startswith(PNG_MAGIC) for name in ("loss.png", "quality.png"))

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import ablate as tool
    finally:
        sys.path.pop(0)
    common = ["--base", *base, "--grid", str(grid), "--out", str(out), *settings, "train.report_to=[none]"]
    assert tool.main(common) == 2  # finished runs are never replaced unasked
    assert (seed_folder(out, "full_attention", 42) / "run" / "metrics.jsonl").is_file()
    (out / "results.md").unlink()
    assert tool.main([*common, "--report-only"]) == 0  # the reports again, from the runs alone
    assert table(out / "results.md", "Sample quality") == quality and table(out / "results.md") == rows


@pytest.mark.slow
def test_joint_image_video_training_with_two_processes_under_zero2(train_assets, images, tmp_path):
    """Image steps give temporal parameters no gradient from their samples; ZeRO-2 aborts when ranks disagree on which
    parameters have gradients. Both ranks draw the same kind at every step (ClipBatchSampler), and the zero-weighted
    temporal parts keep every parameter in every reduction: a run through image and video steps trains."""
    sources = [str(train_assets / "data"), str(images)]
    kinds = [ref.is_image for ref in discover(sources)]
    steps = 6
    per_rank = [[kinds[batch[0][0]] for batch in itertools.islice(ClipBatchSampler(kinds, 1, rank, 2, seed=42), steps)]
                for rank in (0, 1)]
    assert per_rank[0] == per_rank[1], per_rank  # the same kind on both ranks at every step ...
    assert set(per_rank[0]) == {True, False}, per_rank  # ... and the run has image steps and video steps
    save = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tools" / "train_video.py"),
        "--base",
        *BASE,
        f"data.sources=[{','.join(sources)}]",
        f"model.text_encoder.path={train_assets / 't5'}",
        f"train.save={save}",
        "train.report_to=[none]",
        f"train.train_iters={steps}",
        "train.micro_batch_size=1",
        "train.seed=42",
        "model.dit.mixins.spatiotemporal={type: factorized_attention, arrangement: interleaved}",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    curve = losses(save)
    assert len(curve) == steps and all(math.isfinite(loss) for loss in curve)


# ---------------------------------------------------------------------- grid checks


def _grid(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("variants: {}\n", "'variants' must be a non-empty mapping"),
        ("variant:\n  a: {}\n", "unknown top-level key 'variant' (valid: defaults, variants)"),
        ("variants:\n  a b: {}\n", "variant 'a b': a variant name becomes a folder name"),
        (
            "variants:\n  loss.png: {}\n",
            "variant 'loss.png': a variant name becomes a folder name next to results.md",
        ),
        ("variants:\n  a: {sets: {}}\n", "variant 'a': unknown key 'sets' (valid: description, set, images)"),
        ("variants:\n  a: {images: yes please}\n", "variant 'a': 'images' must be true or false, found 'yes please'"),
        ("variants:\n  a: {set: [model.dit.num_layers=4]}\n", "variant 'a', 'set': expected a mapping of dotted config keys"),
        ("variants:\n  a: {set: {train.seed: 1}}\n", "'train.seed' sets 'train.seed', which every variant shares"),
        ("variants:\n  a: {set: {data: {fps: 4}}}\n", "'data' sets 'data', which every variant shares"),
        ("defaults: {train.train_iters: 5}\nvariants:\n  a: {}\n", "'defaults': 'train.train_iters' sets 'train.train_iters'"),
    ],
)
def test_grid_structure_errors_name_the_file_variant_and_key(tmp_path, text, message):
    path = _grid(tmp_path, text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_variant_settings_are_checked_against_the_config_and_the_model(tmp_path):
    base = sat_video.load_config(BASE)
    path = _grid(
        tmp_path,
        "variants:\n  typo: {set: {model.dit.hiden_size: 32}}\n"
        "  arrangement: {set: {model.dit.mixins.st: {type: factorized_attention, arrangement: diagonal}}}\n"
        "  joint: {images: true}\n",
    )
    grid = load_grid(path)
    typo, arrangement, joint = grid.variants
    with pytest.raises(
        GridError, match=rf"{path}: variant 'typo': unknown key 'model.dit.hiden_size'; did you mean 'hidden_size'"
    ):
        variant_config(base, grid, typo, save=tmp_path / "run")
    # a mixin's own value is checked with the config (the model is built on the meta device at load), before any run
    with pytest.raises(GridError, match=rf"{path}: variant 'arrangement': .*found 'diagonal'"):
        variant_config(base, grid, arrangement, save=tmp_path / "run")
    with pytest.raises(GridError, match="variant 'joint' trains on images too .* pass --images"):
        variant_config(base, grid, joint, save=tmp_path / "run")
    cfg = variant_config(base, grid, joint, save=tmp_path / "run", images=["pics"])
    assert list(cfg.data.sources) == ["pics"] and cfg.train.save == str(tmp_path / "run")
    with pytest.raises(GridError, match="no variant named 'nope'"):
        grid.select(["nope"])


def test_latte_shapes_grid_holds_the_four_arrangements_and_the_conditioning_axis():
    base = sat_video.load_config(QUICKSTART)
    grid = load_grid(LATTE_SHAPES)
    mixins = {v.name: dict(variant_config(base, grid, v, save="run").model.dit.mixins) for v in grid.variants}
    assert [m["spatiotemporal"]["arrangement"] for m in mixins.values()] == [
        "interleaved", "sequential", "serial_in_block", "parallel_in_block", "interleaved"]
    assert "adaln_layer" not in mixins["all_tokens"] and mixins["all_tokens"]["timestep_token"]["type"] == "condition_tokens"
    assert all("adaln_layer" in m for name, m in mixins.items() if name != "all_tokens")


def test_latte_grid_expresses_every_axis():
    base = sat_video.load_config(BASE)
    grid = load_grid(LATTE)
    mixins = {v.name: dict(variant_config(base, grid, v, save="run", images=["pics"]).model.dit.mixins) for v in grid.variants}
    arrangements = {name: m["spatiotemporal"]["arrangement"] for name, m in mixins.items() if "spatiotemporal" in m}
    assert {"interleaved", "sequential", "serial_in_block", "parallel_in_block"} <= set(arrangements.values())
    assert "spatiotemporal" not in mixins["full_attention"]
    assert (
        mixins["rope"]["pos_embed"]["type"] == "rotary_3d" and mixins["interleaved"]["pos_embed"]["type"] == "sincos_interpolated"
    )
    assert "adaln_layer" not in mixins["all_tokens"] and mixins["all_tokens"]["timestep_token"]["type"] == "condition_tokens"
    assert variant_config(base, grid, grid.select(["tubes"])[0], save="run").model.dit.patch_size_t == 2
    assert [v.name for v in grid.variants if v.images] == ["joint_image_video"]


def test_parameters_and_flops_follow_the_architecture():
    base = sat_video.load_config(BASE)
    grid = load_grid(LATTE)

    def report(name, *overrides):
        cfg = variant_config(
            sat_video.load_config(BASE, overrides) if overrides else base, grid, grid.select([name])[0], save="run"
        )
        return measure(grid, Variant(name), cfg)

    interleaved, serial, full = report("interleaved"), report("serial_in_block"), report("full_attention")
    d, layers = 64, 2
    assert serial.parameters[0] - interleaved.parameters[0] == layers * (d * 3 * d + 3 * d + d * d + d)  # one attention per block
    assert interleaved.parameters == full.parameters  # (1) only restricts the existing attention ...
    assert interleaved.flops < full.flops < serial.flops  # ... and that costs fewer FLOPs than full attention
    assert report("interleaved", "train.gradient_accumulation_steps=2").flops == 2 * interleaved.flops
    frozen = report("interleaved", "train.trainable=[mixins.*]")
    assert frozen.parameters[0] == interleaved.parameters[0] > frozen.parameters[1]
    assert frozen.flops < interleaved.flops  # no weight gradients for frozen blocks


def test_error_line_finds_the_reason():
    assert error_line("INFO x\ntrain_video: error: no usable sample in d\nmore\n") == "train_video: error: no usable sample in d"
    assert (
        error_line("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n[rank0] exited\n") == "RuntimeError: boom"
    )
    assert error_line("just this\n\n") == "just this" and error_line("") == "(no output)"
