"""Weighting syntax, A1111 style: `(word)`, `((word))`, `[word]`, `(word:1.2)`; step 3 of
`promptcache.optimizer.standardise`. Pure, no I/O.

Valid syntax is kept, broken syntax repaired (an unmatched bracket is dropped), empty groups
removed, explicit weights clamped so the effective weight (the product over nested groups) stays
within [WEIGHT_MIN, WEIGHT_MAX], and nesting that would go past that range unwrapped. Prompt
editing `[a:b:0.5]` and alternation `[a|b]` carry no weight. Escaped brackets (`\\(`) are text.
"""

from __future__ import annotations

import re
import unicodedata

WEIGHT_MIN = 0.1
WEIGHT_MAX = 2.0
_STEP = 1.1  # A1111: "(x)" multiplies attention by 1.1, "[x]" divides by it
_EPS = 1e-9

_CONTENT = re.compile(r"[^\W_]")  # a letter or digit, any script
_WEIGHT_TAIL = re.compile(r":\s*([+-]?[\d.]+)\s*")
_PAIRS = {")": "(", "]": "["}
_MARK = re.compile(r"[()\[\]\\]")
_ESCAPABLE = ("(", ")", "[", "]", "\\")  # A1111: "\(" is a literal bracket


def has_content(text: str) -> bool:
    """A letter or digit, or a non-ASCII symbol (emoji, ©): something to draw."""
    if _CONTENT.search(text):
        return True
    return any(ord(c) > 127 and unicodedata.category(c)[0] == "S" for c in text)


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
    """One open weighting group while `normalise_weights` walks the text."""

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
            top.content = top.content or has_content(chunk)
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


def normalise_weights(text: str, changes: list[str]) -> str:
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
    return normalise_weights(text, [])
