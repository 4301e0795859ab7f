"""The CLIP 77-token window: count, fit and truncate prompts. Pure, no I/O.

Stable Diffusion's text encoders (CLIP ViT-L/14; SDXL's OpenCLIP ViT-bigG uses the same BPE) read
77 tokens, of which `<start_of_text>` and `<end_of_text>` take two: 75 are usable. Tokens are
counted with `instant-clip-tokenizer`, a Rust port of OpenAI's `simple_tokenizer.py` with
`bpe_simple_vocab_16e6.txt` compiled into its extension module (nothing is downloaded, no torch).
It skips two steps of the original: `ftfy.fix_text` and `html.unescape`; our standardisation
already makes quotes and dashes plain, and `html.unescape` is done here. On the 15,498 prompts in
../shared/data/prompts (after `clean_prompt`) and on the 30,646 prompts and negatives `optimize`
makes of them, its ids equal those of OpenAI's `simple_tokenizer.py` for every one.

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
_TAG_MARKS = re.compile(r'[",()\[\]]')
_DIGIT_COMMA = re.compile(r"\d,\d")
_LONG = 300  # characters of tags past which `fit` counts tag by tag (75 tokens ~ 350 chars)


def split_tags(text: str) -> list[str]:
    """Comma-separated tags at the top level. A comma inside brackets or double quotes, or
    between two digits ("1,000"), does not split."""
    if not ('"' in text or "(" in text or "[" in text or ")" in text or "]" in text):
        pieces = text.split(",")
        if _DIGIT_COMMA.search(text):  # "1,000": glue digit,digit back
            merged = [pieces[0]]
            for piece in pieces[1:]:
                if merged[-1][-1:].isdigit() and piece[:1].isdigit():
                    merged[-1] += "," + piece
                else:
                    merged.append(piece)
            pieces = merged
        return [t for p in pieces if (t := p.strip())]
    tags: list[str] = []
    depth, quoted, start, last = 0, False, 0, len(text) - 1
    for match in _TAG_MARKS.finditer(text):  # only the marks, not every character
        c, i = match[0], match.start()
        if c == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(depth - 1, 0)
        elif depth == 0 and not (0 < i < last and text[i - 1].isdigit()
                                 and text[i + 1].isdigit()):
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
    the same string. (`optimize` keys a truncating backend on the tags that fit instead: the
    generator is never sent a tag cut in half, so that key is exact and no coarser.)"""
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

    A ", " is one token and the extras' counts are cached, so while the user's tags fit this
    encodes at most once; a long prompt is counted tag by tag, once.
    """
    if tags_count is None and sum(map(len, tags)) > _LONG:
        return _fit_tags(tags, extras, budget)
    n_tags = tags_count if tags_count is not None else (count(", ".join(tags)) if tags else 0)
    if n_tags > budget:
        return _fit_tags(tags, extras, budget)
    kept = list(extras)
    dropped: list[str] = []
    total = n_tags + sum(count_tag(e) + 1 for e in kept) - (0 if tags or not kept else 1)
    while total > budget and kept:
        e = kept.pop()
        dropped.append(e)
        total -= count_tag(e) + (1 if tags or kept else 0)
    joined = ", ".join(tags + kept)
    if kept and not _summable(tags[-1:] + kept):  # a punctuation run met a comma: count it
        total = count(joined)
        if total > budget:
            return _fit_exact(tags, extras, budget)
    return Fitted(joined, total, tuple(dropped))


def _fit_tags(tags: list[str], extras: list[str], budget: int) -> Fitted:
    """`fit` from per-tag counts, counting only as far as the window reaches: the kept tags
    are the longest run from the first that fits (what dropping from the end leaves)."""
    total, kept = -1, 0  # -1: n items take n - 1 separators
    for tag in tags:
        size = count(tag) + 1
        if total + size > budget and kept:
            break
        total += size
        kept += 1
    extra: list[str] = []
    if kept == len(tags):
        for e in extras:
            if total + count_tag(e) + 1 > budget:
                break
            total += count_tag(e) + 1
            extra.append(e)
    dropped = extras[len(extra):][::-1] + tags[kept:][::-1]
    items = tags[:kept] + extra
    if total <= budget and _summable(items):
        return Fitted(", ".join(items), max(total, 0), tuple(dropped))
    return _fit_exact(tags[:kept], extra, budget, dropped)


def _fit_exact(tags: list[str], extras: list[str], budget: int,
               dropped: list[str] | None = None) -> Fitted:
    """`fit` counting the joined text after every step: for punctuation that runs into commas,
    and for a first tag that alone is too long (cut between words)."""
    dropped = list(dropped or [])
    kept, extra = list(tags), list(extras)
    while True:
        text = ", ".join(kept + extra)
        n = count(text)
        if n <= budget:
            return Fitted(text, n, tuple(d for d in dropped if d))
        if extra:
            dropped.append(extra.pop())
        elif len(kept) > 1:
            dropped.append(kept.pop())
        elif kept and (short := _cut_words(kept[0], budget)) != kept[0]:
            dropped.append(kept[0][len(short):].strip(" ,"))
            kept = [short]
        else:  # unreachable: a cut text fits; kept so that the loop always ends
            return Fitted("", 0, tuple(dropped))
