"""Absurd or lying video headers are refused from the header, before anything is decoded."""

import numpy as np
import pytest
from PIL import Image

from sat_video.common.errors import UnusableSample
from sat_video.data.clips import ClipSpec, load_clip, load_image
from sat_video.data.sources import SampleRef
from sat_video.data.video_io import write_mp4
from sat_video.data.video_probe import (
    DeclaredVideo,
    check_consistent,
    check_declared,
    check_decoded_size,
    parse_ffmpeg_info,
    probe_video,
)
from tests.conftest import write_hostile_videos

REPORT = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'clip.mp4':
  Duration: {duration}, start: 0.000000, bitrate: 1058 kb/s
  Stream #0:0[0x1](und): Video: mjpeg (Baseline), yuvj420p(pc), 300x300 [SAR 1:1 DAR 1:1], 90k tbr, 90k tbn (attached pic)
  Stream #0:1[0x2](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 1920x1080 \
[SAR 1:1 DAR 16:9], 1053 kb/s, {rate}, 16384 tbn (default)
{details}  Stream #0:2[0x3](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, stereo, fltp, 128 kb/s (default)
At least one output file must be specified
"""


@pytest.mark.parametrize("duration, rate, expected", [
    ("00:01:02.50", "29.97 fps, 29.97 tbr", DeclaredVideo(1920, 1080, 29.97, 62.5)),
    ("N/A", "1k fps, 1k tbr", DeclaredVideo(1920, 1080, 1000.0, None)),
    ("-00:00:01.00", "25 tbr", DeclaredVideo(1920, 1080, 25.0, -1.0)),
])
def test_ffmpeg_report_gives_the_video_stream_header_not_the_cover_art(duration, rate, expected):
    assert parse_ffmpeg_info(REPORT.format(duration=duration, rate=rate, details="")) == expected
    assert parse_ffmpeg_info("Input #0, wav, from 'a.wav':\n  Stream #0:0: Audio: pcm_s16le, 44100 Hz\n") is None


@pytest.mark.parametrize("details, rotation", [
    ("    Side data:\n      Display Matrix: rotation of 90.00 degrees\n", 90.0),  # what phones write, as ffmpeg 9 reports it
    # older ffmpeg versions report the matrix and a clockwise rotate tag
    ("    Metadata:\n      rotate          : 90\n    Side data:\n      displaymatrix: rotation of -90.00 degrees\n", -90.0),
    ("    Metadata:\n      ROTATE          : 270\n", -270.0),  # the tag alone (a Matroska tag)
    ("    Side data:\n      Display Matrix: rotation of -180.00 degrees\n", -180.0),
    ("", 0.0),
])
def test_the_declared_size_is_the_size_as_displayed(details, rotation):
    declared = parse_ffmpeg_info(REPORT.format(duration="00:01:02.50", rate="29.97 fps, 29.97 tbr", details=details))
    sideways = rotation % 180 != 0
    assert declared == DeclaredVideo(1080 if sideways else 1920, 1920 if sideways else 1080, 29.97, 62.5, rotation)
    assert declared.coded_size == (1920, 1080)
    # the cover art's rotation is not the video's
    cover_turned = REPORT.replace("(attached pic)\n", "(attached pic)\n" + details)
    assert parse_ffmpeg_info(cover_turned.format(duration="N/A", rate="25 tbr", details="")).rotation == 0


def test_bounds_of_a_header():
    ok = DeclaredVideo(1920, 1080, 30.0, 10.0)
    check_declared("a.mp4", ok, max_pixels=1920 * 1080)
    for declared, words in [
        (DeclaredVideo(1921, 1080, 30.0, 10.0), "1921x1080 (2,074,680 pixels) exceeds data.max_source_pixels=2,073,600"),
        (DeclaredVideo(1080, 1921, 30.0, 10.0, 90.0), "1080x1921 (2,074,680 pixels) exceeds"),  # named as displayed
        (DeclaredVideo(64, 64, 30.0, 10.0, 45.0), "declared rotation of 45 degrees is not a quarter turn"),
        (DeclaredVideo(64, 64, 0.5, 10.0), "frame rate 0.5 fps is outside [1, 1000]"),
        (DeclaredVideo(64, 64, 30.0, 0.0), "declared duration 0 s is not positive"),
        (DeclaredVideo(64, 64, 1000.0, 86400.0), "declares 86,400,000 frames"),
    ]:
        with pytest.raises(UnusableSample, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            check_declared("a.mp4", declared, max_pixels=1920 * 1080)
    check_consistent("a.mp4", ok, frames=300, fps=30.0)
    check_consistent("a.mp4", DeclaredVideo(64, 64, 30.0, 70.0), frames=300, fps=30.0)  # audio running on: within slack
    with pytest.raises(UnusableSample, match="declares 10,800.0 s but the stream holds 300 frames at 30 fps"):
        check_consistent("a.mp4", DeclaredVideo(64, 64, 30.0, 10800.0), frames=300, fps=30.0)
    with pytest.raises(UnusableSample, match="holds no frames"):
        check_consistent("a.mp4", ok, frames=0, fps=30.0)
    check_declared("a.mp4", DeclaredVideo(1080, 1920, 30.0, 10.0, -91.0), max_pixels=1920 * 1080)  # within 2 degrees
    portrait = DeclaredVideo(1080, 1920, 30.0, 10.0, 90.0)
    check_decoded_size("a.mp4", portrait, width=1080, height=1920)
    with pytest.raises(UnusableSample, match=r"decoded frames are 1920x1080 but the header displays 1080x1920 \(1920x1080 turned "
                                             r"by 90 degrees: a rotation the decoder ignored\?\); refused rather than cropped"):
        check_decoded_size("a.mp4", portrait, width=1920, height=1080)
    with pytest.raises(UnusableSample, match=r"decoded frames are 1920x1088 but the header displays 1920x1080 \(a header that"):
        check_decoded_size("a.mp4", ok, width=1920, height=1088)


def test_hostile_files_are_refused_by_load_clip_and_good_ones_still_load(tmp_path):
    reasons = write_hostile_videos(tmp_path, huge_size=(128, 192))
    frames = np.random.default_rng(1).integers(0, 255, (16, 48, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "good.mp4", frames, fps=8)
    spec = ClipSpec(num_frames=9, height=32, width=32, fps=8, max_source_pixels=64 * 64)
    for name, words in reasons.items():
        with pytest.raises(UnusableSample, match=words):
            load_clip(SampleRef(tmp_path / name, "a caption"), spec)
    assert probe_video(tmp_path / "good.mp4") == DeclaredVideo(64, 48, 8.0, 2.0)
    clip, _ = load_clip(SampleRef(tmp_path / "good.mp4", "a caption"), spec)
    assert clip.shape == (3, 9, 32, 32)

    Image.new("RGB", (80, 60)).save(tmp_path / "big.png")
    with pytest.raises(UnusableSample, match="declared image size 80x60 .4,800 pixels. exceeds data.max_source_pixels=4,096"):
        load_clip(SampleRef(tmp_path / "big.png", "a caption", is_image=True), spec)
    with pytest.raises(UnusableSample, match="80x60"):
        load_image(tmp_path / "big.png", 32, 32, max_pixels=4096)


def test_a_header_that_cannot_be_read_in_time_is_skipped_not_waited_for(tmp_path, monkeypatch):
    import sat_video.data.video_probe as video_probe

    stuck = tmp_path / "ffmpeg_on_stuck_storage"
    stuck.write_text("#!/bin/sh\nsleep 60\n")  # reading the file never returns, as on a hung network mount
    stuck.chmod(0o755)
    monkeypatch.setattr(video_probe.imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(stuck))
    monkeypatch.setattr(video_probe, "PROBE_TIMEOUT_S", 1.0)
    write_mp4(tmp_path / "clip.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=8)
    with pytest.raises(UnusableSample, match=r"clip.mp4: its header could not be read within 1 s \(a file on stuck storage\?\)"):
        probe_video(tmp_path / "clip.mp4")
