"""The artifact store: each cycle's experts, dreams and reports, on the local disk or on S3 (docs/design.md §4).

Layout, keys relative to the store's root (on S3 the root is ``s3://BUCKET/PREFIX/``)::

    index.html                              every run, linking to each run's index
    runs/<RUN_ID>/index.html                cycles, experts with provenance, dream funnel, reports, plots
    runs/<RUN_ID>/run.json                  one short row per cycle; the root index is built from these
    runs/<RUN_ID>/cycle-<N>/summary.json    the cycle summary (:class:`CycleSummary`) and its artifacts
    runs/<RUN_ID>/cycle-<N>/{experts,dreams,reports}/...

Every object carries the SHA-256 of its bytes: S3 user metadata ``sha256`` plus S3's own
``ChecksumSHA256``, or a hidden ``.<name>.sha256`` file beside it on disk. An upload counts
only once the stored object is checked against the local bytes (size, digest, and the
ETag, which is the MD5 of a plain single-part object); a download is hashed while it is
written and refused, leaving nothing behind, if it differs from the recorded digest.

Publishing goes through an outbox (``<artifacts dir>/.outbox``): files are copied into it
and listed in ``pending.json`` before anything is sent, and an entry leaves the list only
when its object is verified. If the store is unreachable or refuses access, publishing
raises a :class:`StoreError` that names the endpoint, bucket and key, and the next publish
or flush sends what is left. Objects already stored with the same bytes are skipped, so a
run killed mid-upload ends in the same final state when rerun; S3 keeps an object only
when its whole PUT arrived and local writes are atomic renames, so no partial object is
ever visible.

Configuration comes from the environment, never params.yaml: ``LM_SLEEP_S3_BUCKET`` (unset:
the local store in ``LM_SLEEP_ARTIFACTS_DIR``, default ``artifacts/``), ``LM_SLEEP_S3_PREFIX``
(default ``lm-sleep``), ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, and credentials and
region from boto3's standard chain (environment, ``AWS_PROFILE``, ``~/.aws``, instance roles).

Modules: ``errors`` (:class:`StoreError` and its kinds), ``keys`` (run ids, keys, bucket names),
``integrity`` (digests, verified writes), ``retry`` (backoff), ``base`` (the :class:`ArtifactStore`
protocol), ``local`` and ``s3`` (the two stores), ``env`` (the configured store), ``index``
(cycle summaries and the index pages) and ``outbox`` (the outbox, publishing, fetching).
Nothing here imports Prefect: the tasks in ``tasks/store.py`` and ``tasks/publish.py`` call it.
"""

from store.base import ArtifactStore, get_bytes
from store.env import store_from_env
from store.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
    OutOfSpaceError,
    StoreError,
    UnreachableError,
)
from store.index import experts_from_manifest, list_runs
from store.keys import run_prefix, validate_key, validate_run_id
from store.local import LocalStore
from store.outbox import (
    Outbox,
    PublishResult,
    fetch_run,
    flush_outbox,
    outbox_for,
    publish_cycle,
    publish_cycle_from_env,
)
from store.retry import RetryPolicy
from store.s3 import S3Store

__all__ = [
    "AccessDeniedError",
    "ArtifactStore",
    "IntegrityError",
    "InvalidKeyError",
    "LocalStore",
    "NotFoundError",
    "OutOfSpaceError",
    "Outbox",
    "PublishResult",
    "RetryPolicy",
    "S3Store",
    "StoreError",
    "UnreachableError",
    "experts_from_manifest",
    "fetch_run",
    "flush_outbox",
    "get_bytes",
    "list_runs",
    "outbox_for",
    "publish_cycle",
    "publish_cycle_from_env",
    "run_prefix",
    "store_from_env",
    "validate_key",
    "validate_run_id",
]
