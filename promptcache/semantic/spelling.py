"""Spelling correction of the text the semantic tier embeds (never of what the verifier reads).

A typo splits a word into sub-word pieces the embedding model has never seen together, so a
short prompt with one ("a pig in a froest", "datrh maul") can land under the similarity
threshold of the prompt it misspells and never reach the verifier. `corrected` replaces each
word that is no known word (lexicon.known_word: the spelling dictionary plus the prompt word
lists) by its most frequent dictionary neighbour one edit away (a deletion, insertion,
substitution or swap of two neighbouring letters), or leaves it when there is none. Both the
cached prompt and the lookup are embedded this way, so a typo and its correct word meet.

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


@lru_cache(maxsize=65536)
def correct_word(word: str) -> str:
    """The most frequent known word one edit from `word`, or `word` itself when it is known
    or has no such neighbour."""
    if len(word) < 4 or lx.known_word(word):
        return word
    freq = lx._dictionary()
    best, best_n = word, 0
    for cand in sorted(_edits1(word)):
        n = freq.get(cand, 0)
        if n > best_n:
            best, best_n = cand, n
    return best


def corrected(text: str) -> str:
    """`text` with its unknown lower-case words of four letters or more spelled as their most
    likely known word (quoted text is drawn text: left as written)."""
    if '"' in text:
        parts = _QUOTED.split(text)
        return "".join(p if i % 2 else corrected(p) for i, p in enumerate(parts))
    return _WORD.sub(lambda m: correct_word(m.group(0)), text)


def frequency(word: str) -> int:
    """How often the spelling dictionary saw `word` (0: unknown, or no dictionary)."""
    return lx._dictionary().get(word, 0)
