"""Shared fixtures: the moto S3 server and fault proxy live in tests/conftest_s3.py."""

pytest_plugins = ["tests.conftest_s3"]
