"""The interop tests' fixture: the Petals venv's python."""

from __future__ import annotations

import pytest

from petals_helpers import find_petals_python


@pytest.fixture(scope="session")
def petals_py() -> str:
    """The Petals venv's python, built (or reused) once per session. Without the package index the tests
    that use it skip, with the reason; any other failure to build it fails them."""
    python, reason = find_petals_python()
    if python is None:
        pytest.skip(reason)
    return python
