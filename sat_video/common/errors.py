"""One error family for the whole project.

Every problem a user can fix (a config key, a data file, a checkpoint, an output folder that exists) raises a
:class:`SatVideoError` subclass with a message that names the file or key, what was expected and what was found.
The tools print such errors as ``tool: error: <message>`` and exit 2; :class:`RunStopped` exits 1; anything else
is a bug and keeps its traceback (:func:`sat_video.config.cli.run_tool`).

Subclasses also derive from the built-in exception a caller would naturally catch (``ValueError``,
``FileExistsError``, ...), so code written against those keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class SatVideoError(Exception):
    """Base of every error the user can fix; its message is the whole explanation (no traceback needed)."""


class ConfigError(SatVideoError, ValueError):
    """A configuration file, override or config value is invalid."""


class UnknownMixinError(ConfigError):
    """A config names a mixin or frozen-stage type that is not registered, or a module that cannot be imported."""


class GridError(ConfigError):
    """An ablation grid file is invalid (names the file, the variant and the key)."""


class HookConflictError(SatVideoError, ValueError):
    """Two mixins (or two frozen stages) both provide the same exclusive hook."""


class MissingHookError(SatVideoError, RuntimeError):
    """A required hook has no provider."""


class DataError(SatVideoError, ValueError):
    """The data sources cannot be used: missing, malformed, or without a single usable sample."""


class CacheError(DataError):
    """A latent cache is missing, unreadable, incomplete, or was made with other settings."""


class UnusableSample(SatVideoError):
    """One file cannot be used (unreadable, too short, no caption); the dataset skips it and goes on."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(str(path), reason)  # both in ``args`` so the exception pickles across worker processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CheckpointError(SatVideoError, ValueError):
    """A checkpoint cannot be found, read, or does not fit the model."""


class ConversionError(SatVideoError, ValueError):
    """A model or checkpoint has no equivalent in the other format (diffusers <-> SAT)."""


class OutputExistsError(SatVideoError, FileExistsError):
    """Writing would replace something the user already has; nothing was written."""


class UsageError(SatVideoError, ValueError):
    """Arguments that do not fit together or cannot be read (an image-to-video model without ``--image``, ...)."""


class BuildLockError(SatVideoError, RuntimeError):
    """A native-op build lock that may be stale and cannot be checked (names the file and what to do)."""


class FolderInUseError(SatVideoError, RuntimeError):
    """Another live job holds the lock of the folder a job would write (names the folder, the holder and what to do)."""


class RunStopped(SatVideoError, RuntimeError):
    """A run cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    match = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""
