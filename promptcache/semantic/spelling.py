"""Spelling correction of the text the semantic tier embeds (never of what the verifier reads).

A typo splits a word into sub-word pieces the embedding model has never seen together, so a
short prompt with one ("a pig in a froest", "datrh maul") can land under the similarity
threshold of the prompt it misspells and never reach the verifier. `corrected` replaces each
word that is no known word (lexicon.known_word: the spelling dictionary plus the prompt word
lists) by its most frequent dictionary neighbour that it is a slip of the finger for (a letter
dropped, doubled or added, two letters swapped, one replaced by a neighbouring key; `slip`, also
the verifier's typo rule), or leaves it when there is none. Both the cached prompt and the
lookup are embedded this way, so a typo and its correct word meet.

This only decides which cached prompts are compared: whether one may answer is still the
verifier's call on the prompts as written, so a wrong correction costs at most a hit.
"""

from __future__ import annotations

import re
from functools import lru_cache

from promptcache.semantic import lexicon as lx

_WORD = re.compile(r"(?<![\w'])[a-z]{4,}(?![\w'])")
_QUOTED = re.compile(r'("[^"]*")')
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _edits1(w: str) -> set[str]:
    splits = [(w[:i], w[i:]) for i in range(len(w) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in _LETTERS}
    out |= {a + c + b for a, b in splits for c in _LETTERS}
    out.discard(w)
    return out


_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_KEY = {c: (r, i) for r, row in enumerate(_ROWS) for i, c in enumerate(row)}
_VOWELS = frozenset("aeiouy")


def _adjacent_keys(x: str, y: str) -> bool:
    """Neighbouring keys on a QWERTY keyboard ("s" touches "w", "e", "a", "d", "z", "x")."""
    if x not in _KEY or y not in _KEY:
        return False
    (rx, cx), (ry, cy) = _KEY[x], _KEY[y]
    if rx == ry:
        return abs(cx - cy) == 1
    if ry == rx - 1:  # y in the row above: the keys up-left and up-right of x
        return cy in (cx, cx + 1)
    if ry == rx + 1:
        return cy in (cx - 1, cx)
    return False


def slip(x: str, y: str) -> bool:
    """Is the difference between two words one edit apart one a finger makes: a letter dropped, doubled or added, two letters
    swapped, or one replaced by a neighbouring key ("tunbling"/"tumbling") or, in a word of six
    letters or more, a vowel by another ("rutkowsky"/"rutkowski"); not any letter by any other:
    "witcher"/"witches" or "pepe"/"pope" are no slips, whatever the dictionary knows?"""
    if len(x) != len(y):
        return True
    diff = [i for i in range(len(x)) if x[i] != y[i]]
    if len(diff) != 1:
        return True
    cx, cy = x[diff[0]], y[diff[0]]
    return _adjacent_keys(cx, cy) or (cx in _VOWELS and cy in _VOWELS and len(x) >= 6)


@lru_cache(maxsize=65536)
def correct_word(word: str) -> str:
    """The most frequent known word that `word` is a slip of (one edit, `slip`, the first
    letter kept unless the first two are swapped: the verifier's typo rule), or `word` itself
    when it is known or has no such neighbour."""
    if len(word) < 4 or lx.known_word(word):
        return word
    freq = lx._dictionary()
    best, best_n = word, 0
    for cand in sorted(_edits1(word)):
        n = freq.get(cand, 0)
        if n > best_n and (cand[0] == word[0] or cand[:2] == word[1::-1]) and slip(word, cand):
            best, best_n = cand, n
    return best


def corrected(text: str) -> str:
    """`text` with its unknown lower-case words of four letters or more spelled as their most
    likely known word (quoted text is drawn text: left as written)."""
    if '"' not in text:
        return _spelled(text)
    # quoted stretches stay as written; an unmatched quote is plain text (never a recursion)
    parts = _QUOTED.split(text)
    return "".join(p if i % 2 else _spelled(p) for i, p in enumerate(parts))


def _spelled(text: str) -> str:
    return _WORD.sub(lambda m: correct_word(m.group(0)), text)


def frequency(word: str) -> int:
    """How often the spelling dictionary saw `word` (0: unknown, or no dictionary)."""
    return lx._dictionary().get(word, 0)
