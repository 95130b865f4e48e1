"""The few exception classes qrobust raises on purpose.

Every message says what was wrong and what to do about it. All derive from :class:`QrobustError`,
so ``except qrobust.QrobustError`` catches anything qrobust raised deliberately.
"""

from __future__ import annotations


class QrobustError(Exception):
    """Base class of every deliberate qrobust error."""


class ConfigError(QrobustError, ValueError):
    """A setting is invalid: an unknown name, an out-of-range ε, bits outside 1–8/32, steps ≤ 0 …"""


class InputError(QrobustError, ValueError):
    """A tensor handed to qrobust is unusable: wrong shape, NaN, pixels outside [0, 1], bad labels …"""


class DataError(QrobustError):
    """A dataset is missing, incomplete or corrupt; the message names the files expected and where."""


class CheckpointError(QrobustError):
    """A checkpoint is missing, truncated, corrupt or does not match the model it describes."""


class ExportError(QrobustError):
    """A model cannot be exported as asked (an op or scheme without an integer form), or the export does not
    compute the function it was exported from (its agreement fell below the threshold)."""
