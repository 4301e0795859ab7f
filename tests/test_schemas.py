"""The wire contracts: models as CONTRACT.md shows them, JSON Schema files kept in step."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.events import Request, Result
from schemas.generate import JSON_DIR, MODELS, render

CONTRACT_REQUEST = {
    "request_id": "req-8f14e45f",
    "prompt": "a red fox in the snow, golden hour",
    "negative_prompt": "blurry",
    "params": {"model": "sdxl", "width": 1024, "height": 1024, "steps": 30,
               "guidance": 7.0, "sampler": "euler", "seed": 42},
    "options": {"optimize": True, "cache": "use"},
    "reply_to": "myapp:images",
    "scope": "tenant-42",
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_json_schema_files_match_the_models(name):
    path = JSON_DIR / f"{name}.schema.json"
    assert path.exists(), f"run `python -m schemas.generate` to create {path.name}"
    assert path.read_text() == render(MODELS[name]), (
        f"{path.name} has drifted from the model: run `python -m schemas.generate`")


def test_the_contract_example_request_is_valid():
    request = Request.model_validate(CONTRACT_REQUEST)
    assert request.params.seed == 42 and request.reply_to == "myapp:images"
    assert json.loads(request.model_dump_json()) == CONTRACT_REQUEST


def test_a_minimal_request_fills_defaults():
    request = Request.model_validate({"request_id": "r", "prompt": "x"})
    assert request.options.cache == "use" and request.options.optimize is True


@pytest.mark.parametrize("change", [
    {"request_id": ""}, {"request_id": "x" * 129}, {"request_id": "a b"},
    {"prompt": ""}, {"prompt": " \n\t "}, {"prompt": "p" * 4001},
    {"reply_to": "bad stream name"}, {"scope": ""}, {"scope": "a/b"}, {"scope": "s" * 65},
    {"params": {"width": 100}}, {"params": {"steps": 0}},
    {"params": {"unknown": 1}}, {"options": {"cache": "maybe"}}, {"surprise": True},
])
def test_invalid_requests_are_refused(change):
    with pytest.raises(ValidationError):
        Request.model_validate({**CONTRACT_REQUEST, **change})


def test_result_leaves_out_unset_fields_but_always_has_error():
    ok = json.loads(Result(request_id="r", status="ok", cache="exact", latency_ms=1.5)
                    .model_dump_json())
    assert ok == {"request_id": "r", "status": "ok", "cache": "exact", "latency_ms": 1.5,
                  "error": None}
    rejected = json.loads(Result.model_validate(
        {"request_id": "r", "status": "rejected",
         "error": {"code": "invalid_request", "message": "m"}}).model_dump_json())
    assert "cache" not in rejected and rejected["error"]["code"] == "invalid_request"


def test_result_round_trips_through_its_schema_fields():
    result = Result(request_id="r", status="ok", cache="semantic", similarity=0.93,
                    matched_prompt="m", entry_id="e_1", image_url="u", thumbnail_url="t",
                    width=1, height=1, content_type="image/png", prompt_used="p",
                    optimizer_version="1", latency_ms=7.4)
    schema = json.loads((JSON_DIR / "result.schema.json").read_text())
    assert set(json.loads(result.model_dump_json())) <= set(schema["properties"])
    assert Result.model_validate_json(result.model_dump_json()) == result
