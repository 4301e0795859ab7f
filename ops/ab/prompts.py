"""The prompt set for `promptcache ab`: a file, or a sample of the real prompts the demo uses."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ops.demo import load_prompts
from promptcache.errors import ConfigError

DEFAULT_SAMPLE = 20


def read_prompt_file(path: Path) -> list[str]:
    """`.json`: a list of strings or of objects with "prompt"; `.tsv`/`.csv`: the "Prompt" (or
    "prompt") column; anything else: one prompt a line, blank lines and `#` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompts {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--prompts {path}: not JSON ({exc})") from exc
        if not isinstance(items, list):
            raise ConfigError(f"--prompts {path}: expected a JSON list")
        found = [item if isinstance(item, str) else item.get("prompt") if isinstance(item, dict)
                 else None for item in items]
        prompts = [p for p in found if isinstance(p, str)]
    elif suffix in (".tsv", ".csv"):
        rows = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        column = next((c for c in rows.fieldnames or () if c.lower() == "prompt"), None)
        if column is None:
            raise ConfigError(f"--prompts {path}: no 'Prompt' column")
        prompts = [row[column] or "" for row in rows]
    else:
        prompts = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [p.strip() for p in prompts if p.strip()]


def prompt_set(path: Path | None, limit: int | None, seed: int) -> list[str]:
    """The prompts to run, in file order: all of `path` (or DEFAULT_SAMPLE of the real prompts
    when no path is given), or a seeded sample of `limit` of them."""
    prompts = read_prompt_file(path) if path is not None else load_prompts()
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in it" if path else "no prompts found")
    if limit is None and path is None:
        limit = DEFAULT_SAMPLE
    if limit is not None and limit < len(prompts):
        chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [prompts[i] for i in chosen]
    return prompts
