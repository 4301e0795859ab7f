"""The request decoder never raises, whatever arrives."""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from promptcache import intake
from schemas.events import REQUEST_ID_PATTERN, STREAM_NAME_PATTERN, Request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=5),
    max_leaves=30)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.binary(max_size=10), st.binary(max_size=300), max_size=4))
def test_arbitrary_fields_decode_to_something(fields):
    decoded = intake.decode(fields)
    raw = fields.get(b"data")
    if raw is None:
        assert isinstance(decoded, intake.Undeliverable), decoded
        return
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # not JSON: answered only when a request id can be read from the bytes
        assert not isinstance(decoded, Request), decoded
        if b'"request_id"' not in raw:
            assert isinstance(decoded, intake.Undeliverable), decoded
        return
    if not isinstance(payload, dict):  # JSON, but not an object: nobody to answer
        assert isinstance(decoded, intake.Undeliverable), decoded


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["request_id", "prompt", "params", "options", "reply_to",
                                        "negative_prompt", "x"]), json_values, max_size=6))
def test_arbitrary_json_objects_decode_to_something(payload):
    decoded = intake.decode({b"data": json.dumps(payload).encode()})
    try:
        valid: Request | None = Request.model_validate(payload)
    except ValidationError:
        valid = None
    if valid is not None:  # a valid request is never refused, and is decoded as it is
        assert decoded == valid
        return
    request_id = payload.get("request_id")
    if isinstance(request_id, str) and re.fullmatch(REQUEST_ID_PATTERN, request_id):
        # the id is readable: the producer hears back, on its reply stream when that is valid
        assert isinstance(decoded, intake.Rejected), decoded
        assert decoded.request_id == request_id and decoded.error.code in (
            "invalid_request", "prompt_too_long")
        reply_to = payload.get("reply_to")
        if not (isinstance(reply_to, str) and re.fullmatch(STREAM_NAME_PATTERN, reply_to)):
            assert decoded.reply_to is None
    else:
        assert isinstance(decoded, intake.Undeliverable), decoded


def test_oversized_entry_is_rejected_by_id_when_the_id_is_readable():
    data = json.dumps({"request_id": "big-1", "prompt": "x" * 200_000}).encode()
    decoded = intake.decode({b"data": data})
    assert isinstance(decoded, intake.Rejected) and decoded.error.code == "request_too_large"


def test_deeply_nested_json_is_refused_cleanly():
    nested = b'{"request_id": "deep", "prompt": "x", "params": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    decoded = intake.decode({b"data": nested})
    assert isinstance(decoded, intake.Rejected) and decoded.request_id == "deep"


def test_invalid_reply_to_falls_back_to_the_results_stream():
    decoded = intake.decode({b"data": b'{"request_id": "r", "prompt": "", "reply_to": "a b"}'})
    assert isinstance(decoded, intake.Rejected) and decoded.reply_to is None
