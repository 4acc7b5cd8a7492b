"""The S3 store through boto3, at any S3 endpoint (AWS, MinIO, moto)."""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from store.base import ArtifactStore, ObjectInfo
from store.errors import AccessDeniedError, IntegrityError, NotFoundError, StoreError, UnreachableError
from store.integrity import Digest, file_digest, write_verified
from store.keys import validate_bucket, validate_key, validate_prefix
from store.retry import RetryPolicy, Transient, with_retries

T = TypeVar("T")

DEFAULT_PREFIX = "lm-sleep"
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT; our artifacts are far below it

_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "BadDigest", "XAmzContentSHA256Mismatch",
}
_DENIED_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
}


class S3Store(ArtifactStore):
    """Objects in ``s3://bucket/prefix/`` through boto3, at any S3 endpoint (AWS, MinIO, moto).

    Credentials and region come from boto3's standard chain. Each request is tried up to
    ``retry.attempts`` times with jittered exponential backoff (botocore's own retries are
    off so the two do not multiply).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = DEFAULT_PREFIX,
        endpoint_url: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.bucket = validate_bucket(bucket)
        self.prefix = validate_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or None
        self.retry = retry
        self._timeouts = (connect_timeout, read_timeout)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (built on first use; path-style addressing for custom endpoints)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=self._timeouts[0],
                read_timeout=self._timeouts[1],
                s3={"addressing_style": "path"} if self.endpoint_url else None,
                user_agent_extra="lm-sleep",
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to (the explicit one, else boto3's resolution)."""
        return self.endpoint_url or self.client.meta.endpoint_url

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, op: str, name: str) -> Callable[[Exception], Exception]:
        """Map a boto3/botocore failure of ``op`` on object ``name`` to a StoreError (or a retry)."""
        from botocore import exceptions as bx

        where = f"s3://{self.bucket}/{name}"

        def translate(exc: Exception) -> Exception:
            if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                                bx.ConnectionClosedError, bx.ResponseStreamingError, bx.ConnectionError)):
                return Transient(UnreachableError(f"cannot reach S3 endpoint {self.endpoint} ({op} {where}): {exc}"))
            if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
                return StoreError(
                    f"no AWS credentials for {op} {where} at {self.endpoint}: set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or configure ~/.aws"
                )
            if not isinstance(exc, bx.ClientError):
                return StoreError(f"{op} {where} at {self.endpoint} failed: {type(exc).__name__}: {exc}")
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code}: {error.get('Message', '')}".strip(": ")
            if code in _DENIED_CODES or status == 403:
                return AccessDeniedError(
                    f"access denied: {op} {where} (bucket '{self.bucket}', key '{name}') at {self.endpoint}: "
                    f"{detail}; check the credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket policy"
                )
            if code == "NoSuchBucket":
                return NotFoundError(
                    f"bucket '{self.bucket}' does not exist at {self.endpoint} ({op} key '{name}'): create it "
                    f"(aws s3 mb s3://{self.bucket}) or set LM_SLEEP_S3_BUCKET to an existing one"
                )
            if code in ("NoSuchKey", "404") or status == 404:
                return NotFoundError(f"no object {where} at {self.endpoint} ({op})")
            if code in _TRANSIENT_CODES or status >= 500:
                return Transient(StoreError(f"{op} {where} at {self.endpoint}: {detail} (HTTP {status})"))
            return StoreError(f"{op} {where} at {self.endpoint}: {detail} (HTTP {status})")

        return translate

    def _call(self, op: str, key: str, fn: Callable[[str], T]) -> T:
        """Run ``fn(object name)`` with retries and error translation."""
        name = self._name(key)
        return with_retries(lambda: fn(name), self.retry, self._translate(op, name))

    def _head(self, name: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        etag = str(head.get("ETag", "")).strip('"')
        plain = head.get("ServerSideEncryption") in (None, "AES256") and re.fullmatch(r"[0-9a-f]{32}", etag)
        checksum = head.get("ChecksumSHA256")
        sha = head.get("Metadata", {}).get("sha256")
        if sha and checksum and base64.b64encode(bytes.fromhex(sha)).decode() != checksum:
            sha = None  # metadata and S3's own checksum disagree: treat as unverifiable
        key = name[len(self.prefix) + 1:] if self.prefix else name
        return ObjectInfo(key, int(head["ContentLength"]), sha, etag if plain else None)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._call("HeadObject", key, self._head)

    @staticmethod
    def _holds(info: ObjectInfo | None, digest: Digest) -> bool:
        return (
            info is not None and info.size == digest.size and info.sha256 == digest.sha256
            and info.etag_md5 in (None, digest.md5)
        )

    def put_file(self, local_path: str | Path, key: str, digest: Digest | None = None) -> bool:
        digest = digest or file_digest(local_path)
        if self._holds(self.stat(key), digest):
            return False
        if digest.size > MAX_PUT_BYTES:
            raise StoreError(f"{local_path}: {digest.size} bytes is over one S3 PUT ({MAX_PUT_BYTES}); split it")
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"

        def send(name: str) -> None:
            with open(local_path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ContentType=content_type,
                    Metadata={"sha256": digest.sha256}, ChecksumAlgorithm="SHA256", ChecksumSHA256=digest.sha256_b64,
                )
            if not self._holds(self._head(name), digest):
                where = f"s3://{self.bucket}/{name}"
                raise Transient(IntegrityError(f"{where}: stored object does not match {local_path}"))

        self._call("PutObject", key, send)
        return True

    def get_file(self, key: str, local_path: str | Path) -> Path:
        def fetch(name: str) -> None:
            where = f"s3://{self.bucket}/{name}"
            resp = self.client.get_object(Bucket=self.bucket, Key=name)
            sha = resp.get("Metadata", {}).get("sha256")
            if not sha:
                raise IntegrityError(f"{where}: no sha256 metadata (not written by lm-sleep); refused")
            with contextlib.closing(resp["Body"]) as body:
                write_verified(body, Path(local_path), sha, where)

        self._call("GetObject", key, fetch)
        return Path(local_path)

    def _list(self, prefix: str, delimiter: bool) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        name = root + validate_prefix(prefix)
        kwargs = {"Bucket": self.bucket, "Prefix": name, **({"Delimiter": "/"} if delimiter else {})}

        def fetch() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                if delimiter:
                    out += [p["Prefix"][len(name):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                else:
                    out += [o["Key"][len(root):] for o in page.get("Contents", [])]
            return sorted(out)

        return with_retries(fetch, self.retry, self._translate("ListObjectsV2", name))

    def list(self, prefix: str = "") -> list[str]:
        return self._list(prefix, delimiter=False)

    def children(self, prefix: str = "") -> list[str]:
        return self._list(prefix, delimiter=True)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """An HTTPS URL that opens ``key`` without credentials for ``expires_s`` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_s
        )
