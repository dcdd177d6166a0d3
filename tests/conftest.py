"""Shared test setup: the repository root on sys.path (so `from train_ppo import gae` works wherever
pytest starts), and the read-only reference data in ../shared/data, which a user's clone does not have."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent (a user's clone): reference-data test skipped")
    return SHARED_DATA
