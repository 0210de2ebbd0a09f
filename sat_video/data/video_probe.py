"""What a video file declares about itself, read before anything is decoded, and the bounds a file must keep.

Scraped data sets hold files whose headers declare absurd things: frames of 8192 x 8192 pixels, a frame rate of
one frame per half hour, a duration of hours over a few frames. Decoding such a file trusts the header, and
clips of 49 frames at the declared size can take tens of gigabytes. So the header is read first, by the
``ffmpeg`` that imageio-ffmpeg ships, in a separate process with a time limit: whatever that process allocates
or waits for (a file on stuck storage) never reaches the training process. A file outside the bounds is skipped
and named, like any unusable file.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

from sat_video.common.errors import UnusableSample

PROBE_TIMEOUT_S = 30.0
"""A header that cannot be read in this time (a file on stuck storage, a pathological container) is skipped."""
MIN_SOURCE_FPS = 1.0
MAX_SOURCE_FPS = 1000.0
"""Frame rates outside these are broken headers (or time-lapses too sparse to cut a clip from)."""
MAX_SOURCE_FRAMES = 2_000_000
"""More declared frames than this (over 18 hours at 30 fps) is an absurd header."""
DURATION_SLACK_S = 60.0
"""How far the declared duration may differ from frames / fps (an audio track may run on past the video)."""

_DURATION = re.compile(r"Duration: (-?)(\d+):(\d+):(\d+(?:\.\d+)?)")
_SIZE = re.compile(r", (\d+)x(\d+)[, \[]")
_FPS = re.compile(r", (\d+(?:\.\d+)?)(k?) (fps|tbr)")


@dataclass(frozen=True)
class DeclaredVideo:
    """A video stream's header. ``duration_s`` and ``fps`` are ``None`` when the file does not declare them."""

    width: int
    height: int
    fps: float | None
    duration_s: float | None


def parse_ffmpeg_info(text: str) -> DeclaredVideo | None:
    """The first video stream (cover art aside) of ``ffmpeg -i``'s report; ``None`` if it lists none."""
    streams = [line for line in text.splitlines()
               if line.lstrip().startswith("Stream #") and " Video: " in line and "(attached pic)" not in line]
    if not streams:
        return None
    size = _SIZE.search(streams[0])
    if size is None:
        return None
    rates = {kind: float(value) * (1000 if k else 1) for value, k, kind in _FPS.findall(streams[0])}
    duration = _DURATION.search(text)
    seconds = None
    if duration is not None:
        sign, hours, minutes, secs = duration.groups()
        seconds = (-1 if sign else 1) * (int(hours) * 3600 + int(minutes) * 60 + float(secs))
    return DeclaredVideo(int(size.group(1)), int(size.group(2)), rates.get("fps", rates.get("tbr")), seconds)


@functools.lru_cache(maxsize=65536)
def _probe(path: str, size: int, mtime_ns: int) -> DeclaredVideo | str:
    """The header of ``path``, or why it cannot be read (cached per file version: each is read once per process)."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        _, report = process.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()  # not waited for: a process blocked on dead storage may not die until the storage returns
        return f"its header could not be read within {PROBE_TIMEOUT_S:g} s (a file on stuck storage?)"
    declared = parse_ffmpeg_info(report)
    if declared is None:
        last = [line.strip() for line in report.splitlines() if line.strip()]
        return f"not a readable video (ffmpeg: {(last[-1] if last else 'no video stream')[:160]})"
    return declared


def probe_video(path: Path) -> DeclaredVideo:
    """Read ``path``'s header without decoding it in this process.

    Raises:
        UnusableSample: unreadable, no video stream, or no answer within :data:`PROBE_TIMEOUT_S`.
    """
    stat = path.stat()
    result = _probe(str(path), stat.st_size, stat.st_mtime_ns)
    if isinstance(result, str):
        raise UnusableSample(path, result.replace(str(path), path.name))
    return result


def check_declared(path: Path, declared: DeclaredVideo, max_pixels: int) -> None:
    """Refuse a header no training clip should be decoded from.

    Raises:
        UnusableSample: frames larger than ``max_pixels``, a frame rate outside [:data:`MIN_SOURCE_FPS`,
            :data:`MAX_SOURCE_FPS`], a zero or negative duration, more than :data:`MAX_SOURCE_FRAMES` frames.
    """
    pixels = declared.width * declared.height
    if pixels > max_pixels:
        raise UnusableSample(path, f"declared frame size {declared.width}x{declared.height} ({pixels:,} pixels) exceeds "
                                   f"data.max_source_pixels={max_pixels:,}; skipped before decoding")
    if declared.fps is not None and not MIN_SOURCE_FPS <= declared.fps <= MAX_SOURCE_FPS:
        raise UnusableSample(path, f"declared frame rate {declared.fps:g} fps is outside "
                                   f"[{MIN_SOURCE_FPS:g}, {MAX_SOURCE_FPS:g}]")
    if declared.duration_s is not None:
        if declared.duration_s <= 0:
            raise UnusableSample(path, f"declared duration {declared.duration_s:g} s is not positive")
        if declared.fps is not None and declared.duration_s * declared.fps > MAX_SOURCE_FRAMES:
            raise UnusableSample(path, f"declares {declared.duration_s * declared.fps:,.0f} frames "
                                       f"({declared.duration_s:,.0f} s at {declared.fps:g} fps), over {MAX_SOURCE_FRAMES:,}")


def check_consistent(path: Path, declared: DeclaredVideo, frames: int, fps: float) -> None:
    """Refuse a file whose header and stream disagree: ``frames`` and ``fps`` are what decord indexed.

    Raises:
        UnusableSample: no frames, or a declared duration that differs from ``frames / fps`` by more than
            :data:`DURATION_SLACK_S` and by more than half (hours declared over a few frames, or the reverse).
    """
    if frames < 1:
        raise UnusableSample(path, "the video stream holds no frames")
    if declared.duration_s is None or not fps > 0:
        return
    indexed = frames / fps
    if abs(declared.duration_s - indexed) > max(DURATION_SLACK_S, 0.5 * indexed):
        raise UnusableSample(path, f"inconsistent stream: the header declares {declared.duration_s:,.1f} s but the "
                                   f"stream holds {frames} frames at {fps:g} fps ({indexed:,.1f} s)")
