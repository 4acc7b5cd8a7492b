"""The moto S3 server of the store tests (tests/store/conftest.py), for the tasks that read S3 (intake)."""

from tests.store.conftest import bucket, moto_endpoint  # noqa: F401 (the fixtures)
