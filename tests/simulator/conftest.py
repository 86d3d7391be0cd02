"""The profile the simulator tests run on: the H200 steps of a Llama-2-7B shape, and the cost
model fitted on them."""

from __future__ import annotations

import pytest

from controller.cost_model import CostModelFitter
from controller.profile import load_profile

PROFILE = "profiles/h200_transformers_eager.json#llama-7b"


@pytest.fixture(scope="session")
def profile():
    return load_profile(PROFILE)


@pytest.fixture(scope="session")
def cost(profile):
    return CostModelFitter().seed(profile)
