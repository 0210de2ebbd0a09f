"""Data pipeline on real files: mp4s are encoded with ffmpeg into tmp_path and decoded with decord."""

import itertools
import logging
import pickle

import decord
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from sat_video.common.errors import DataError, UnusableSample
from sat_video.config.schema import Config
from sat_video.data.clips import Batch, ClipSpec, VideoDataset, collate, load_clip, load_image
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.sources import SampleRef, discover
from sat_video.data.video_io import write_mp4
from sat_video.fixtures.synthetic import BACKGROUND, DIRECTIONS, NUM_COMBINATIONS, combination, make_moving_shapes
from tests.numerics import assert_close_rel, assert_identical

LEVEL_STEP = 8  # frame t is painted red = 16 + 8 t, far more than the codec's error of a few levels


def indexed_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Flat frames whose red level encodes their index."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = (16 + LEVEL_STEP * t, 128, 64)
    return frames


def frame_indices(clip: torch.Tensor) -> list[int]:
    """Source frame index of every frame of a ``[3, T, H, W]`` clip made from :func:`indexed_frames`."""
    red = ((clip[0] + 1) * 127.5).mean(dim=(1, 2))
    return [round((level - 16) / LEVEL_STEP) for level in red.tolist()]


def write_video(path, frames, fps=24.0, caption="a test clip"):
    """An mp4 in SFT layout: ``<root>/videos/<name>.mp4`` + ``<root>/labels/<name>.txt`` (no label if caption is None)."""
    write_mp4(path, frames, fps)
    if caption is not None:
        label = path.parent.parent / "labels" / f"{path.stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(caption + "\n")
    return SampleRef(path, None, path.parent.parent / "labels" / f"{path.stem}.txt", False)


SPEC = ClipSpec(num_frames=9, height=32, width=32, fps=8.0, skip_frames=0)


# ---------------------------------------------------------------- writing
def test_write_mp4_round_trip_is_atomic_and_refuses_overwrite(tmp_path):
    frames = indexed_frames(6, 48, 64)
    path = write_mp4(tmp_path / "clip.mp4", torch.from_numpy(frames), fps=24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary left behind
    reader = decord.VideoReader(str(path))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert decoded.shape == (6, 48, 64, 3) and reader.get_avg_fps() == 24
    assert np.abs(decoded.astype(int) - frames).max() <= 4
    with pytest.raises(FileExistsError, match="clip.mp4 already exists"):
        write_mp4(path, frames, fps=24)
    write_mp4(path, frames[:2], fps=24, overwrite=True)
    assert len(decord.VideoReader(str(path))) == 2
    with pytest.raises(ValueError, match="must be even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=8)


def test_moving_shapes_are_deterministic_diverse_and_move(tmp_path):
    assert len({combination(i) for i in range(NUM_COMBINATIONS)}) == NUM_COMBINATIONS
    assert len({combination(i)[:2] for i in range(12)}) == 12 and len({combination(i)[2] for i in range(4)}) == 4
    first = make_moving_shapes(tmp_path / "a", 4, 9, 32, 32, 8, seed=3)
    second = make_moving_shapes(tmp_path / "b", 4, 9, 32, 32, 8, seed=3)
    assert [caption for _, caption in first] == ["a red circle moving left", "a green square moving right",
                                                 "a blue triangle moving up", "a yellow circle moving down"]
    for (path_a, caption), (path_b, _) in zip(first, second):
        frames = decord.VideoReader(str(path_a)).get_batch(list(range(9))).asnumpy()
        assert np.array_equal(frames, decord.VideoReader(str(path_b)).get_batch(list(range(9))).asnumpy())
        shape_pixels = np.abs(frames.astype(int) - BACKGROUND).sum(-1) > 150  # [T, H, W]
        assert 0.1 < shape_pixels[0].mean() < 0.5  # large, yet inside the frame
        ys, xs = np.nonzero(shape_pixels[0])
        ye, xe = np.nonzero(shape_pixels[-1])
        step_x, step_y = DIRECTIONS[caption.split()[-1]]
        moved_x, moved_y = xe.mean() - xs.mean(), ye.mean() - ys.mean()
        assert moved_x * step_x + moved_y * step_y > 10, caption  # crosses the frame in its direction


# ---------------------------------------------------------------- discovery
def test_discover_sft_jsonl_and_csv_layouts(tmp_path):
    sft = make_moving_shapes(tmp_path / "sft", 3, 9, 32, 32, 8, seed=0)
    jsonl = make_moving_shapes(tmp_path / "js", 2, 9, 32, 32, 8, seed=1, layout="jsonl")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "sft" / "videos" / "still.png")
    (tmp_path / "sft" / "labels" / "still.txt").write_text("a red square\nsecond line is ignored\n")
    (tmp_path / "list.csv").write_text('path,caption\njs/videos/00000_red_circle_left.mp4,"a circle, red"\n')

    refs = discover([tmp_path / "sft", tmp_path / "js" / "metadata.jsonl", tmp_path / "list.csv"])
    assert [ref.path.as_posix() for ref in refs] == sorted(ref.path.as_posix() for ref in refs)
    assert len(refs) == 3 + 1 + 2 + 1
    by_path = {ref.path.resolve(): ref for ref in refs if ref.caption is None}
    assert sorted(ref.is_image for ref in by_path.values()) == [False, False, False, True]
    assert {ref.caption for ref in refs if ref.caption is not None} == {caption for _, caption in jsonl} | {"a circle, red"}
    for path, caption in sft:
        ref = by_path[path.resolve()]
        assert ref.caption_file.is_file() and load_clip(ref, SPEC)[1] == caption
    still = next(ref for ref in refs if ref.is_image)
    assert load_clip(still, SPEC)[1] == "a red square"


def test_links_are_followed_and_a_broken_one_is_named(tmp_path):
    sft = make_moving_shapes(tmp_path / "sft", 1, 9, 32, 32, 8, seed=0)
    videos, labels = tmp_path / "sft" / "videos", tmp_path / "sft" / "labels"
    (videos / "linked.mp4").symlink_to(sft[0][0])
    (videos / "unmounted.mp4").symlink_to(tmp_path / "nfs" / "gone.mp4")  # a data set on storage that is not mounted
    for name in ("linked", "unmounted"):
        (labels / f"{name}.txt").write_text("a caption\n")
    refs = {ref.path.name: ref for ref in discover([tmp_path / "sft"])}
    assert sorted(refs) == sorted([sft[0][0].name, "linked.mp4", "unmounted.mp4"])
    assert load_clip(refs["linked.mp4"], SPEC)[0].shape == load_clip(refs[sft[0][0].name], SPEC)[0].shape
    with pytest.raises(UnusableSample, match=f"broken link to {tmp_path / 'nfs' / 'gone.mp4'} .is that storage mounted"):
        load_clip(refs["unmounted.mp4"], SPEC)


def test_discover_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="data source not found: .*missing"):
        discover([tmp_path / "missing"])
    (tmp_path / "empty" / "videos").mkdir(parents=True)
    with pytest.raises(DataError, match="no videos or images found"):
        discover([tmp_path / "empty"])
    with pytest.raises(DataError, match="no videos/ folder"):
        discover([tmp_path])
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text('{"path": "a.mp4", "caption": "fine"}\n{"path": "b.mp4", "caption": \n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: not valid JSON"):
        discover([metadata])
    metadata.write_text('{"path": "a.mp4", "caption": "fine"}\n\n{"path": "b.mp4"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:3: 'caption' must be a string, found None"):
        discover([metadata])
    (tmp_path / "bad.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(DataError, match="bad.csv: the header must name the columns 'path' and 'caption'"):
        discover([tmp_path / "bad.csv"])


# ---------------------------------------------------------------- decoding
def test_fps_resampling_and_skip_frames(tmp_path):
    ref = write_video(tmp_path / "videos" / "count.mp4", indexed_frames(30), fps=24)  # 24 fps, sampled at 8
    clip, caption = load_clip(ref, SPEC)
    assert clip.shape == (3, 9, 32, 32) and clip.dtype == torch.float32 and caption == "a test clip"
    assert clip.min() >= -1 and clip.max() <= 1
    assert frame_indices(clip) == list(range(0, 27, 3))
    skipped = load_clip(ref, ClipSpec(9, 32, 32, 8.0, skip_frames=2))[0]
    assert frame_indices(skipped) == list(range(2, 29, 3))  # last frame 26 < 30 - 2
    with pytest.raises(UnusableSample, match="too few frames: needs 9 at 8 fps after skipping 3 at each end, has 8"):
        load_clip(ref, ClipSpec(9, 32, 32, 8.0, skip_frames=3))  # frame 27 would be among the last 3
    frames_at_12 = load_clip(ref, ClipSpec(9, 32, 32, 12.0, skip_frames=0))[0]
    assert frame_indices(frames_at_12) == list(range(0, 17, 2))


def test_random_start_draws_a_start_per_epoch_and_sample_that_a_restart_draws_again(tmp_path):
    ref = write_video(tmp_path / "videos" / "count.mp4", indexed_frames(30), fps=24)  # sampled every 3rd frame
    spec = ClipSpec(5, 32, 32, 8.0, skip_frames=2, random_start=True)  # a clip spans 13 frames: starts 2 .. 15 fit
    dataset = VideoDataset([ref], spec, seed=7)
    starts = []
    for epoch in range(12):
        frames = frame_indices(dataset[(0, epoch, 0)].video)
        assert frames == list(range(frames[0], frames[0] + 13, 3)) and 2 <= frames[0] <= 15
        starts.append(frames[0])
    assert len(set(starts)) >= 4
    assert [frame_indices(VideoDataset([ref], spec, seed=7)[(0, e, 0)].video)[0] for e in range(12)] == starts
    assert starts != [frame_indices(VideoDataset([ref], spec, seed=8)[(0, e, 0)].video)[0] for e in range(12)]
    fixed = VideoDataset([ref], ClipSpec(5, 32, 32, 8.0, skip_frames=2), seed=7)
    assert {frame_indices(fixed[(0, e, 0)].video)[0] for e in range(4)} == {2}


def test_min_frames_pads_with_the_last_frame(tmp_path):
    ref = write_video(tmp_path / "videos" / "short.mp4", indexed_frames(5), fps=8)
    clip = load_clip(ref, ClipSpec(9, 32, 32, 8.0, skip_frames=0, min_frames=5))[0]
    assert clip.shape == (3, 9, 32, 32) and frame_indices(clip) == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    assert torch.equal(clip[:, 4], clip[:, 8])
    with pytest.raises(UnusableSample, match="needs at least 6 at 8 fps .* has 5"):
        load_clip(ref, ClipSpec(9, 32, 32, 8.0, skip_frames=0, min_frames=6))
    with pytest.raises(UnusableSample, match="too few frames: needs 9"):
        load_clip(ref, SPEC)


def test_cover_resize_then_center_crop(tmp_path):
    frames = np.zeros((9, 64, 96, 3), np.uint8)  # wide: the sides are cropped away
    frames[:] = (20, 40, 220)
    frames[:, :, :12] = frames[:, :, -12:] = (230, 20, 20)  # red bands that must not survive the crop
    frames[:, 24:40, 40:56] = 255  # white marker in the centre
    clip = load_clip(write_video(tmp_path / "videos" / "wide.mp4", frames, fps=8), SPEC)[0]
    pixels = ((clip[:, 0] + 1) * 127.5).permute(1, 2, 0)  # [H, W, 3]
    assert not ((pixels[..., 0] > 150) & (pixels[..., 2] < 100)).any()
    rows, cols = torch.nonzero(pixels.min(dim=-1).values > 200, as_tuple=True)
    assert abs(rows.float().mean() - 15.5) < 1 and abs(cols.float().mean() - 15.5) < 1
    assert 6 <= rows.max() - rows.min() + 1 <= 10  # 16 px marker halved


def test_image_gives_one_frame(tmp_path):
    (tmp_path / "videos").mkdir()
    Image.new("RGB", (48, 24), (255, 0, 0)).save(tmp_path / "videos" / "red.jpg")
    clip = load_clip(SampleRef(tmp_path / "videos" / "red.jpg", "a red image", None, True), SPEC)[0]
    assert clip.shape == (3, 1, 32, 32)
    assert clip[0].min() > 0.9 and clip[1:].max() < -0.8


def reference_clip(frames: np.ndarray, height: int, width: int, num_frames: int) -> torch.Tensor:
    """The plain recipe: float, resize to cover and center-crop (unless already at size), pad, scale, to [3, T, H, W]."""
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, h, w]
    h, w = clip.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        clip = F.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        clip = clip[..., top:top + height, left:left + width]
    clip = torch.cat([clip, clip[-1:].expand(num_frames - len(clip), -1, -1, -1)])
    return (clip / 127.5 - 1.0).permute(1, 0, 2, 3)


def test_clips_match_the_plain_recipe_with_and_without_resizing(tmp_path):
    rng = np.random.default_rng(0)
    ref = write_video(tmp_path / "videos" / "noise.mp4", rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8), fps=8)
    reader = decord.VideoReader(str(ref.path))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()  # 8 fps sampled at 8: every frame
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "videos" / "noise.png")
    still = SampleRef(tmp_path / "videos" / "noise.png", "noise", None, True)
    for height, width in ((64, 96), (40, 40), (80, 120)):  # at size, down with a crop, up
        for num_frames, min_frames in ((9, None), (17, 9)):  # 17 > 12 frames: padded with the last one
            clip = load_clip(ref, ClipSpec(num_frames, height, width, 8.0, skip_frames=0, min_frames=min_frames))[0]
            expected = reference_clip(decoded[:num_frames], height, width, num_frames)
            assert clip.shape == (3, num_frames, height, width) and clip.is_contiguous()
            assert_close_rel(clip, expected)
    for height, width in ((48, 80), (32, 32)):
        clip = load_clip(still, ClipSpec(9, height, width, 8.0))[0]
        assert_close_rel(clip, reference_clip(image[None], height, width, 1))
        assert_identical(load_image(still.path, height, width), clip[:, 0])


# ---------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """SFT folder: five unusable files, sorted before two good ones, and a good image."""
    root = tmp_path_factory.mktemp("mixed")
    videos = root / "videos"
    good = write_video(videos / "z_good.mp4", indexed_frames(30), caption="good one").path
    write_video(videos / "zz_good.mp4", indexed_frames(30), caption="good two")
    (videos / "a_empty.mp4").write_bytes(b"")
    (videos / "b_truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (videos / "c_text.mp4").write_text("this is not a video\n")
    write_video(videos / "d_two_frames.mp4", indexed_frames(2))
    write_video(videos / "e_no_label.mp4", indexed_frames(30), caption=None)
    for name in ("a_empty", "b_truncated", "c_text"):
        (root / "labels" / f"{name}.txt").write_text("a caption\n")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(videos / "image.png")
    (root / "labels" / "image.txt").write_text("a green image\n")
    return root


BAD_REASONS = {
    "a_empty.mp4": "empty file",
    "b_truncated.mp4": "not a readable video",
    "c_text.mp4": "not a readable video",
    "d_two_frames.mp4": "too few frames",
    "e_no_label.mp4": "caption file missing",
}


def test_each_bad_file_raises_unusable_sample(mixed):
    refs = {ref.path.name: ref for ref in discover([mixed])}
    for name, reason in BAD_REASONS.items():
        with pytest.raises(UnusableSample, match=reason) as caught:
            load_clip(refs[name], SPEC)
        assert caught.value.path == str(refs[name].path) and reason in caught.value.reason
        assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)  # crosses worker processes


def test_dataset_substitutes_a_sample_of_the_same_kind_and_reports(mixed, caplog):
    refs = discover([mixed])
    dataset = VideoDataset(refs, SPEC)
    names = [ref.path.name for ref in refs]
    with caplog.at_level(logging.WARNING, logger="sat_video.data"):
        sample = dataset[(names.index("a_empty.mp4"), 2, 7)]
    assert sample.path.endswith("z_good.mp4") and sample.caption == "good one" and sample.position == (2, 7)
    assert [name.split("/")[-1] for name, _ in sample.skipped] == ["a_empty.mp4", "b_truncated.mp4", "c_text.mp4",
                                                                    "d_two_frames.mp4", "e_no_label.mp4"]
    assert all(BAD_REASONS[path.split("/")[-1]] in reason for path, reason in sample.skipped)
    assert "a_empty.mp4" in caplog.text and "empty file" in caplog.text
    assert dataset[(names.index("image.png"), 0, 0)].video.shape == (3, 1, 32, 32)  # images stay images
    assert dataset.first_usable() == names.index("image.png")


def test_only_bad_files_fail_at_once(mixed):
    bad = [ref for ref in discover([mixed]) if ref.path.name in BAD_REASONS]
    with pytest.raises(DataError, match=r"no usable sample in .*videos: 5 files, e.g. .*a_empty.mp4: empty file"):
        VideoDataset(bad, SPEC).first_usable()
    with pytest.raises(DataError, match="no usable video: all 5 video files failed"):
        VideoDataset(bad, SPEC)[(0, 0, 0)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_loader_yields_batches_with_positions(mixed, num_workers):
    refs = discover([mixed])
    sampler = ClipBatchSampler([ref.is_image for ref in refs], batch_size=2, rank=0, world_size=1, seed=0)
    loader = torch.utils.data.DataLoader(VideoDataset(refs, SPEC), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers)
    batches = list(itertools.islice(loader, 4))
    assert all(isinstance(batch, Batch) for batch in batches)
    assert [batch.position for batch in batches] == [(0, 0), (0, 1), (0, 2), (1, 0)]  # 7 videos -> 3 batches of 2
    assert all(batch.video.shape == (2, 3, 9, 32, 32) and len(batch.captions) == 2 for batch in batches)
    assert any(batch.skipped for batch in batches)


# ---------------------------------------------------------------- config
def test_clip_spec_from_config():
    cfg = OmegaConf.structured(Config)
    cfg.model.dit.num_frames, cfg.model.dit.latent_height, cfg.model.dit.latent_width = 13, 8, 10
    assert ClipSpec.from_config(cfg.data, cfg.model.dit) == ClipSpec(13, 64, 80, 8.0, 3, None)
    cfg.data.height, cfg.data.min_frames, cfg.data.fps = 48, 5, 16.0
    assert ClipSpec.from_config(cfg.data, cfg.model.dit) == ClipSpec(13, 48, 80, 16.0, 3, 5)
    cfg.model.dit.num_frames = 12
    with pytest.raises(DataError, match="num_frames must be of the form 4k\\+1 .* found 12"):
        ClipSpec.from_config(cfg.data, cfg.model.dit)


# ---------------------------------------------------------------- batch order
def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_sampler_is_deterministic_and_changes_order_each_epoch():
    kinds = [False] * 20
    batches = take(ClipBatchSampler(kinds, 4, 0, 1, seed=5), 10)
    assert batches == take(ClipBatchSampler(kinds, 4, 0, 1, seed=5), 10)
    assert batches != take(ClipBatchSampler(kinds, 4, 0, 1, seed=6), 10)
    assert [batch[0][1:] for batch in batches] == [(epoch, b) for epoch in range(2) for b in range(5)]
    first, second = ({i for batch in batches[e * 5:(e + 1) * 5] for i, _, _ in batch} for e in range(2))
    assert first == second == set(range(20))  # every sample once per epoch
    assert batches[:5] != batches[5:]


def test_sampler_ranks_are_disjoint_and_in_step():
    kinds = [i % 5 == 0 for i in range(103)]  # images mixed among videos
    per_rank = [ClipBatchSampler(kinds, 3, rank, 4, seed=1).epoch_batches(0) for rank in range(4)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches: one shared position
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) > 70
    assert all(len({kinds[i] for i in batch}) == 1 for batches in per_rank for batch in batches)
    assert any(kinds[batch[0]] for batch in per_rank[0]) and not all(kinds[batch[0]] for batch in per_rank[0])
    assert all(len({kinds[batch[0]] for batch in position}) == 1 for position in zip(*per_rank))  # one kind per step


def epoch_plans(kinds, batch_size, world_size, epoch, seed=0):
    return [ClipBatchSampler(kinds, batch_size, rank, world_size, seed=seed).epoch_batches(epoch) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_ranks_draw_the_same_kind_at_every_position(world_size):
    kinds = [i % 4 == 2 for i in range(28)] + [False, False]  # 7 images among 23 videos
    images, videos = kinds.count(True), kinds.count(False)
    for epoch in range(6):
        per_rank = epoch_plans(kinds, 2, world_size, epoch)
        assert len({len(batches) for batches in per_rank}) == 1
        for position in zip(*per_rank):  # one batch per rank
            assert all(len(batch) == 2 for batch in position)
            assert len({kinds[i] for batch in position for i in batch}) == 1, (epoch, position)
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen))  # no sample on two ranks (nor twice on one) within the epoch
        # every full position of each kind is used: only fewer than world_size * 2 samples of a kind are left over
        assert sum(kinds[i] for i in seen) == images // (2 * world_size) * 2 * world_size
        assert sum(not kinds[i] for i in seen) == videos // (2 * world_size) * 2 * world_size


def test_kind_order_is_shuffled_per_epoch_and_spread_over_it():
    kinds = [i % 4 == 2 for i in range(28)] + [False, False]
    orders = {tuple(kinds[batch[0]] for batch in epoch_plans(kinds, 2, 2, epoch)[0]) for epoch in range(8)}
    assert len(orders) > 1  # the mixing changes between epochs
    big = [i % 4 == 0 for i in range(400)]  # 100 images, 300 videos: 25 image and 75 video positions with 2 ranks of 2
    order = [big[batch[0]] for batch in epoch_plans(big, 2, 2, 0)[0]]
    assert len(order) == 100 and sum(order) == 25
    assert all(3 <= sum(order[start:start + 25]) <= 11 for start in range(0, 100, 25))  # interleaved, not in blocks


def test_sampler_resumes_exactly_on_every_rank():
    kinds = [i % 4 == 2 for i in range(28)] + [False, False]
    for rank in range(3):
        full = take(ClipBatchSampler(kinds, 2, rank, 3, seed=4), 14)  # 4 batches per epoch
        for k in (1, 4, 6, 9):
            epoch, batch_index = full[k][0][1:]
            assert take(ClipBatchSampler(kinds, 2, rank, 3, seed=4, start=(epoch, batch_index)), 14 - k) == full[k:]


def test_a_kind_too_small_for_every_rank_is_left_out_with_a_warning(caplog):
    kinds = [True] + [False] * 9
    with caplog.at_level(logging.WARNING, logger="sat_video.data"):
        per_rank = epoch_plans(kinds, 1, 2, 0)
    assert "1 image sample(s) cannot fill a batch of 1 on each of 2 ranks" in caplog.text
    assert all(len(batches) == 4 and not any(kinds[batch[0]] for batch in batches) for batches in per_rank)


def test_sampler_resumes_exactly():
    kinds = [i % 3 == 0 for i in range(25)]
    full = take(ClipBatchSampler(kinds, 2, 1, 2, seed=0), 40)
    for k in (0, 3, 7, 19):
        epoch, batch_index = full[k][0][1:]
        assert take(ClipBatchSampler(kinds, 2, 1, 2, seed=0, start=(epoch, batch_index)), 40 - k) == full[k:]
    last_epoch, last_batch = full[-1][0][1:]
    resumed = take(ClipBatchSampler(kinds, 2, 1, 2, seed=0, start=(last_epoch, last_batch + 1)), 1)[0]
    assert resumed == take(ClipBatchSampler(kinds, 2, 1, 2, seed=0), 41)[40]


def test_tiny_dataset_still_feeds_every_rank():
    kinds = [False, False, True]
    for rank in range(4):
        batches = take(ClipBatchSampler(kinds, 2, rank, 4, seed=0), 6)
        assert all(len(batch) == 2 and len({kinds[i] for i, _, _ in batch}) == 1 for batch in batches)
        assert {batch[0][1] for batch in batches} >= {0, 1}  # batches in every epoch


@pytest.mark.parametrize("saved_ranks, ranks, batch", [(1, 2, 1), (2, 1, 1), (3, 2, 2), (2, 3, 2), (4, 4, 3)])
def test_an_epoch_continued_on_another_number_of_ranks_draws_each_sample_once(saved_ranks, ranks, batch):
    """An elastic resume: the samples the first ranks drew, then the rest dealt to the new ranks (with a smaller last batch
    per kind where at least one sample per rank is left), never a sample twice, and only fewer than ``ranks`` left out."""
    kinds = [False] * 23 + [True] * 9  # videos and images: never mixed in a batch, one kind per position on all ranks
    for done in range(1, 4):  # positions drawn before the resume
        before = [ClipBatchSampler(kinds, batch, r, saved_ranks, seed=5).epoch_batches(3) for r in range(saved_ranks)]
        drawn = [i for plan in before for b in plan[:done] for i in b]
        after = [ClipBatchSampler(kinds, batch, r, ranks, seed=5, start=(3, 0), drawn=drawn) for r in range(ranks)]
        rest = [list(itertools.takewhile(lambda items: items[0][1] == 3, iter(sampler))) for sampler in after]
        assert len({len(plan) for plan in rest}) == 1  # every rank draws at every position
        for position in zip(*rest):
            assert len({kinds[items[0][0]] for items in position}) == 1 and all(items for items in position)
            assert all(all(kinds[i] == kinds[items[0][0]] for i, *_ in items) for items in position)
        again = [i for plan in rest for items in plan for i, *_ in items]
        assert len(again) == len(set(again)) and not set(again) & set(drawn)
        for kind in (False, True):
            left = [i for i, k in enumerate(kinds) if k == kind and i not in drawn and i not in again]
            assert len(left) < ranks, (kind, left)
        # the epoch after is planned as always
        assert next(iter(after[0]))[0][1] == 3 and after[0].epoch_batches(4) == ClipBatchSampler(
            kinds, batch, 0, ranks, seed=5).epoch_batches(4)
