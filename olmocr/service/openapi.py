"""The OpenAPI 3.1 document of olmocr-service (``GET /openapi.json``); tests check it with a validator and
against the app's routes."""

from __future__ import annotations

from olmocr import __version__
from olmocr.pipeline.workspace.inputs import KINDS
from olmocr.service.intake import accepted_names


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{24}$"}}
_FORMAT = {"name": "format", "in": "query", "required": False,
           "schema": {"type": "string", "enum": ["markdown", "dolma", "pages"], "default": "markdown"}}

_SUBMIT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": f"a document ({accepted_names()}, judged by content); repeat the field"},
            "path": {"type": "array", "items": {"type": "string"},
                     "description": "an s3:// or local path under a configured root"}}}},
        "application/json": {"schema": {"type": "object", "required": ["paths"], "properties": {
            "paths": {"type": "array", "items": {"type": "string"}}}}},
        "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
            "path": {"type": "array", "items": {"type": "string"}}}}},
    },
}

_SUBMIT_ERRORS = {
    "400": _error("malformed request, or a path that is not a string"),
    "401": _error("missing or wrong bearer token (codes missing_token, wrong_token)"),
    "403": _error("a path outside the configured roots (code path_not_allowed)"),
    "404": _error("a named path does not exist (code not_found)"),
    "413": _error("the request is larger than OLMOCR_SERVICE_MAX_UPLOAD_MB (code upload_too_large)"),
    "415": _error(f"not a {accepted_names()} by content (unsupported_type), or a body that is not multipart, JSON "
                  "or a form (unsupported_content_type)"),
    "422": _error("no documents, too many documents, too many pages, an empty file, a damaged PDF or TIFF"),
    "429": {**_error("too many unfinished jobs for this token (code too_many_jobs)"),
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}

_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "DocumentStatus": {"type": "object", "required": ["name", "kind", "pages", "outcome"], "properties": {
        "name": {"type": "string"}, "kind": {"type": "string", "enum": list(KINDS)},
        "pages": {"type": "integer"},
        "outcome": {"type": "string", "enum": ["pending", "done", "failed", "cancelled"]},
        "reason": {"type": "string"}}},
    "Job": {"type": "object", "required": ["id", "state", "pages_done", "pages_total", "documents"], "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
        "created": {"type": "number", "description": "seconds since 1970"},
        "finished": {"type": ["number", "null"]},
        "pages_done": {"type": "integer"}, "pages_total": {"type": "integer"},
        "eta_seconds": {"type": ["number", "null"], "description": "the job's remaining pages at the "
                        "workspace's current rate"},
        "message": {"type": "string"},
        "documents": {"type": "array", "items": _ref("DocumentStatus")}}},
    "JobList": {"type": "object", "required": ["jobs", "next"], "properties": {
        "jobs": {"type": "array", "items": _ref("Job")},
        "next": {"type": ["string", "null"], "description": "pass as ?before= for the next page"}}},
    "Page": {"type": "object", "properties": {
        "page": {"type": "integer"}, "text": {"type": "string"}, "primary_language": {"type": ["string", "null"]},
        "is_rotation_valid": {"type": ["boolean", "null"]}, "rotation_correction": {"type": ["integer", "null"]},
        "is_table": {"type": ["boolean", "null"]}, "is_diagram": {"type": ["boolean", "null"]}}},
    "Result": {"type": "object", "required": ["id", "state", "format", "documents"], "properties": {
        "id": {"type": "string"}, "state": {"type": "string"}, "format": {"type": "string"},
        "documents": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "outcome": {"type": "string"}, "reason": {"type": "string"},
            "markdown": {"type": ["string", "null"]},
            "pages": {"type": "array", "items": _ref("Page")},
            "input_tokens": {"type": ["integer", "null"]}, "output_tokens": {"type": ["integer", "null"]},
            "fallback_pages": {"type": ["integer", "null"]}}}}}},
}

_RESULT_CONTENT = {
    "application/json": {"schema": _ref("Result")},
    "application/x-ndjson": {"schema": {"type": "string", "description": "format=dolma: Dolma JSON lines"}},
    "text/markdown": {"schema": {"type": "string", "description": "format=markdown with Accept: text/markdown"}},
}


def document() -> dict:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "olmocr-service", "version": __version__,
                 "description": "Documents over HTTP: durable jobs on the workspace queue (docs/service.md)."},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {"summary": "submit a job", "operationId": "submitJob", "requestBody": _SUBMIT_BODY,
                         "responses": {"202": _json(_ref("Job"), "queued"), **_SUBMIT_ERRORS}},
                "get": {"summary": "recent jobs, newest first", "operationId": "listJobs",
                        "parameters": [
                            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100, "default": 20}},
                            {"name": "before", "in": "query", "schema": {"type": "string"}}],
                        "responses": {"200": _json(_ref("JobList"), "a page of jobs"),
                                      "400": _error("bad limit")}},
            },
            "/v1/jobs/{id}": {
                "get": {"summary": "a job's state", "operationId": "getJob", "parameters": [_JOB_ID],
                        "responses": {"200": _json(_ref("Job"), "the job"), "404": _error("no such job")}},
                "delete": {"summary": "cancel a job (work not started is dropped, pages in flight finish)",
                           "operationId": "cancelJob", "parameters": [_JOB_ID],
                           "responses": {"200": _json(_ref("Job"), "cancelled"), "404": _error("no such job"),
                                         "409": _error("the job is finished already")}},
            },
            "/v1/jobs/{id}/result": {
                "get": {"summary": "a finished job's result", "operationId": "getResult",
                        "parameters": [_JOB_ID, _FORMAT],
                        "responses": {"200": {"description": "the result", "content": _RESULT_CONTENT},
                                      "400": _error("unknown format"), "404": _error("no such job"),
                                      "409": _error("the job is not finished (code not_finished)")}},
            },
            "/v1/jobs/{id}/documents/{doc}/pages/{page}/image": {
                "get": {"summary": "a page's image (the upload page shows it beside the Markdown)",
                        "operationId": "getPageImage",
                        "parameters": [_JOB_ID,
                                       {"name": "doc", "in": "path", "required": True,
                                        "schema": {"type": "integer", "minimum": 0},
                                        "description": "the document's index in the job"},
                                       {"name": "page", "in": "path", "required": True,
                                        "schema": {"type": "integer", "minimum": 1}}],
                        "responses": {"200": {"description": "PNG (a PDF page, a TIFF frame) or the uploaded PNG or JPEG",
                                              "content": {"image/png": {}, "image/jpeg": {}}},
                                      "404": _error("no such job, document or page")}},
            },
            "/v1/convert": {
                "post": {"summary": "submit and wait (bounded) for the result", "operationId": "convert",
                         "parameters": [_FORMAT, {"name": "timeout", "in": "query",
                                                  "schema": {"type": "number", "minimum": 0}}],
                         "requestBody": _SUBMIT_BODY,
                         "responses": {"200": {"description": "the result", "content": _RESULT_CONTENT},
                                       "202": _json(_ref("Job"), "not finished in time: poll the job"),
                                       **_SUBMIT_ERRORS,
                                       "422": _error("refused at submit (see POST /v1/jobs), or every document "
                                                     "failed (code conversion_failed)")}},
            },
            "/": {"get": {"summary": "the upload page", "operationId": "page", "security": [],
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "operationId": "openapi",
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {}}}}}},
            "/healthz": {"get": {"summary": "the process answers", "operationId": "healthz", "security": [],
                                 "responses": {"200": {"description": "ok",
                                                       "content": {"text/plain": {}}}}}},
            "/readyz": {"get": {"summary": "the workspace can be read and the embedded workers run",
                                "operationId": "readyz", "security": [],
                                "responses": {"200": {"description": "ok", "content": {"text/plain": {}}},
                                              "503": {"description": "why not",
                                                      "content": {"text/plain": {}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "text format",
                                                       "content": {"text/plain": {}}}}}},
        },
    }
