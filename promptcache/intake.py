"""Decoding a stream entry into a Request, or deciding who gets the error.

- entry decodes and validates           -> Request
- request_id readable, rest is wrong    -> Rejected(request_id, reply stream, error) : a result
- no usable request_id                  -> Undeliverable(error)                      : a dead letter
Never raises on any input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.events import (
    MAX_PROMPT_CHARS,
    REQUEST_ID_PATTERN,
    STREAM_NAME_PATTERN,
    ErrorInfo,
    Request,
)

MAX_ENTRY_BYTES = 64 * 1024  # a request is a few KB at most; anything bigger is not a request
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_STREAM = re.compile(STREAM_NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str
    reply_to: str | None
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Undeliverable:
    error: ErrorInfo


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(fields: dict[bytes, bytes],
           own_prefix: str | None = None) -> Request | Rejected | Undeliverable:
    """With `own_prefix`, a reply_to naming one of the service's own keys (under the prefix)
    is rejected: a result written there could overwrite or swallow the service's state."""
    raw = fields.get(b"data")
    if raw is None:
        return Undeliverable(ErrorInfo(code="invalid_request",
                                       message="the entry has no 'data' field"))
    if len(raw) > MAX_ENTRY_BYTES:
        # Too big to trust: still try to find the id so the producer hears back.
        return _reject_or_dead(_peek_request_id(raw[:4096]), None, ErrorInfo(
            code="request_too_large",
            message=f"the entry is {len(raw)} bytes; the limit is {MAX_ENTRY_BYTES}"))
    try:
        text = raw.decode("utf-8")
        payload = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _reject_or_dead(_peek_request_id(raw[:4096]), None, ErrorInfo(
            code="invalid_request", message="'data' is not a UTF-8 JSON object"))
    if not isinstance(payload, dict):
        return Undeliverable(ErrorInfo(code="invalid_request",
                                       message="'data' is not a JSON object"))
    try:
        request = Request.model_validate(payload)
    except (ValidationError, RecursionError) as exc:
        request_id = payload.get("request_id")
        reply_to = payload.get("reply_to")
        if isinstance(exc, RecursionError):
            error = ErrorInfo(code="invalid_request", message="the request is nested too deeply")
        elif isinstance(payload.get("prompt"), str) and len(payload["prompt"]) > MAX_PROMPT_CHARS:
            error = ErrorInfo(code="prompt_too_long",
                              message=f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        else:
            error = ErrorInfo(code="invalid_request", message=_describe(exc))
        return _reject_or_dead(request_id, reply_to, error)
    if own_prefix is not None and request.reply_to is not None and \
            is_own_key(request.reply_to, own_prefix):
        return Rejected(request.request_id, None, ErrorInfo(
            code="invalid_request",
            message=f"reply_to {request.reply_to!r} names one of the service's own keys "
                    f"(under {own_prefix!r}); choose a stream name outside it"))
    return request


def is_own_key(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith((f"{prefix}:", f"{{{prefix}:", f"{{{prefix}}}"))


def _reject_or_dead(request_id: object, reply_to: object,
                    error: ErrorInfo) -> Rejected | Undeliverable:
    if isinstance(request_id, str) and _REQUEST_ID.match(request_id):
        stream = reply_to if isinstance(reply_to, str) and _STREAM.match(reply_to) else None
        return Rejected(request_id, stream, error)
    return Undeliverable(error)


_PEEK = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9._:-]{1,128})"')


def _peek_request_id(head: bytes) -> str | None:
    match = _PEEK.search(head)
    return match.group(1).decode() if match else None
