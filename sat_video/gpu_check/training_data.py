"""What the training sections train on: generated captioned clips at the check's size and a random T5 (one layer,
the DiT's text width) with a tokenizer trained on the captions, made once per check in its scratch folder."""

from __future__ import annotations

from pathlib import Path

from sat_video.gpu_check.check import Check

FPS = 8


def training_data(check: Check, variant: str) -> tuple[Path, Path]:
    """``(clips folder, T5 folder)`` for ``variant``'s text width."""
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5

    text_width = check.config(variant).model.dit.text_hidden_size
    clips, t5 = check.workdir / "clips", check.workdir / f"t5_{text_width}"
    frames, height, width = check.sizes.train_clip
    if not clips.exists():
        written = make_moving_shapes(clips, check.sizes.clips, frames, height, width, FPS, seed=0)
    else:
        written = [(path, (clips / "labels" / f"{path.stem}.txt").read_text().strip())
                   for path in sorted((clips / "videos").glob("*.mp4"))]
    if not t5.exists():
        make_tiny_t5([caption for _, caption in written], t5, **{**check.sizes.tiny_t5, "d_model": text_width})
    return clips, t5


def run_overrides(check: Check, variant: str, save: Path) -> list[str]:
    """The config keys of a training run on :func:`training_data` into ``save``: random first stage, clips cut at
    their full length, logs every step, no TensorBoard."""
    clips, t5 = training_data(check, variant)
    frames, height, width = check.sizes.train_clip
    return [f"data.sources=[{clips}]", f"model.text_encoder.path={t5}", "model.first_stage.path=null",
            f"model.dit.num_frames={frames}", f"data.height={height}", f"data.width={width}", f"data.fps={FPS}",
            "data.skip_frames=0", "train.init_checkpoint=null", f"train.save={save}", "train.report_to=[none]",
            "train.progress_bar=false", "train.log_interval=1", "train.micro_batch_size=1", "deepspeed.precision=bf16"]
