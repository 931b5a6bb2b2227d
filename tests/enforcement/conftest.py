"""The ``api`` fixture for every test here (tests/api.py)."""

from tests.api import api

__all__ = ["api"]
