"""olmocr-service: documents over HTTP, as durable jobs on the workspace's queue (docs/service.md).

``cli`` (flags, the embedded ``--follow`` pipeline), ``app`` (routes, token, errors, metrics), ``jobs`` (job
records and states derived from the queue), ``intake`` (limits, types, confined paths), ``openapi``.
"""
