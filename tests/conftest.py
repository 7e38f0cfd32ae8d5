"""Shared test set-up: a fixed-seed hypothesis profile and float64 torch."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized so CI is reproducible; `HYPOTHESIS_PROFILE=dev` explores new examples locally.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_default_dtype(torch.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU spinning threads made
    tests 5-10x slower; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
