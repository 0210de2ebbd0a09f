"""What a video file declares about itself, read before anything is decoded, and the bounds a file must keep.

Scraped data sets hold files whose headers declare absurd things: frames of 8192 x 8192 pixels, a frame rate of
one frame per half hour, a duration of hours over a few frames. Decoding such a file trusts the header, and
clips of 49 frames at the declared size can take tens of gigabytes. So the header is read first, by the
``ffmpeg`` that imageio-ffmpeg ships, in a separate process with a time limit: whatever that process allocates
or waits for (a file on stuck storage) never reaches the training process. A file outside the bounds is skipped
and named, like any unusable file.

Sizes are as displayed: phones store portrait video as landscape frames with a rotation in the header, which
decoding applies, so the declared size is the coded one turned by that rotation, and the decoded frames must match it.
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
ROTATION_SLACK_DEG = 2.0
"""A declared rotation this close to a quarter turn is that turn (ffmpeg's own slack); decord turns frames only by quarter
turns, so a file rotated farther from one is refused."""

_DURATION = re.compile(r"Duration: (-?)(\d+):(\d+):(\d+(?:\.\d+)?)")
_SIZE = re.compile(r", (\d+)x(\d+)[, \[]")
_FPS = re.compile(r", (\d+(?:\.\d+)?)(k?) (fps|tbr)")
# The stream's display matrix side data ("displaymatrix: rotation of -90.00 degrees" in older ffmpeg versions, "Display
# Matrix: ..." in newer ones), and the ``rotate`` metadata tag that older versions report as well and some files carry alone.
_DISPLAY_MATRIX = re.compile(r"display ?matrix: rotation of (-?\d+(?:\.\d+)?) degrees", re.IGNORECASE)
_ROTATE_TAG = re.compile(r"^\s*rotate\s*: (-?\d+(?:\.\d+)?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class DeclaredVideo:
    """A video stream's header. ``width`` x ``height`` is the frame size as displayed: the coded size turned by
    ``rotation`` (degrees, counter-clockwise). ``duration_s`` and ``fps`` are ``None`` when the file does not declare them."""

    width: int
    height: int
    fps: float | None
    duration_s: float | None
    rotation: float = 0.0

    @property
    def coded_size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames as stored, before the rotation."""
        return (self.height, self.width) if _turns_sideways(self.rotation) else (self.width, self.height)


def _turns_sideways(rotation: float) -> bool:
    """Whether ``rotation`` degrees is an odd number of quarter turns: width and height trade places."""
    return round(rotation / 90) % 2 == 1


def parse_ffmpeg_info(text: str) -> DeclaredVideo | None:
    """The first video stream (cover art aside) of ``ffmpeg -i``'s report; ``None`` if it lists none."""
    lines = text.splitlines()
    streams = [i for i, line in enumerate(lines)
               if line.lstrip().startswith("Stream #") and " Video: " in line and "(attached pic)" not in line]
    if not streams:
        return None
    stream = lines[streams[0]]
    size = _SIZE.search(stream)
    if size is None:
        return None
    rates = {kind: float(value) * (1000 if k else 1) for value, k, kind in _FPS.findall(stream)}
    duration = _DURATION.search(text)
    seconds = None
    if duration is not None:
        sign, hours, minutes, secs = duration.groups()
        seconds = (-1 if sign else 1) * (int(hours) * 3600 + int(minutes) * 60 + float(secs))
    # The stream's metadata and side data: the lines below it indented deeper than it.
    depth = len(stream) - len(stream.lstrip())
    below = []
    for line in lines[streams[0] + 1:]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        below.append(line)
    details = "\n".join(below)
    matrix, tag = _DISPLAY_MATRIX.search(details), _ROTATE_TAG.search(details)
    # the matrix is what decoders apply; the tag turns clockwise
    degrees = float(matrix.group(1)) if matrix else -float(tag.group(1)) if tag else 0.0
    width, height = int(size.group(1)), int(size.group(2))
    if _turns_sideways(degrees):
        width, height = height, width
    return DeclaredVideo(width, height, rates.get("fps", rates.get("tbr")), seconds, degrees)


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
        UnusableSample: frames larger than ``max_pixels``, a rotation that is not a quarter turn (within
            :data:`ROTATION_SLACK_DEG`), a frame rate outside [:data:`MIN_SOURCE_FPS`, :data:`MAX_SOURCE_FPS`], a zero or
            negative duration, more than :data:`MAX_SOURCE_FRAMES` frames.
    """
    pixels = declared.width * declared.height
    if pixels > max_pixels:
        raise UnusableSample(path, f"declared frame size {declared.width}x{declared.height} ({pixels:,} pixels) exceeds "
                                   f"data.max_source_pixels={max_pixels:,}; skipped before decoding")
    if abs(declared.rotation - 90 * round(declared.rotation / 90)) > ROTATION_SLACK_DEG:
        raise UnusableSample(path, f"declared rotation of {declared.rotation:g} degrees is not a quarter turn: "
                                   "its frames cannot be decoded as they are displayed")
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


def check_decoded_size(path: Path, declared: DeclaredVideo, width: int, height: int) -> None:
    """Refuse a file whose decoded frames (``width`` x ``height``) are not the size its header displays: a rotation the
    decoder ignored, or a header that lies. Its bucket was chosen from the header; cutting these frames to it would crop
    them silently.

    Raises:
        UnusableSample: the sizes differ; the reason names both.
    """
    if (width, height) == (declared.width, declared.height):
        return
    if declared.rotation:
        coded_width, coded_height = declared.coded_size
        why = f"{coded_width}x{coded_height} turned by {declared.rotation:g} degrees: a rotation the decoder ignored?"
    else:
        why = "a header that lies?"
    raise UnusableSample(path, f"decoded frames are {width}x{height} but the header displays {declared.width}x{declared.height} "
                               f"({why}); refused rather than cropped to a bucket chosen for the wrong size")
