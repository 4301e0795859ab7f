"""Write the JSON Schema of every wire model into schemas/json/ (`python -m schemas.generate`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.events import ChangeEvent, DeadLetter, GenerationJob, Request, Result

MODELS: dict[str, type[BaseModel]] = {
    "request": Request,
    "result": Result,
    "dead_letter": DeadLetter,
    "change_event": ChangeEvent,
    "generation_job": GenerationJob,
}
JSON_DIR = Path(__file__).resolve().parent / "json"


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, model in MODELS.items():
        path = JSON_DIR / f"{name}.schema.json"
        path.write_text(render(model))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
