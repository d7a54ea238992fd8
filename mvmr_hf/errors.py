"""The exception types: bad user input, and a run that could not finish.

Every check of something a user passed (a name, a path, a shape, a spec) raises
:class:`ConfigError` with one sentence that says what was wrong and how to fix it.
It subclasses :class:`ValueError`, so library callers can catch either; the command
line catches it, prints the sentence without a traceback and exits with status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong and how to fix it."""


class TrainingError(RuntimeError):
    """A run that started but could not finish (a non-finite loss, no data); the message says why."""


PREEMPTED_EXIT = 75
"""Exit status of a preempted run (``EX_TEMPFAIL`` of sysexits.h: a temporary failure, try again): it
saved a complete checkpoint and continues with ``--resume``."""


class PreemptedError(TrainingError):
    """A run stopped by a signal after saving a complete checkpoint: continue it with ``--resume``."""
