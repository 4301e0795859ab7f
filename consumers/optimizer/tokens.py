"""The CLIP 77-token window: count, fit and truncate prompts. Pure, no I/O.

Stable Diffusion's text encoders (CLIP ViT-L/14; SDXL's OpenCLIP ViT-bigG uses the same BPE) read
77 tokens, of which `<start_of_text>` and `<end_of_text>` take two: 75 are usable. Tokens are
counted with `instant-clip-tokenizer`, a Rust port of OpenAI's `simple_tokenizer.py` with
`bpe_simple_vocab_16e6.txt` compiled into its extension module (nothing is downloaded, no torch).
It skips two steps of the original: `ftfy.fix_text` and `html.unescape`; our standardisation
already makes quotes and dashes plain, and `html.unescape` is done here. On the 15,498 prompts in
../shared/data/prompts (after `clean_prompt`) its ids equal the original's for every prompt.

Weighting syntax is counted as written: a truncating backend reads `(cat:1.2)` as seven tokens;
a backend that parses the syntax (A1111) also splits long prompts into chunks and truncates
nothing, so counting the brackets errs on the safe side.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from functools import lru_cache

import instant_clip_tokenizer

CONTEXT_LENGTH = 77
WINDOW = CONTEXT_LENGTH - 2  # minus <start_of_text> and <end_of_text>

_tokenizer = instant_clip_tokenizer.Tokenizer()
_TAG_SPLIT = re.compile(r"(?<!\d),|,(?!\d)")


def split_tags(text: str) -> list[str]:
    """Comma-separated tags at the top level. A comma inside brackets or double quotes, or
    between two digits ("1,000"), does not split."""
    if not any(c in text for c in '"([)]'):
        return [t for t in (t.strip() for t in _TAG_SPLIT.split(text)) if t]
    tags: list[str] = []
    depth, quoted, start = 0, False, 0
    last = len(text) - 1
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(depth - 1, 0)
        elif (c == "," and depth == 0
              and not (0 < i < last and text[i - 1].isdigit() and text[i + 1].isdigit())):
            tags.append(text[start:i].strip())
            start = i + 1
    tags.append(text[start:].strip())
    return [t for t in tags if t]


def _prepare(text: str) -> str:
    if "&" in text:
        text = html.unescape(html.unescape(text))  # as CLIP's basic_clean does
    # A lone surrogate cannot cross into Rust; standardised text has none, but stay total.
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text


def encode(text: str) -> list[int]:
    """CLIP BPE token ids, without the start and end markers."""
    return list(_tokenizer.encode(_prepare(text)))  # a fresh list the caller may keep


def count(text: str) -> int:
    """How many of the 75 usable tokens `text` takes."""
    return len(_tokenizer.encode(_prepare(text)))


def fits(text: str) -> bool:
    return count(text) <= WINDOW


@lru_cache(maxsize=4096)
def count_tag(tag: str) -> int:
    """Token count of a fixed string (enhancers, default negatives): cached."""
    return count(tag)


def window_text(text: str) -> str:
    """`text` as a truncating backend reads it: unchanged when it fits, else its first 75 tokens
    decoded (CLIP's own lower-case spelling). Two prompts that differ only past the window give
    the same string, which is what the cache key of a truncating generator needs."""
    ids = _tokenizer.encode(_prepare(text))
    if len(ids) <= WINDOW:
        return text
    return str(_tokenizer.decode(ids[:WINDOW])).strip()


@dataclass(frozen=True, slots=True)
class Fitted:
    text: str
    tokens: int
    dropped: tuple[str, ...]  # what did not fit, in the order it was dropped


def _cut_words(text: str, budget: int) -> str:
    """The longest prefix of `text`, cut between words, that takes at most `budget` tokens.
    A first word longer than the budget is cut between characters. Binary search: O(log n)."""
    if count(text) <= budget:
        return text
    cuts = [i for i, c in enumerate(text) if c == " "]
    lo, hi, best = 0, len(cuts) - 1, ""
    while lo <= hi:  # largest cut whose prefix fits
        mid = (lo + hi) // 2
        prefix = text[:cuts[mid]].rstrip(" ,")
        if count(prefix) <= budget:
            best, lo = prefix, mid + 1
        else:
            hi = mid - 1
    if best:
        return best
    lo, hi = 1, len(text)
    while lo < hi:  # no word boundary fits: cut the first word between characters
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()


def _summable(items: list[str]) -> bool:
    """Whether token counts of `items` add up exactly when joined by ", ": CLIP splits words at
    spaces and punctuation, so they do unless an item ends in punctuation, which runs into the
    comma (`"(a),"` is one word to CLIP)."""
    return all(item[-1:].isalnum() for item in items[:-1])


def fit(tags: list[str], extras: list[str], budget: int = WINDOW, *,
        tags_count: int | None = None) -> Fitted:
    """Join `tags` (the user's, most important first) and `extras` (enhancers) with ", " within
    `budget` tokens: extras are dropped first, from the last; then the user's trailing tags;
    then, if the first tag alone is too long, its trailing words. `tags_count`, when known, is
    the count of `", ".join(tags)`.

    The fast path (everything fits) encodes at most once; a ", " is one token.
    """
    joined = ", ".join(tags + extras)
    n_tags = tags_count if tags_count is not None else (count(", ".join(tags)) if tags else 0)
    total = n_tags + sum(count_tag(e) + 1 for e in extras) - (0 if tags else 1 if extras else 0)
    if total <= budget:
        if not _summable(tags[-1:] + extras):
            total = count(joined)
        if total <= budget:
            return Fitted(joined, total, ())
    return _fit_slow(tags, extras, budget)


def _fit_slow(tags: list[str], extras: list[str], budget: int) -> Fitted:
    dropped: list[str] = []
    kept = list(tags)
    extra = list(extras)
    while True:
        sizes = [count(t) for t in kept] + [count_tag(e) for e in extra]
        total = sum(sizes) + max(len(sizes) - 1, 0)
        while total > budget and extra:
            e = extra.pop()
            dropped.append(e)
            total -= count_tag(e) + 1
        while total > budget and len(kept) > 1:
            t = kept.pop()
            dropped.append(t)
            total -= count(t) + 1
        if total > budget and kept:
            short = _cut_words(kept[0], budget)
            if short != kept[0]:
                dropped.append(kept[0][len(short):].strip(" ,"))
            kept = [short]
        text = ", ".join(kept + extra)
        n = count(text)
        if n <= budget:
            return Fitted(text, n, tuple(d for d in dropped if d))
        if extra:  # a punctuation run merged with a comma: drop one more and count again
            dropped.append(extra.pop())
        elif len(kept) > 1:
            dropped.append(kept.pop())
        elif budget > 1:  # unreachable (one tag is cut to fit); kept so the loop always ends
            budget -= 1
        else:
            return Fitted("", 0, tuple(dropped))
