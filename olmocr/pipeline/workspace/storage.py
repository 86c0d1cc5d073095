"""A small object-store abstraction over a local directory or an ``s3://bucket/prefix``.

Keys are ``/``-separated relative paths such as ``results/output_abc.jsonl``. Version tags are the MD5 of
the content (S3's ETag for single-part puts; computed the same way locally), so a compare-and-swap
succeeds only if the object still holds exactly the bytes that were read.

Guarantees used by the work queue:

* ``write`` is an atomic replace: readers see the old or the new bytes, never a partial file.
* ``create`` is atomic create-if-absent (local: ``os.link`` of a complete temp file; S3: ``If-None-Match: *``).
* ``replace_if`` is compare-and-swap (local: under an ``fcntl.flock`` on a hidden sidecar file;
  S3: ``If-Match: <etag>``). S3 has supported both conditional writes since late 2024; a store that
  ignores them is not safe for several workers.

Hidden names (starting with ``.``: temp files and CAS lock sidecars) are never returned by ``list``.

Reads that keep the queue's cost flat (docs/workspace.md, "Queue design"):

* ``read_if_changed(key, tag)`` -- a conditional GET (``If-None-Match: <tag>``): ``NOT_MODIFIED`` (304, no
  body) when the object still has that tag.
* ``read_aged(key)`` / ``stat(key)`` -- the object with its age *in the store's own clock* (S3: the answer's
  ``Date`` minus the object's ``LastModified``; local: now minus mtime), so leases never compare clocks of
  different machines.
* ``iter_list(prefix)`` -- keys one listing page at a time (a generator: memory stays bounded).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Storage(Protocol):
    """Minimal object store; see the module docstring for the guarantees."""

    url: str

    def read(self, key: str) -> bytes | None: ...

    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...

    def write(self, key: str, data: bytes) -> None: ...

    def create(self, key: str, data: bytes) -> bool: ...

    def replace_if(self, key: str, data: bytes, tag: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def list_times(self, prefix: str) -> dict[str, float]:
        """``{key: modification time (Unix seconds)}`` for the keys of :meth:`list` (one listing, no reads)."""
        ...

    def iter_list(self, prefix: str) -> Iterator[str]:
        """The keys of :meth:`list`, streamed (not sorted across listing pages on S3)."""
        ...

    def read_if_changed(self, key: str, tag: str | None) -> tuple[bytes, str] | None | NotModified:
        """``NOT_MODIFIED`` if ``key`` still has version ``tag``; else as :meth:`read_versioned`."""
        ...

    def read_aged(self, key: str) -> tuple[bytes, str, float] | None:
        """``(data, tag, age_seconds)``: age since the last write, measured by the store's clock."""
        ...

    def stat(self, key: str) -> tuple[str, float] | None:
        """``(tag, age_seconds)`` without the body (S3: a HEAD), or None if absent."""
        ...

    def list_ages(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, age_seconds)`` of the keys of :meth:`list`, streamed; ages by the store's clock."""
        ...


class NotModified:
    """The answer of :meth:`Storage.read_if_changed` when the object did not change (one instance)."""

    def __repr__(self) -> str:
        return "NOT_MODIFIED"


NOT_MODIFIED = NotModified()


def content_tag(data: bytes) -> str:
    """The version tag of ``data`` (MD5 hex, as S3 single-part ETags)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")


#: Tries of a local write to make its folder while deletes prune empty folders (olmocr/pipeline/workspace).
FOLDER_ATTEMPTS = 20


class LocalStorage:
    """A directory on a local (or POSIX-locking network) filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def _write_temp(self, path: Path, data: bytes) -> Path:
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
        for attempt in range(FOLDER_ATTEMPTS):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileNotFoundError:  # the folder's first file: made here, not checked before every write
                if attempt == FOLDER_ATTEMPTS - 1:
                    raise
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # a delete pruned a folder of the path meanwhile (it was empty): again
                continue
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        data = self.read(key)
        return None if data is None else (data, content_tag(data))

    def read_if_changed(self, key: str, tag: str | None) -> tuple[bytes, str] | None | NotModified:
        found = self.read_versioned(key)
        if found is not None and tag is not None and found[1] == tag:
            return NOT_MODIFIED
        return found

    def read_aged(self, key: str) -> tuple[bytes, str, float] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                modified = os.fstat(fh.fileno()).st_mtime
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return data, content_tag(data), max(0.0, time.time() - modified)

    def stat(self, key: str) -> tuple[str, float] | None:
        found = self.read_aged(key)  # local: the tag needs the content anyway
        return None if found is None else (found[1], found[2])

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = path.parent / f".{path.name}.cas-lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a delete pruned the folder, empty: the key is absent, the swap fails
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read(key)
            if current is None or content_tag(current) != tag:
                return False
            self.write(key, data)
            return True
        finally:
            os.close(fd)  # closing releases the flock

    def delete(self, key: str) -> None:
        """Delete ``key``, then the folders below the top level it leaves empty (S3 has no folders: a million
        removed jobs must not leave a million empty ones for every listing to walk). The top-level folders
        (``worker_locks/``, ``results/``, ``service/`` ...) stay: a lease's delete would otherwise remove and
        the next claim make ``worker_locks/`` again and again."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        for folder in path.parents[: max(0, key.count("/") - 1)]:
            try:
                folder.rmdir()  # only if empty; a write in progress holds its temp file there
            except OSError:
                break

    def list(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` (a directory like ``results/`` or a name prefix)."""
        return sorted(self.iter_list(prefix))

    def iter_list(self, prefix: str) -> Iterator[str]:
        directory, _, name_prefix = prefix.rpartition("/")
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    yield key

    def list_ages(self, prefix: str) -> Iterator[tuple[str, float]]:
        now = time.time()
        for key in self.iter_list(prefix):
            try:
                yield key, max(0.0, now - self._path(key).stat().st_mtime)
            except FileNotFoundError:
                continue

    def list_times(self, prefix: str) -> dict[str, float]:
        times: dict[str, float] = {}
        for key in self.list(prefix):
            try:
                times[key] = self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue  # deleted since the listing
        return times


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no trailing slash)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// url: {url}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, prefix.strip("/")


#: botocore retry settings used unless ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` say otherwise. "standard"
#: retries throttling (503 SlowDown), 500s, connection resets and timeouts with exponential backoff and
#: jitter; 8 attempts ride out about a minute of trouble.
DEFAULT_S3_RETRY_MODE = "standard"
DEFAULT_S3_MAX_ATTEMPTS = 8
#: Seconds to connect / to wait for an answer before botocore counts the attempt as failed and retries.
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
#: Tries to read an object's body when the connection breaks mid-stream (botocore does not retry that).
BODY_READ_ATTEMPTS = 3


def s3_client_config(environ: dict[str, str] | None = None) -> Any:
    """The botocore Config of the workspace client (retries, timeouts); see the constants above."""
    from botocore.config import Config

    env = os.environ if environ is None else environ
    mode = env.get("AWS_RETRY_MODE") or DEFAULT_S3_RETRY_MODE
    if mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"AWS_RETRY_MODE={mode!r}: use standard, adaptive or legacy")
    try:
        attempts = int(env.get("AWS_MAX_ATTEMPTS") or DEFAULT_S3_MAX_ATTEMPTS)
    except ValueError:
        raise ValueError(f"AWS_MAX_ATTEMPTS={env.get('AWS_MAX_ATTEMPTS')!r} is not a whole number") from None
    # ``total_max_attempts`` counts the first request, as AWS_MAX_ATTEMPTS does; botocore's ``max_attempts``
    # key would count retries only (one attempt more than asked for).
    return Config(retries={"total_max_attempts": max(1, attempts), "mode": mode},
                  connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S, max_pool_connections=32)


def make_s3_client(profile: str | None = None, **kwargs: Any) -> Any:
    """A boto3 S3 client; honours ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, the usual credentials, and
    ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` (see :func:`s3_client_config`).

    ``profile``: a named profile of the AWS config/credentials files (upstream's ``--workspace_profile`` /
    ``--pdf_profile``), with its credentials, region and ``endpoint_url``.
    """
    import boto3

    session: Any = boto3.Session(profile_name=profile) if profile else boto3
    config = kwargs.pop("config", None) or s3_client_config()
    return session.client("s3", config=config, **kwargs)


def get_object_bytes(client: Any, **params: Any) -> tuple[bytes, dict]:
    """``get_object(**params)`` and its whole body; returns (body, response).

    botocore retries the request, but not the reading of the body it returned: a connection that breaks
    while the object streams in would fail the call. Such reads are tried again (``BODY_READ_ATTEMPTS``).
    """
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    for attempt in range(BODY_READ_ATTEMPTS):
        response = client.get_object(**params)
        try:
            return response["Body"].read(), response
        except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError) as exc:
            if attempt + 1 == BODY_READ_ATTEMPTS:
                raise
            logger.info("s3://%s/%s: reading the object broke off (%s); reading it again", params.get("Bucket"),
                        params.get("Key"), exc)
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_MISSING = {"NoSuchKey", "404", "NotFound"}
_NOT_MODIFIED = {"304", "NotModified"}


def _store_age(response: dict) -> float:
    """Seconds since the object was last written, by the store's clock: the answer's ``Date`` header minus
    the object's ``LastModified`` (both whole seconds; never negative)."""
    from email.utils import parsedate_to_datetime

    modified = response.get("LastModified")
    if modified is None:
        return 0.0  # unknown: count the object as fresh (a lease is then never taken early)
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
    try:
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()  # no usable Date (a proxy dropped it): this machine's clock, the best left
    return max(0.0, now - modified.timestamp())
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Storage:
    """An ``s3://bucket/prefix`` using S3 conditional writes for create and compare-and-swap."""

    def __init__(self, url: str, client: Any = None, **s3_kwargs: Any) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = client if client is not None else make_s3_client(**s3_kwargs)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        found = self.read_aged(key)
        return None if found is None else (found[0], found[1])

    def read(self, key: str) -> bytes | None:
        found = self.read_versioned(key)
        return None if found is None else found[0]

    def read_if_changed(self, key: str, tag: str | None) -> tuple[bytes, str] | None | NotModified:
        from botocore.exceptions import ClientError

        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._key(key)}
        if tag is not None:
            params["IfNoneMatch"] = f'"{tag}"'
        try:
            data, response = get_object_bytes(self.client, **params)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING:
                return None
            if code in _NOT_MODIFIED:
                return NOT_MODIFIED
            raise
        return data, str(response["ETag"]).strip('"')

    def read_aged(self, key: str) -> tuple[bytes, str, float] | None:
        from botocore.exceptions import ClientError

        try:
            data, response = get_object_bytes(self.client, Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise
        return data, str(response["ETag"]).strip('"'), _store_age(response)

    def stat(self, key: str) -> tuple[str, float] | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise
        return str(response["ETag"]).strip('"'), _store_age(response)

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        """A conditional PUT; False if the condition failed.

        botocore resends a PUT whose answer was lost (connection reset, timeout). If the first one was
        written, the resend fails its condition (412) although the object is ours: after a resend, a
        failed condition is checked by reading the object back -- our bytes (lease records and index
        versions are unique) mean our write landed.
        """
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except ClientError as exc:
            code = _error_code(exc)
            if code not in _PRECONDITION and code not in _MISSING:
                raise
            retried = int((exc.response or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
            if retried and code in _PRECONDITION and self.read(key) == data:
                logger.info("%s: conditional write landed although its answer was lost (resent %d times)",
                            key, retried)
                return True
            return False

    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        return self._conditional_put(key, data, IfMatch=f'"{tag}"')

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        return sorted(key for key, _, _ in self._listing(prefix))

    def list_times(self, prefix: str) -> dict[str, float]:
        return {key: modified for key, modified, _ in self._listing(prefix)}

    def iter_list(self, prefix: str) -> Iterator[str]:
        return (key for key, _, _ in self._listing(prefix))

    def list_ages(self, prefix: str) -> Iterator[tuple[str, float]]:
        return ((key, age) for key, _, age in self._listing(prefix))

    def _listing(self, prefix: str) -> Iterator[tuple[str, float, float]]:
        """``(key, LastModified, age by the store's clock)``, one listing page (1,000 keys) at a time."""
        from email.utils import parsedate_to_datetime

        if prefix:
            _check_key(prefix.rstrip("/") or "x")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            date = (page.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
            try:
                store_now = parsedate_to_datetime(date).timestamp() if date else time.time()
            except (TypeError, ValueError):
                store_now = time.time()
            for obj in page.get("Contents", []):
                key = obj["Key"][strip:]
                if key and not key.rsplit("/", 1)[-1].startswith("."):
                    modified = obj.get("LastModified")
                    when = modified.timestamp() if modified is not None else 0.0
                    yield key, when, max(0.0, store_now - when) if when else 0.0


def open_storage(url: str, profile: str | None = None, **s3_kwargs: Any) -> Storage:
    """Open a workspace: a local directory (created if missing) or ``s3://bucket/prefix`` (with the AWS
    profile ``profile``, if given)."""
    if url.startswith("s3://"):
        return S3Storage(url, profile=profile, **s3_kwargs)
    return LocalStorage(url)
