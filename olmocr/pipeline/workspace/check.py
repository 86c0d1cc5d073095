"""Is the workspace usable? Checked before any work is queued or any server started, so that a wrong path,
a read-only disk, missing AWS credentials or a missing bucket is one line and an exit status, never a
traceback from deep inside a worker.

:func:`workspace_problem` turns an exception into that line (pure, tested row by row);
:func:`check_workspace` performs the checks (create the directory and write a probe file; list one S3 key);
:func:`remove_if_empty` takes back a local workspace directory this run created when there was nothing to put
in it.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from olmocr.pipeline.errors import WorkspaceError

#: AWS error codes and what the user does about them.
_S3_ADVICE = {
    "NoSuchBucket": "the bucket does not exist: create it (aws s3 mb s3://{bucket}) or correct the name",
    "AccessDenied": "access denied: the credentials in use may not read and write s3://{bucket} (check the IAM "
                    "policy, AWS_PROFILE or --workspace_profile)",
    "AllAccessDisabled": "access to s3://{bucket} is disabled for these credentials",
    "InvalidAccessKeyId": "the AWS access key id is not known to the server (check AWS_ACCESS_KEY_ID, "
                          "AWS_PROFILE or --workspace_profile, and AWS_ENDPOINT_URL)",
    "SignatureDoesNotMatch": "the AWS secret key is wrong for this access key id (check "
                             "AWS_SECRET_ACCESS_KEY or the profile)",
    "ExpiredToken": "the AWS session token has expired: refresh the credentials (aws sso login, ...)",
    "InvalidBucketName": "'{bucket}' is not a valid bucket name (lower-case letters, digits, '-' and '.')",
    "PermanentRedirect": "the bucket is in another region: set AWS_DEFAULT_REGION to the bucket's region",
}


def _s3_bucket(url: str) -> str:
    return url[len("s3://"):].partition("/")[0] if url.startswith("s3://") else ""


def workspace_problem(url: str, exc: BaseException) -> str | None:
    """The one line for ``exc`` raised while using workspace ``url``, or None when it is not a user's mistake
    we know (a bug: let it be reported in full)."""
    bucket = _s3_bucket(url)
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (f"workspace {url}: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --workspace_profile")
    if name == "ProfileNotFound":
        return f"workspace {url}: {exc}: correct AWS_PROFILE / --workspace_profile"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return (f"workspace {url}: cannot reach the S3 endpoint ({exc}): check AWS_ENDPOINT_URL and the "
                "network, then try again")
    if isinstance(getattr(exc, "response", None), dict) and "Error" in exc.response:  # type: ignore[attr-defined]
        error = (getattr(exc, "response", None) or {}).get("Error", {})
        code = str(error.get("Code", ""))
        advice = _S3_ADVICE.get(code) or _S3_ADVICE.get({"403": "AccessDenied", "404": "NoSuchBucket"}.get(code, ""))
        if advice:
            return f"workspace {url}: {advice.format(bucket=bucket)}"
        return f"workspace {url}: S3 refused the request ({code}: {error.get('Message', exc)})"
    if name == "ParamValidationError" or (isinstance(exc, ValueError) and url.startswith("s3://")):
        return f"workspace {url}: {exc}"
    if isinstance(exc, OSError):
        where = exc.filename or url
        if exc.errno == errno.EROFS:
            return f"workspace {url}: {where} is on a read-only file system: choose a writable directory"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (f"workspace {url}: no permission to write in {where}: choose a directory you can write to "
                    "(or fix its owner/mode)")
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return (f"workspace {url}: {where} is a file, not a directory: give a directory (it is created "
                    "if missing) or an s3://bucket/prefix")
        if exc.errno == errno.ENOENT:
            return (f"workspace {url}: cannot create {where} (no such file or directory; a parent such as "
                    "/proc or /sys cannot hold it): choose a directory on a normal file system")
        if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
            return f"workspace {url}: no space left on {where}: free space or choose another disk"
        return f"workspace {url}: cannot use {where}: {exc.strerror or exc}"
    return None


def check_workspace(url: str, profile: str | None = None, *, writable: bool = True) -> None:
    """Raise :class:`WorkspaceError` (one line) unless the workspace can be used. A local directory is created
    if missing (when ``writable``) and written to once; an S3 workspace is listed once."""
    try:
        if url.startswith("s3://"):
            from olmocr.pipeline.workspace.storage import make_s3_client, parse_s3_url

            bucket, prefix = parse_s3_url(url)
            make_s3_client(profile).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return
        root = Path(url).expanduser()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
        if not writable:
            if not root.is_dir():
                raise WorkspaceError(f"workspace {url}: no such directory (nothing has been queued there yet)")
            return
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".olmocr-write-check-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except WorkspaceError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; what is not a user's mistake is re-raised
        problem = workspace_problem(url, exc)
        if problem is None:
            raise
        raise WorkspaceError(problem) from None


def missing_parents(url: str) -> Path | None:
    """The topmost directory of local workspace ``url`` that does not exist yet (what creating it adds), or
    None (it exists, or it is on S3)."""
    if url.startswith("s3://"):
        return None
    path = Path(url).expanduser().absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def remove_if_empty(created: Path | None) -> bool:
    """Remove ``created`` (a directory this run made) if it holds no file but hidden bookkeeping files;
    True if it was removed."""
    if created is None or not created.is_dir():
        return False
    for _, _, filenames in os.walk(created):
        if any(not name.startswith(".") for name in filenames):
            return False
    shutil.rmtree(created, ignore_errors=True)
    return not created.exists()
