"""Parametrisations split between ``make test-fast`` and ``make test``."""
import pytest


def slow_except(values, fast, ids=None):
    """``values`` as pytest params: those in ``fast`` run in ``make test-fast``, the others are
    marked slow (they run in ``make test``)."""
    return [
        pytest.param(v, marks=() if v in fast else pytest.mark.slow, id=None if ids is None else ids(v))
        for v in values
    ]
