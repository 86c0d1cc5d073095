"""Every exception the server half raises on purpose, in one place (httpx's ``_exceptions.py`` is the model).
Its root, :class:`ServerSideError`, is an :class:`olmocr.errors.OlmocrError`.

Each message is user-facing: one line that says which setting is wrong and what to do.

```
ServerSideError
├── SettingsError (ValueError) ........ a setting has a value that cannot be used
│   └── EndpointConfigError ........... an HTTP endpoint (status service, metrics) cannot start as configured
└── TesseractMissing (RuntimeError) ... the stand-in's reading mode (olmocr/standin/reading.py) has no Tesseract
```
"""

from __future__ import annotations

from olmocr.errors import OlmocrError


class ServerSideError(OlmocrError):
    """Base of every exception the server half raises on purpose."""


class SettingsError(ServerSideError, ValueError):
    """A setting has a value that cannot be used; the message says which and why."""


class EndpointConfigError(SettingsError):
    """An endpoint cannot start as configured; the message says what to change."""


class TesseractMissing(ServerSideError, RuntimeError):
    """The stand-in's reading mode cannot run: Tesseract or its English/OSD data is not installed (the
    message names the Debian packages)."""
