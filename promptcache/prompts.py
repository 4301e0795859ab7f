"""Prompt canonicalisation and the exact-tier cache key. Pure functions, no I/O.

`canonical_prompt` is what two prompts must share to be "the same prompt": Unicode NFKC, one space
between words, lower case (except inside quotes, where the words may be drawn as text), and
punctuation that does not change the picture (repeated marks, spacing around commas, a trailing
full stop, typographic quotes and dashes) made uniform. Weighting syntax such as `(word:1.2)` and
`[word]` is kept: it changes the picture.

`clean_prompt` is what the generator is sent: the same clean-up without changing case.

This module owns these text rules; the optimizer (`promptcache.optimizer.standardise`) runs
`clean_prompt` as one of its steps and forms keys with `canonical_of_clean`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass

from schemas.events import Params

# k2: the key reads `key_text` (a leading article folded), so "Man" and "a man" share a key.
KEY_SCHEMA = "k2"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2060\ufeff]")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2013": "-", "\u2014": "-", "\u00b4": "'", "`": "'"})
_WS = re.compile(r"\s+")
_REPEATED = re.compile(r"([!?.,;:])\1+")  # "!!!" -> "!", ",," -> ","
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?])")  # "fox , snow" -> "fox, snow"
_SPACE_AFTER = re.compile(r"([,;])(?=[^\s\d])")  # "fox,snow" -> "fox, snow"
_EMPTY_TAGS = re.compile(r"(,\s*){2,}")  # "a, , b" -> "a, b"
_TRAILING_STOP = re.compile(r"(?<!\d)[.!]+$")  # a final "." or "!" (not "1.")
_QUOTED = re.compile(r"(\"[^\"]*\"|'[^']*'(?!\w))")


_QUOTE_CHARS = tuple(chr(c) for c in _QUOTES)  # what translate(_QUOTES) replaces


def clean_prompt(text: str) -> str:
    """Whitespace, control characters, typographic punctuation; case untouched.

    The regexes run in order, each skipped when a substring test shows it would change nothing
    (it sits on every request's path: about 15 us instead of 120 us on a 400-character prompt).
    A test checks it against the plain sequence of regexes on real prompts and arbitrary text."""
    text = unicodedata.normalize("NFKC", text)
    printable = text.isprintable()  # no whitespace but " ", no control characters
    if not printable:
        text = _CONTROL.sub(" ", text)
    if not text.isascii() and any(c in text for c in _QUOTE_CHARS) or "`" in text:
        text = text.translate(_QUOTES)
    if not printable or "  " in text:
        text = _WS.sub(" ", text)
    if ("!!" in text or "??" in text or ".." in text or ",," in text or ";;" in text
            or "::" in text):
        text = _REPEATED.sub(r"\1", text)
    if (" ," in text or " ." in text or " ;" in text or " :" in text or " !" in text
            or " ?" in text):
        text = _SPACE_BEFORE.sub(r"\1", text)
    if ("," in text or ";" in text) and (
            "," in (rest := text.replace(", ", "")) or ";" in rest.replace("; ", "")):
        text = _SPACE_AFTER.sub(r"\1 ", text)
    if ",," in text or ", ," in text:
        text = _EMPTY_TAGS.sub(", ", text)
    # _EDGE is `^[\s,;.]+|[\s,;]+$`; whitespace is single spaces by now, so it is this strip
    return text.lstrip(" ,;.").rstrip(" ,;")


def _lower_outside_quotes(text: str) -> str:
    parts = _QUOTED.split(text)
    return "".join(part if i % 2 else part.lower() for i, part in enumerate(parts))


def canonical_prompt(text: str) -> str:
    text = _lower_outside_quotes(clean_prompt(text))
    return _TRAILING_STOP.sub("", text).strip()


def canonical_of_clean(text: str) -> str:
    """`canonical_prompt(text)` for text that is already clean (the optimizer's standardised
    text): the same string without another clean-up pass (a test checks they agree on every
    real prompt)."""
    if '"' in text or "'" in text or text.endswith((",", ";", " ")):
        return canonical_prompt(text)
    text = text.lower()
    if text.endswith((".", "!")):  # _TRAILING_STOP `(?<!\d)[.!]+$`, without a regex
        run = len(text) - len(text.rstrip(".!"))
        keep = 1 if text[-run - 1:-run].isdigit() else 0  # "1." keeps its point
        text = text[:len(text) - run + keep].strip()
    return text


_LEADING_ARTICLE = re.compile(r"^(?:a|an) (?=[^\s\"'])")


def key_text(canonical: str) -> str:
    """The canonical prompt as the exact key reads it: without one leading indefinite article.

    "Man" and "a man" ask for the same picture, and a one-word prompt never reaches the semantic
    tier (its embedding means nothing), so the exact key is where they must meet: "a"/"an" at
    the start is an exact match. Not "the": it starts names of different things ("The Rock",
    "The Who", "The Office" are not a rock, who, an office). Only the first word: an
    article inside the prompt can be content ("the letter a", "vitamin a", "plan a"), and
    differences there are the semantic tier's (its verifier ignores articles). A quoted start
    is drawn text and stays."""
    return _LEADING_ARTICLE.sub("", canonical, count=1) if canonical[:1] == "a" else canonical


_SAMPLER_ALIASES = {
    "euler a": "euler_a", "euler ancestral": "euler_a", "euler_ancestral": "euler_a",
    "k_euler": "euler", "k_euler_a": "euler_a", "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpm++ 2m": "dpmpp_2m", "dpmpp 2m": "dpmpp_2m", "ddim": "ddim",
}


@dataclass(frozen=True, slots=True)
class NormalizedParams:
    """Params with every default filled in: equal values mean the same picture."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    seed: int | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


DEFAULT_WIDTH = 1024
DEFAULT_HEIGHT = 1024
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.0
DEFAULT_SAMPLER = "euler"


def normalize_params(params: Params, *, default_model: str) -> NormalizedParams:
    sampler = _WS.sub(" ", (params.sampler or DEFAULT_SAMPLER).strip().lower())
    return NormalizedParams(
        model=(params.model or default_model).strip().lower(),
        width=params.width or DEFAULT_WIDTH,
        height=params.height or DEFAULT_HEIGHT,
        steps=params.steps or DEFAULT_STEPS,
        guidance=round(params.guidance if params.guidance is not None else DEFAULT_GUIDANCE, 2),
        sampler=_SAMPLER_ALIASES.get(sampler, sampler.replace(" ", "_")),
        seed=params.seed,
    )


def cache_key(
    canonical: str,
    negative_canonical: str | None,
    params: NormalizedParams,
    optimizer_version: str,
    scope: str | None = None,
) -> str:
    """sha256 over everything that changes the picture (the prompts as `key_text` reads them),
    and the scope (tenant) the entry belongs to; the shared scope (None) adds nothing."""
    fields: dict[str, object] = {
        "v": KEY_SCHEMA, "prompt": key_text(canonical),
        "negative": key_text(negative_canonical or ""),
        "params": params.as_dict(), "optimizer": optimizer_version}
    if scope is not None:
        fields["scope"] = scope
    material = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()
