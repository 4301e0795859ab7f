"""Standardise a prompt: the text the generator is sent and (lower-cased by
`promptcache.prompts.canonical_prompt`) the text the cache key is made of. Pure, no I/O.

Steps, each recorded in `Standardised.changes` when it changed something:

1. Unicode: NFKC, then every control, format, surrogate, private-use and unassigned code point
   becomes a space (a lone surrogate cannot even be encoded to UTF-8).
2. `promptcache.prompts.clean_prompt`: whitespace, typographic quotes and dashes, repeated and
   dangling punctuation, spacing around commas.
3. Weighting syntax (`(word)`, `((word))`, `[word]`, `(word:1.2)`, A1111 style): kept where it
   is valid, repaired where it is not (an unmatched bracket is dropped), empty groups removed,
   explicit weights clamped so the effective weight (the product over nested groups) stays
   within [WEIGHT_MIN, WEIGHT_MAX], and nesting that would go past that range unwrapped
   (`promptcache.optimizer.weights`).
4. Spelling variants of frequent terms folded to one spelling (`_FOLDS`), outside double quotes
   (quoted text is drawn as written).
5. Duplicate comma-separated tags dropped (case-insensitive; the first is kept).

Raises `PromptRejected` when nothing is left: `empty_prompt` (only whitespace, punctuation or
control characters) or `invalid_prompt` (only weighting syntax, only stop words).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from promptcache.optimizer.tokens import split_tags
from promptcache.optimizer.weights import WEIGHT_MAX, WEIGHT_MIN, has_content, repair_weights
from promptcache.optimizer.weights import normalise_weights as _weights
from promptcache.prompts import clean_prompt

__all__ = ["STOP_WORDS", "WEIGHT_MAX", "WEIGHT_MIN", "PromptRejected", "Standardised",
           "only_stop_words", "repair_weights", "standardise"]


class PromptRejected(ValueError):
    """Nothing usable is left of the prompt. `code` is `empty_prompt` or `invalid_prompt`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Standardised:
    text: str
    changes: tuple[str, ...]
    tags: tuple[str, ...]  # `split_tags(text)`, already computed


# Spelling variants measured in ../shared/data/prompts (15,498 prompts; counts in the comments:
# the kept spelling first). Only variants that ask for the same picture: hyphenation, spacing and
# misspellings. "Same tokens": CLIP reads both as the same ids (it ignores spaces, and digits are
# single tokens), so folding changes only the cache key. Not folded on purpose: "hd" / "high
# definition", "realistic" / "realism", "unreal engine" / "unreal engine 5", "photoreal".
# Each row: regex, spelling, and literals one of which every variant contains once hyphens are
# unspaced; the regex runs only when one is there (most prompts run none).
_SEP = r"(?:\s*-\s*|\s+)"  # "a-b", "a - b", "a b"
_FOLD_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (rf"photo{_SEP}realistic", "photorealistic",  # 363; 44 + 7
     ("photo realistic", "photo-realistic")),
    (rf"hyper{_SEP}realistic", "hyperrealistic",  # 241; 184 + 37
     ("hyper realistic", "hyper-realistic")),
    (rf"hyper{_SEP}realism", "hyperrealism", ("hyper realism", "hyper-realism")),  # 114; 105
    (r"ultra\s*-\s*realistic|ultrarealistic", "ultra realistic",  # 178; 22 + 5
     ("ultra-realistic", "ultrarealistic")),
    (r"hyper\s*-\s*detailed|hyperdetailed", "hyper detailed",  # 200; 103 + 24
     ("hyper-detailed", "hyperdetailed")),
    (r"highly\s*-\s*detailed", "highly detailed", ("highly-detailed",)),  # 1659; 11
    (r"ultra\s*-\s*detailed|ultradetailed", "ultra detailed",  # 129; 26
     ("ultra-detailed", "ultradetailed")),
    (r"8\s+k", "8k", ("8 k",)),  # 411; 897, same tokens
    (r"4\s+k", "4k", ("4 k",)),  # 267; 460, same tokens
    (r"3\s*-?\s*d", "3d", ("3 d", "3-d")),  # 107; 262, same
    (r"art\s+station", "artstation", ("art station",)),  # 2408; 64
    (r"deviant\s+art", "deviantart", ("deviant art",)),  # 110; 7
    (r"cg\s+society", "cgsociety", ("cg society",)),  # 164; 4
    (r"ue\s*5|unreal\s+engine5", "unreal engine 5", ("ue5", "ue 5", "engine5")),  # 194; 7
    (r"ue\s*4|unreal\s+engine4", "unreal engine 4", ("ue4", "ue 4", "engine4")),
    (r"octanerender", "octane render", ("octanerender",)),  # 796; 1
    (rf"sci{_SEP}fi|scifi", "sci-fi", ("sci fi", "sci-fi", "scifi")),  # 76; 120 + 107 + 46
    (rf"cyber{_SEP}punk", "cyberpunk", ("cyber punk", "cyber-punk")),  # 447; 4
    (rf"steam{_SEP}punk", "steampunk", ("steam punk", "steam-punk")),  # 82; 1
    (r"ray\s*-\s*tracing|raytracing", "ray tracing", ("ray-tracing", "raytracing")),  # 131; 46
    (r"ray\s*-\s*traced|raytraced", "ray traced", ("ray-traced", "raytraced")),  # 6; 8
    (r"depth\s*-\s*of\s*-\s*field", "depth of field", ("depth-of-field",)),  # 152; 1
    (r"conceptart", "concept art", ("conceptart",)),  # 1310; 2
    (r"mattepainting", "matte painting", ("mattepainting",)),  # 186; 3
    (r"digitalart", "digital art", ("digitalart",)),
    (r"greg\s+rutkowsky|greg\s+rutkowksi", "greg rutkowski",  # 1369; 5
     ("rutkowsky", "rutkowksi")),
)
# The boundary checks are done in Python after a match (`_bounded`): a pattern that starts
# with a lookbehind makes the regex engine try every position, ten times slower.
# Patterns run on the lower-cased text, case-sensitive: IGNORECASE would cost the regex
# engine its literal-prefix scan (ten times slower again).
_FOLDS = tuple((re.compile(pattern), repl, keys) for pattern, repl, keys in _FOLD_TABLE)
_FOLD_KEYS = tuple(sorted({k for _, _, keys in _FOLD_TABLE for k in keys}))

STOP_WORDS = frozenset(
    "a an the of and or but in on at to with without by for from into onto over under up down "
    "is are was were be been being it its this that these those as very some any no not so "
    "then than there here i me my we our you your he him his she her they them their".split())

_QUOTED = re.compile(r'("[^"]*")')
_WORD = re.compile(r"[^\W_]+")
_MARKS_NEAR = re.compile(r"[!?.,;:] ?[!?.,;:]")


def _unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(c if c.isprintable() or c in "\t\n\r" else " " for c in text)


def _bounded(match: re.Match[str]) -> bool:
    """The match is whole words: no letter, digit, "_" or "-" on either side, and a number is
    not the tail of a longer one ("1.8 k", DiffusionDB's spaced digits "1 8 k")."""
    text, i, j = match.string, match.start(), match.end()
    before = text[i - 1] if i else " "
    after = text[j] if j < len(text) else " "
    if before.isalnum() or before in "-_" or after.isalnum() or after in "-_":
        return False
    return not (text[i].isdigit() and (before == "." or (
        i >= 2 and before.isspace() and text[i - 2].isdigit())))


def _fold_part(text: str, rows: list[tuple[re.Pattern[str], str]],
               changes: list[str]) -> str:
    for pattern, repl in rows:
        lowered = text.lower()
        if len(lowered) != len(text):  # "İ" lower-cases to two characters: positions differ
            return text
        out: list[str] = []
        last = 0
        for match in pattern.finditer(lowered):
            if match[0] == repl or not _bounded(match):  # already this spelling / not a word
                continue
            changes.append(f"spelling: {text[match.start():match.end()]!r} -> {repl!r}")
            out += [text[last:match.start()], repl]
            last = match.end()
        if out:
            text = "".join(out) + text[last:]
    return text


def _fold(text: str, changes: list[str]) -> str:
    """Step 4: one spelling for each frequent term, outside double-quoted text."""
    lowered = text.lower().replace(" - ", "-").replace(" -", "-").replace("- ", "-")
    found = {key for key in _FOLD_KEYS if key in lowered}  # 44 substring tests: ~8 us
    if not found:  # most prompts
        return text
    rows = [(pattern, repl) for pattern, repl, keys in _FOLDS if found.intersection(keys)]
    if '"' not in text:
        return _fold_part(text, rows, changes)
    parts = _QUOTED.split(text)
    return "".join(part if k % 2 else _fold_part(part, rows, changes)
                   for k, part in enumerate(parts))  # odd parts are quoted


def _dedupe(text: str, changes: list[str]) -> tuple[str, list[str]]:
    """Step 5: drop repeated comma-separated tags, case-insensitively, keeping the first.
    Returns the text and its tags."""
    if "," not in text:
        return text, [text]
    tags = split_tags(text)
    lowered = [tag.lower() for tag in tags]  # clean text: spaces are single already
    if len(set(lowered)) == len(lowered):
        return text, tags
    first = {key: i for i, key in reversed(list(enumerate(lowered)))}
    changes += [f"duplicate tag removed: {key!r}" for i, key in enumerate(lowered)
                if first[key] != i]
    kept = [tag for i, (tag, key) in enumerate(zip(tags, lowered, strict=True))
            if first[key] == i]
    return ", ".join(kept), kept


def only_stop_words(text: str) -> bool:
    """True when every word is a stop word (and there is no other symbol to draw)."""
    found = False
    for match in _WORD.finditer(text):
        if match[0].lower() not in STOP_WORDS:
            return False
        found = True
    return found and not any(ord(c) > 127 and unicodedata.category(c)[0] == "S" for c in text)


def _clean(text: str) -> str:
    """`clean_prompt` until nothing changes: one pass can bring two marks together ("0: :" ->
    "0::"), which the next folds ("0:"); that needs two marks at most a space apart."""
    for _ in range(4):
        cleaned = clean_prompt(text)
        if cleaned == text or not _MARKS_NEAR.search(cleaned):
            return cleaned
        text = cleaned
    return text


def standardise(prompt: str) -> Standardised:
    """The standardised prompt and what changed; raises PromptRejected when nothing is left."""
    changes: list[str] = []
    text = plain = _unicode(prompt)
    if text != prompt:
        changes.append("unicode normalised (NFKC, control characters)")
    cleaned = _clean(text)
    if not has_content(cleaned):
        raise PromptRejected("empty_prompt", "the prompt is empty after standardisation "
                             "(only whitespace, punctuation or control characters)")
    text = _weights(cleaned, changes)
    if not has_content(text):
        raise PromptRejected("invalid_prompt", "the prompt is only weighting syntax")
    if text != cleaned:
        text = _clean(text)  # a removed group can leave ", ," or two spaces behind
    text, tags = _dedupe(_fold(text, changes), changes)  # both keep clean text clean
    if cleaned != plain:
        changes.insert(0, "whitespace and punctuation")
    if only_stop_words(text):
        raise PromptRejected("invalid_prompt", "the prompt has only stop words "
                             "(a, the, of, ...): nothing to draw")
    if not has_content(text):
        raise PromptRejected("empty_prompt", "the prompt is empty after standardisation")
    return Standardised(text, _counted(changes), tuple(tags))


def _counted(changes: list[str]) -> tuple[str, ...]:
    """The same message once, with a count: "spelling: 'x' -> 'y' (x4)"."""
    counts: dict[str, int] = {}
    for change in changes:
        counts[change] = counts.get(change, 0) + 1
    return tuple(c if n == 1 else f"{c} (x{n})" for c, n in counts.items())
