"""Reading WebDataset tar shards: brace patterns, local files and ``pipe:`` commands, sample by sample, within a time limit.

A shard is a tar whose members are grouped by key, ``<key>.mp4`` (or ``.png`` / ``.jpg``) beside ``<key>.json``
(:mod:`sat_video.data.shard_writer`). ``pipe:<command>`` reads the shard from the command's stdout, as WebDataset spells
a read from object storage (``pipe:aws s3 cp s3://bucket/000123.tar -``). The tar format is webdataset's
(``tar_file_iterator``, ``group_by_keys``); what a fault does is ours: a read that gives no bytes for ``timeout_s`` (a
stuck command or storage), a command that fails, or a tar cut short raises :class:`ShardReadError` naming the shard, so
the stream can end that shard with a warning and go on.
"""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from sat_video.common.errors import ConfigError

PIPE = "pipe:"
INDEX = "index.json"
_SHARD_NAME = re.compile(r"[^/\s'\"]+\.tar\b")
_URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class ShardReadError(Exception):
    """A shard could not be read to its end: ``reason`` says why (time-out, command status, tar error)."""

    def __init__(self, url: str, reason: str):
        super().__init__(url, reason)
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Every shard of ``data.shards``, in order: each pattern's brace expansion (``{000..009}``, ``{a,b}``).

    Raises:
        ConfigError: a URL scheme other than a local path or ``pipe:`` (say how to stream it instead), a pattern that
            names no ``.tar`` file, or a shard listed twice.
    """
    shards: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if _URL_SCHEME.match(pattern):
            raise ConfigError(f"data.shards: {pattern!r}: only local paths and pipe: commands are read; stream object "
                              f"storage through a command, e.g. 'pipe:aws s3 cp s3://bucket/shards/000000.tar -'")
        for url in braceexpand(pattern):
            if shard_name(url) is None:
                raise ConfigError(f"data.shards: {url!r} names no .tar file")
            if url in seen:
                raise ConfigError(f"data.shards: {url!r} is listed twice")
            seen.add(url)
            shards.append(url)
    return shards


def shard_name(url: str) -> str | None:
    """The shard's file name (``000123.tar``): a local path's name, or the last ``.tar`` name in a ``pipe:`` command."""
    if not url.startswith(PIPE):
        return os.path.basename(url) if url.endswith(".tar") else None  # os.path: 10k shards are read at start
    names = _SHARD_NAME.findall(url)
    return names[-1] if names else None


def index_url(url: str) -> str:
    """Where the ``index.json`` of the shard at ``url`` is: beside it (the same command, naming it instead)."""
    if not url.startswith(PIPE):
        return os.path.join(os.path.dirname(url), INDEX)
    name = shard_name(url)
    head, _, tail = url.rpartition(name)
    return f"{head}{INDEX}{tail}"


class _TimedPipe(io.RawIOBase):
    """A command's stdout; a read that waits ``timeout_s`` without a byte kills the command and raises."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        self._process = subprocess.Popen(url[len(PIPE):], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self._stderr)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self._process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout_s)
        if not ready:
            self._process.kill()  # not waited for: a command stuck on dead storage may not die until it returns
            raise ShardReadError(self.url, f"no data for {self.timeout_s:g} s (data.shard_timeout_s); the command was "
                                           f"killed")
        data = os.read(fd, len(buffer))
        buffer[:len(data)] = data
        if not data:
            self._check_status()
        return len(data)

    def _check_status(self) -> None:
        try:
            status = self._process.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise ShardReadError(self.url, f"the command closed its output but did not exit within {self.timeout_s:g} s"
                                 ) from None
        if status:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            raise ShardReadError(self.url, f"the command exited with status {status}"
                                           + (f": {lines[-1][:200]}" if lines else ""))

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:
                self._process.kill()
            self._process.stdout.close()
            self._stderr.close()
        super().close()


def open_shard(url: str, timeout_s: float):
    """A binary file object reading ``url`` (a local path or ``pipe:<command>``).

    Raises:
        ShardReadError: a local file that cannot be opened.
    """
    if url.startswith(PIPE):
        return io.BufferedReader(_TimedPipe(url, timeout_s), buffer_size=1 << 20)
    try:
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise ShardReadError(url, f"cannot be opened ({err.strerror or err})") from None


def read_all(url: str, timeout_s: float) -> bytes:
    """The whole content at ``url`` (an ``index.json``)."""
    with open_shard(url, timeout_s) as handle:
        return handle.read()


def read_samples(url: str, timeout_s: float) -> Iterator[dict]:
    """The samples of the shard at ``url`` in tar order: ``{"__key__": key, "<ext>": bytes, ...}``.

    Raises:
        ShardReadError: the shard cannot be opened or read to its end (cut short, corrupt, timed out, command failed);
            the samples before the fault have been yielded.
    """
    handle = open_shard(url, timeout_s)
    try:
        members = ({**member, "__url__": url} for member in tar_file_iterator(handle))  # group_by_keys wants the URL
        for sample in group_by_keys(members):
            del sample["__url__"]
            yield sample
    except ShardReadError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        reason = str(err.args[0] if err.args else err).split(" @ ")[0]  # webdataset appends " @ <file object>"
        raise ShardReadError(url, f"truncated or corrupt tar ({type(err).__name__}: {reason[:200]})") from None
    finally:
        handle.close()
