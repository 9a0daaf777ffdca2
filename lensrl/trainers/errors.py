"""Errors a training run ends with (light to import: the CLI catches them to print one line)."""


class BadStepsError(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients; the message names the last
    good checkpoint."""
