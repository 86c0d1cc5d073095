"""Reading a secret (an API key, a bearer token) from a file: the one reader for every key and token.

Secrets come from the environment or a file, never from a command line (``ps`` shows arguments to every
user) and never into a log. A file's whole content, stripped, is the secret; an empty file means none.
The pipeline's per-server key file (``KEY`` / ``URL KEY`` lines) is parsed on top of this by
``olmocr.pipeline.servers.serverlist.read_key_file``.
"""

from __future__ import annotations

from olmocr.errors import OlmocrError


class SecretFileError(OlmocrError, OSError):
    """The file cannot be read; the message names it and what to fix (never its content)."""


def read_secret_file(path: str, what: str, fix: str) -> str | None:
    """The stripped content of ``path`` (None when empty). ``what`` names the secret in the error message
    ("API key", "token"), ``fix`` the setting to correct ("OLMOCR_API_KEY_FILE")."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} file {path}: {exc.strerror}; fix {fix} or its permissions") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} file {path} is not UTF-8 text; fix {fix}") from None


def read_secret_lines(path: str, what: str, fix: str) -> list[str]:
    """The lines of ``path`` (for files holding several secrets), with :func:`read_secret_file`'s errors."""
    return (read_secret_file(path, what, fix) or "").splitlines()
