"""describe_clip reads shape, colour and direction back from rendered clips and from decoded mp4 files."""

import numpy as np
import pytest

from sat_video.data import ClipSpec, discover, load_clip
from sat_video.synthetic import BACKGROUND, NUM_COMBINATIONS, combination, describe_clip, make_moving_shapes, render_clip


def test_every_combination_is_read_back_from_its_rendering():
    rng = np.random.default_rng(0)
    for index in range(NUM_COMBINATIONS):
        shape, colour, direction = combination(index)
        assert describe_clip(render_clip(shape, colour, direction, 13, 64, 64, rng)) == (shape, colour, direction)


def test_decoded_mp4_clips_are_read_back(tmp_path):
    items = make_moving_shapes(tmp_path, num_videos=12, num_frames=16, height=64, width=64, fps=8, seed=1)
    spec = ClipSpec(num_frames=13, height=64, width=64, fps=8)
    for ref, (_, caption) in zip(discover([tmp_path]), items):
        video, _ = load_clip(ref, spec)  # [3, T, H, W] in [-1, 1]
        frames = ((video.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        shape, colour, direction = describe_clip(frames)
        assert caption == f"a {colour} {shape} moving {direction}"


def test_an_empty_clip_is_refused():
    with pytest.raises(ValueError, match="no frame shows a shape"):
        describe_clip(np.broadcast_to(np.asarray(BACKGROUND, np.uint8), (5, 16, 16, 3)))
