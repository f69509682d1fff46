"""Shared test set-up: a clean Dynamo per test.

``examples/`` and ``tests/support/`` (model zoo, hand-written oracle) are on
sys.path through pytest's ``pythonpath`` setting in pyproject.toml.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # README's test command runs two workers on a 2-core machine: one thread each, not two.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts leak across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
