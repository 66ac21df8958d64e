"""`python -m retrain`: see retrain.cli."""

from retrain.cli import entry_point

entry_point()
