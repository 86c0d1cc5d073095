"""The root of every exception olmocr-serve raises on purpose, and the whole tree on one page.

Each half keeps its own module (httpx's ``_exceptions.py`` is the model); this one only gives them a common
root, so that a caller can catch "any deliberate olmocr error" in one clause, and draws the tree:

```
OlmocrError
├── SettingValueError (ValueError) ........ olmocr/envs.py: an OLMOCR_* variable that does not parse
├── SecretFileError (OSError) ............. olmocr/secret_files.py: a key or token file that cannot be used
├── ServerSideError ....................... olmocr/server/errors.py: the server half (settings, endpoints, stand-in)
├── ServiceError .......................... olmocr/service/intake.py: a request olmocr-service refuses (HTTP status, code)
└── PipelineError ......................... olmocr/pipeline/errors.py: the pipeline half
    └── ... ConfigError, ModelAnswerError, ServerError, TransportError, ... (tree in that module)
        └── LookupFailed .................. olmocr/pipeline/servers/discovery.py: a dns+ name that does not resolve
```

Every message is user-facing: one line that says what is wrong and what to do.
"""

from __future__ import annotations


class OlmocrError(Exception):
    """Base of every exception olmocr-serve raises on purpose."""
