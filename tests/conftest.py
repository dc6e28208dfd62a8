"""Fixtures shared by the test tiers (helpers live in ``tests/helpers``)."""

from __future__ import annotations

import pytest

from tests.helpers.rpc import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Real certificates (good, foreign and expired), made once per test session."""
    return make_pki(tmp_path_factory.mktemp("pki"))
