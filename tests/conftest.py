"""Shared test set-up: an isolated RETRAIN_HOME for the whole session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def retrain_home(tmp_path_factory):
    """Converted backbone weights go to a per-session folder, not ~/.cache."""
    home = tmp_path_factory.mktemp("retrain_home")
    previous = os.environ.get("RETRAIN_HOME")
    os.environ["RETRAIN_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("RETRAIN_HOME", None)
    else:
        os.environ["RETRAIN_HOME"] = previous
