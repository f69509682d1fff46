"""Shared test set-up: a clean Dynamo per test.

``examples/`` and ``tests/support/`` (model zoo, hand-written oracle) are on
sys.path through pytest's ``pythonpath`` setting in pyproject.toml.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts leak across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
