"""Fixtures shared by several test modules: real tiny data and a tiny teacher, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from mvmr_hf.sample_data import write_digits
from mvmr_hf.tiny_models import save_tiny_teacher


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits at 32 px as a local parquet data set (train/test splits)."""
    return write_digits(tmp_path_factory.mktemp("data") / "digits", image_size=32)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer CLIP (vision + text towers) saved with its processor."""
    return save_tiny_teacher("clip", tmp_path_factory.mktemp("teacher") / "clip", image_size=32)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them after each in-process training run."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-image work and tiny models run faster on one thread (DataLoader workers use one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
