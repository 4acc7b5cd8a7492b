"""The configured store, from the environment (never params.yaml)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from store.local import LocalStore
from store.s3 import DEFAULT_PREFIX, S3Store

DEFAULT_LOCAL_DIR = "artifacts"


def local_dir(root: str | Path = ".", env: Mapping[str, str] | None = None) -> Path:
    """The local artifacts directory: ``LM_SLEEP_ARTIFACTS_DIR`` (relative to ``root``), default ``artifacts``."""
    env = os.environ if env is None else env
    return Path(root) / env.get("LM_SLEEP_ARTIFACTS_DIR", DEFAULT_LOCAL_DIR)


def store_from_env(root: str | Path = ".", env: Mapping[str, str] | None = None) -> LocalStore | S3Store:
    """The configured store: S3 when ``LM_SLEEP_S3_BUCKET`` is set, else the local directory.

    Endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset: AWS); credentials
    and region from boto3's standard chain. Nothing comes from params.yaml.
    """
    env = os.environ if env is None else env
    bucket = env.get("LM_SLEEP_S3_BUCKET", "").strip()
    if not bucket:
        return LocalStore(local_dir(root, env))
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    return S3Store(bucket, env.get("LM_SLEEP_S3_PREFIX", DEFAULT_PREFIX), endpoint_url=endpoint)
