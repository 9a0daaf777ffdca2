"""Errors of model folders, importable without torch or transformers (the CLI catches them)."""

from __future__ import annotations


class ModelError(ValueError):
    """A model folder that cannot be loaded (damaged or unsupported files); the message names the
    folder, the file and what is wrong. The CLI prints it and exits with status 2."""
