"""Where training samples come from: SAT SFT folders and ``.jsonl`` / ``.csv`` metadata files."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sat_video.common.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SampleRef:
    """One discovered sample; nothing is read until :func:`load_clip`.

    Args:
        path: the video or image file.
        caption: the caption given by a metadata file; ``None`` when it is read from ``caption_file``.
        caption_file: SFT layout's ``labels/<name>.txt`` (first line), possibly missing.
        is_image: a one-frame image sample rather than a video.
    """

    path: Path
    caption: str | None = None
    caption_file: Path | None = None
    is_image: bool = False


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _discover_folder(root: Path) -> list[SampleRef]:
    """SAT's SFT layout, searched recursively as SAT does: ``videos/a/b.mp4`` is captioned by ``labels/a/b.txt``."""
    videos = root / "videos"
    if not videos.is_dir():
        raise DataError(
            f"{root}: expected SAT's SFT layout (videos/<name>.mp4 + labels/<name>.txt), but it has no videos/ folder"
        )
    refs = []
    for path in sorted(videos.rglob("*")):
        # Hidden names are temporaries (write_mp4 writes ".<name>.*.mp4" first) or macOS "._" metadata.
        # A link whose target is gone (storage not mounted) is kept, so that loading names it like any unusable file.
        if path.name.startswith(".") or path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            continue
        if not (path.is_file() or (path.is_symlink() and not path.exists())):
            continue
        label = (root / "labels" / path.relative_to(videos)).with_suffix(".txt")
        refs.append(SampleRef(path, None, label, _is_image(path)))
    return refs


def _metadata_ref(entry: object, metadata: Path, where: str) -> SampleRef:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'path' and 'caption', found {type(entry).__name__}")
    path, caption = entry.get("path"), entry.get("caption")
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: 'path' must be a non-empty string, found {path!r}")
    if not isinstance(caption, str):
        raise DataError(f"{where}: 'caption' must be a string, found {caption!r}")
    file = metadata.parent / path.strip()
    return SampleRef(file, caption, None, _is_image(file))


def _discover_jsonl(metadata: Path) -> list[SampleRef]:
    refs = []
    for number, line in enumerate(_read_text(metadata).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{metadata}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        refs.append(_metadata_ref(entry, metadata, f"{metadata}:{number}"))
    return refs


def _discover_csv(metadata: Path) -> list[SampleRef]:
    reader = csv.DictReader(_read_text(metadata).splitlines())
    if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
        raise DataError(f"{metadata}: the header must name the columns 'path' and 'caption', found {reader.fieldnames}")
    return [_metadata_ref(row, metadata, f"{metadata}:{reader.line_num}") for row in reader]


def _read_text(metadata: Path) -> str:
    try:
        return metadata.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{metadata}: cannot be read as UTF-8 text ({err})") from None


def discover(sources: Sequence[str | Path]) -> list[SampleRef]:
    """List the samples of every source, sorted by path.

    Args:
        sources: folders in SAT's SFT layout (``videos/**/<name>.mp4`` or ``.png`` / ``.jpg``, captioned by
            the first line of ``labels/**/<name>.txt``), ``.jsonl`` files (lines ``{"path": ..., "caption": ...}``)
            or ``.csv`` files (columns ``path,caption``); metadata paths are relative to the metadata file.
    Raises:
        DataError: a source is missing or of an unknown kind, a metadata line is malformed (``file:line``), or
            the sources hold no sample at all. A missing file or caption is not checked here:
            :func:`load_clip` reports it and the dataset skips the sample.
    """
    if not sources:
        raise DataError("no data sources given (data.sources is empty)")
    refs = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            refs += _discover_folder(source)
        elif not source.exists():
            raise DataError(f"data source not found: {source}")
        elif source.suffix.lower() == ".jsonl":
            refs += _discover_jsonl(source)
        elif source.suffix.lower() == ".csv":
            refs += _discover_csv(source)
        else:
            raise DataError(
                f"{source}: unknown kind of data source; expected a folder in SAT's SFT layout, a .jsonl or a .csv file"
            )
    if not refs:
        raise DataError(f"no videos or images found in {', '.join(map(str, sources))}")
    return sorted(refs, key=lambda ref: ref.path.as_posix())
