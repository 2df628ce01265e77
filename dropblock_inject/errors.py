"""The exceptions of dropblock_inject: one root, each also a builtin so plain ``except`` works."""

from __future__ import annotations

__all__ = ["DropBlockInjectError", "NoSitesError", "RecipeError", "TraceError", "VerificationError"]


class DropBlockInjectError(Exception):
    """Root of every error raised by dropblock_inject."""


class NoSitesError(DropBlockInjectError, ValueError):
    """The rules select no site in the model (the message says what was found instead)."""


class TraceError(DropBlockInjectError, RuntimeError):
    """A module could not be traced or analysed (the message names it and what to pass)."""


class VerificationError(DropBlockInjectError, RuntimeError):
    """A rewrite changed something it must not (the model was restored before raising)."""


class RecipeError(DropBlockInjectError, ValueError):
    """A recipe file or rule is malformed (the message names the file, the key and what is allowed)."""
