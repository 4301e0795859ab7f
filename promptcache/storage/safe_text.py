"""Text that PostgreSQL can hold: what the persister applies to every change event it writes.

PostgreSQL's `text` and `jsonb` refuse the NUL character (`\\u0000`), and UTF-8 cannot encode a
lone surrogate (`\\ud800` escaped in JSON decodes to one in Python). Both become U+FFFD, the
replacement character, in every string of an event, dict keys and nested values included. Other
control characters are valid text and are kept as they are.
"""

from __future__ import annotations

import json
import re
from typing import Any

_UNSAFE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def safe_text(value: str) -> str:
    return _UNSAFE.sub(REPLACEMENT, value) if _UNSAFE.search(value) else value


def safe(value: Any) -> Any:
    """`value` (JSON-like: str, dict, list, numbers) with every string made safe."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe(k): safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe(v) for v in value]
    return value


def needs_care(raw: bytes) -> bool:
    """Whether JSON bytes may hold what PostgreSQL cannot: any `\\u` escape (a NUL, a lone
    surrogate; control characters too, which are fine but rare) or a raw NUL. JSON without
    these that the strict parser accepts holds nothing PostgreSQL refuses."""
    return b"\\u" in raw or b"\x00" in raw


def loads_safe(raw: bytes) -> Any:
    """Lenient JSON decoding for the careful path: invalid UTF-8 replaced, raw control
    characters inside strings accepted, lone surrogates kept, then everything made safe."""
    return safe(json.loads(raw.decode("utf-8", "replace"), strict=False))
