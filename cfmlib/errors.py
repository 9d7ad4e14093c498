"""The exceptions that cfmlib raises beyond Python's own.

Bad arguments raise :class:`TypeError` or :class:`ValueError` with a message that names the
argument, what was expected and what was received (see ``cfmlib/_checks.py``).  The classes
below are for conditions that are not a wrong argument in a single call.
"""
from __future__ import annotations

__all__ = ["NonFiniteLossError", "CheckpointError"]


class NonFiniteLossError(FloatingPointError):
    """A training loss (flow matching, maximum likelihood, a discrete flow) became NaN or infinite.

    Raised by every training loop of cfmlib, with the step and the likely causes in the message
    (the training loop of chapter 7).
    """


class CheckpointError(ValueError):
    """A checkpoint file cannot be written or used: the path is a folder, the file is not a cfmlib
    checkpoint, or it was written for another model. The message names the file and the cause
    (checkpoints: chapter 7)."""
