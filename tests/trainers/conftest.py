"""Fixtures for trainer tests: a tiny synthetic dataset and a helper to build trainer configs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def color_data(tmp_path_factory) -> Path:
    """The demo's colour task, small: train.parquet (64 rows) and test.parquet (16 rows)."""
    from lensrl.data.synth import make_synth

    out = tmp_path_factory.mktemp("color_data")
    make_synth("color", 64, 0, out, n_test=16)
    return out


@pytest.fixture(scope="session")
def choice_data(tmp_path_factory) -> Path:
    """The shape task in the Robo2VLM multiple-choice layout."""
    from lensrl.data.synth import make_synth

    out = tmp_path_factory.mktemp("choice_data")
    make_synth("shape", 48, 0, out, n_test=8, fmt="choice")
    return out
