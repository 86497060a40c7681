"""Errors raised when a checkpoint cannot be read or does not fit the model it is loaded into."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its contents do not match what was asked for."""


class VariantNotFoundError(FileNotFoundError, ValueError):
    """No weights of the requested ``variant``: a ``ValueError`` as in diffusers' pipelines, and a
    ``FileNotFoundError`` as for any other missing file."""
