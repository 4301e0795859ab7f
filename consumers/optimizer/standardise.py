"""Standardise a prompt: the text the generator is sent and (lower-cased by
`consumers.prompts.canonical_prompt`) the text the cache key is made of. Pure, no I/O.

Steps, each recorded in `Standardised.changes` when it changed something:

1. Unicode: NFKC, then every control, format, surrogate, private-use and unassigned code point
   becomes a space (a lone surrogate cannot even be encoded to UTF-8).
2. `consumers.prompts.clean_prompt`: whitespace, typographic quotes and dashes, repeated and
   dangling punctuation, spacing around commas.
3. Weighting syntax (`(word)`, `((word))`, `[word]`, `(word:1.2)`, A1111 style): kept where it
   is valid, repaired where it is not (an unmatched bracket is dropped), empty groups removed,
   explicit weights clamped so the effective weight (the product over nested groups) stays
   within [WEIGHT_MIN, WEIGHT_MAX], and nesting that would go past that range unwrapped.
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

from consumers.optimizer.tokens import split_tags
from consumers.prompts import clean_prompt

WEIGHT_MIN = 0.1
WEIGHT_MAX = 2.0
_STEP = 1.1  # A1111: "(x)" multiplies attention by 1.1, "[x]" divides by it
_EPS = 1e-9


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
_CONTENT = re.compile(r"[^\W_]")  # a letter or digit, any script
_WORD = re.compile(r"[^\W_]+")
_WEIGHT_TAIL = re.compile(r":\s*([+-]?[\d.]+)\s*")
_PAIRS = {")": "(", "]": "["}
_MARK = re.compile(r"[()\[\]\\]")
_MARKS_NEAR = re.compile(r"[!?.,;:] ?[!?.,;:]")
_ESCAPABLE = ("(", ")", "[", "]", "\\")  # A1111: "\(" is a literal bracket


def _has_content(text: str) -> bool:
    """A letter or digit, or a non-ASCII symbol (emoji, ©): something to draw."""
    if _CONTENT.search(text):
        return True
    return any(ord(c) > 127 and unicodedata.category(c)[0] == "S" for c in text)


def _unicode(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(c if c.isprintable() or c in "\t\n\r" else " " for c in text)


def _pair_brackets(text: str) -> tuple[dict[int, int], int]:
    """Matching bracket positions (opener -> closer, closer -> opener) and how many were dropped.

    A closer whose opener is deeper in the stack closes it and drops the openers above it; a
    closer with no opener of its kind open is dropped; openers left at the end are dropped.
    Escaped brackets (`\\(`) are text. Linear: every opener is pushed and popped once.
    """
    partner: dict[int, int] = {}
    stack: list[int] = []
    open_count = {"(": 0, "[": 0}
    dropped = 0
    skip = -1  # the position of a character escaped by a backslash
    for match in _MARK.finditer(text):  # only the marks, not every character
        i, c = match.start(), match[0]
        if i == skip:
            continue
        if c == "\\":
            if text[i + 1:i + 2] in _ESCAPABLE:
                skip = i + 1
        elif c in "([":
            stack.append(i)
            open_count[c] += 1
        elif open_count[want := _PAIRS[c]] == 0:
            dropped += 1
        else:
            while True:
                j = stack.pop()
                open_count[text[j]] -= 1
                if text[j] == want:
                    partner[j], partner[i] = i, j
                    break
                dropped += 1
    return partner, dropped + len(stack)


def _fmt_weight(w: float) -> str:
    return f"{w:.2f}".rstrip("0").rstrip(".")


class _Frame:
    """One open weighting group while `_weights` walks the text."""

    __slots__ = ("close", "content", "cum", "end", "kind", "out", "weight")

    def __init__(self, *, end: int, close: int, cum: float, kind: str,
                 weight: float | None) -> None:
        self.end, self.close, self.cum, self.kind, self.weight = end, close, cum, kind, weight
        self.out: list[str] = []
        self.content = False

    def render(self) -> str:
        body = "".join(self.out).strip()
        if (len(body) - len(body.rstrip("\\"))) % 2:  # a lone "\" must not escape the closer
            body += " "
        if self.kind == "":
            return body
        if self.weight is not None:
            return f"({body}:{_fmt_weight(self.weight)})"
        return f"({body})" if self.kind == "(" else f"[{body}]"


def _open(text: str, i: int, close: int, parent: _Frame, counts: dict[str, int]) -> _Frame:
    """The frame for the group text[i]..text[close]: its kind, weight and cumulative weight."""
    c, end, weight = text[i], close, None
    kind, factor = c, (_STEP if c == "(" else 1 / _STEP)
    colon = text.rfind(":", max(i + 1, close - 24), close)
    if c == "(" and colon >= 0 and _WEIGHT_TAIL.fullmatch(text, colon, close):
        end = colon
        try:
            written = float(text[colon + 1:close].strip())
        except ValueError:  # "1.2.3" is no number: keep the group at weight 1
            written = 1.0
            counts["clamped"] += 1
        w = min(max(written, WEIGHT_MIN), WEIGHT_MAX)
        w = round(min(max(w, WEIGHT_MIN / parent.cum), WEIGHT_MAX / parent.cum), 2)
        if parent.cum * w > WEIGHT_MAX + _EPS:  # rounding went past the bound
            w = round(w - 0.01, 2)
        elif parent.cum * w < WEIGHT_MIN - _EPS:
            w = round(w + 0.01, 2)
        if abs(w - written) > _EPS:
            counts["clamped"] += 1
        weight, factor = w, w
    elif c == "[" and (text.find(":", i + 1, close) >= 0 or text.find("|", i + 1, close) >= 0):
        kind, factor = "[", 1.0  # prompt editing `[a:b:0.5]` / alternation `[a|b]`: no weight
    cum = parent.cum * factor
    if weight is None and not WEIGHT_MIN - _EPS <= cum <= WEIGHT_MAX + _EPS:
        kind, cum = "", parent.cum  # one more level would leave the range: unwrap it
        counts["unwrapped"] += 1
    return _Frame(end=end, close=close, cum=cum, kind=kind, weight=weight)


def _weights_pass(text: str, changes: list[str]) -> str:
    """One pass of step 3. Iterative (any depth is safe); jumps from mark to mark."""
    partner, dropped = _pair_brackets(text)
    if dropped:
        changes.append(f"dropped {dropped} unmatched bracket(s)")
    stack = [_Frame(end=len(text), close=len(text), cum=1.0, kind="", weight=None)]
    counts = {"clamped": 0, "unwrapped": 0, "emptied": 0}
    i, n = 0, len(text)
    while i < n:
        top = stack[-1]
        mark = _MARK.search(text, i, top.end)
        j = mark.start() if mark else top.end
        if j > i:  # plain text up to the next mark
            chunk = text[i:j]
            top.out.append(chunk)
            top.content = top.content or _has_content(chunk)
            i = j
        elif len(stack) > 1 and i == top.end:  # the group's text ends here
            stack.pop()
            if top.content:
                stack[-1].out.append(top.render())
                stack[-1].content = True
            else:
                counts["emptied"] += 1
            i = top.close + 1
        elif text[i] == "\\" and text[i + 1:i + 2] in _ESCAPABLE:
            top.out.append(text[i:i + 2])
            top.content = True
            i += 2
        elif i in partner and text[i] in "([":
            frame = _open(text, i, partner[i], top, counts)
            stack.append(frame)
            i += 1
            while i < frame.end and text[i].isspace():
                i += 1
        else:  # an unmatched bracket is dropped; a lone backslash is text
            if text[i] == "\\":
                top.out.append("\\")
            i += 1
    if counts["clamped"]:
        changes.append(f"clamped {counts['clamped']} weight(s) to [{WEIGHT_MIN}, {WEIGHT_MAX}]")
    if counts["unwrapped"]:
        changes.append(f"unwrapped {counts['unwrapped']} bracket level(s) past the weight range")
    if counts["emptied"]:
        changes.append(f"removed {counts['emptied']} empty weighting group(s)")
    return "".join(stack[0].out)


def _weights(text: str, changes: list[str]) -> str:
    """Repair, clamp and tidy the weighting syntax (step 3). A pass can expose more to do
    (`(:0())` loses its empty inner group and is then an empty weighted one): passes repeat
    until nothing changes, at most four."""
    for _ in range(4):
        if not any(c in text for c in "()[]"):
            break
        new = _weights_pass(text, changes)
        if new == text:
            break
        text = new
    return text


def repair_weights(text: str) -> str:
    """Step 3 alone: for text cut short (a prompt trimmed to the token window mid-group)."""
    return _weights(text, [])


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
    if not _has_content(cleaned):
        raise PromptRejected("empty_prompt", "the prompt is empty after standardisation "
                             "(only whitespace, punctuation or control characters)")
    text = _weights(cleaned, changes)
    if not _has_content(text):
        raise PromptRejected("invalid_prompt", "the prompt is only weighting syntax")
    if text != cleaned:
        text = _clean(text)  # a removed group can leave ", ," or two spaces behind
    text, tags = _dedupe(_fold(text, changes), changes)  # both keep clean text clean
    if cleaned != plain:
        changes.insert(0, "whitespace and punctuation")
    if only_stop_words(text):
        raise PromptRejected("invalid_prompt", "the prompt has only stop words "
                             "(a, the, of, ...): nothing to draw")
    if not _has_content(text):
        raise PromptRejected("empty_prompt", "the prompt is empty after standardisation")
    return Standardised(text, _counted(changes), tuple(tags))


def _counted(changes: list[str]) -> tuple[str, ...]:
    """The same message once, with a count: "spelling: 'x' -> 'y' (x4)"."""
    counts: dict[str, int] = {}
    for change in changes:
        counts[change] = counts.get(change, 0) + 1
    return tuple(c if n == 1 else f"{c} (x{n})" for c, n in counts.items())
