"""Shared fixtures: the moto S3 server and fault proxy live in tests/conftest_s3.py."""

import pytest

pytest_plugins = ["tests.conftest_s3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where a test module's tiny demo dataset is generated (on first use by the trainer)."""
    return tmp_path_factory.mktemp("data") / "tiny"
