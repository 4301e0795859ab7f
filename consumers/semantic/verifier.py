"""Does serving the cached image of prompt `a` answer prompt `b`? A rule-based check, no model.

`verify(a, b)` compares two CANONICAL prompts (`consumers.prompts.canonical_prompt`) and accepts
only when every difference between them is harmless wording:

- request phrasing and politeness ("generate an image of", "draw me", "pls", "thank you", ":)"),
  articles, punctuation and separators (",", ";", "|", "."), hyphens, case outside quotes;
- synonyms and spellings that ask for the same picture (lexicon.SYNONYM_GROUPS, colour/color,
  number words and digits), compounds written apart ("art station" / "artstation");
- a typo: one edit (two for long words) between words of at least 4 letters, of which at most
  one is a known word (so "house"/"mouse" or "black"/"back" are never typos);
- reordering of whole tags or sentences, and dropped separators inside an otherwise equal text.

Anything else refuses, named by the most telling category of the words that differ: `text`
(quoted text), `weight` (emphasis syntax), `negation`, `count` (also singular/plural), `color`,
`gender`, `age`, `spatial`, `time_of_day`, `season_weather`, `species`, `medium`, `style`,
`artist`, `subject` (another noun), `other`; or, when both use the same words in another order,
`binding` (which attribute goes with which object), `spatial` or `role` (who does what to whom).
When in doubt it refuses: a miss costs one generation, a wrong hit serves the wrong picture.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from consumers.semantic import lexicon as lx

REASONS = ("text", "weight", "negation", "count", "color", "age", "gender", "season_weather",
           "time_of_day", "spatial", "species", "medium", "style", "artist", "subject",
           "other", "preposition", "binding", "role", "empty")


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str | None
    detail: str


OK = Verdict(True, None, "")

# ---------------------------------------------------------------------------- parsing

_DQUOTED = re.compile(r'"([^"]*)"')
_PREFIX = re.compile(
    r"^(?:(?:please|pls|plz|kindly)\s+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
    rf"(?:(?:{lx.REQUEST_VERBS})(?:\s+(?:me|us))?|i\s+(?:want|need|would\s+like|'d\s+like|wanna)"
    r"(?:\s+to\s+see)?|(?:show|give)\s+me)\s+(?:please\s+)?"
    rf"(?:(?:a|an|the)\s+)?(?:(?:{lx.REQUEST_NOUNS})\s+of\s+)?"
)
_NOUN_PREFIX = re.compile(rf"^(?:(?:a|an|the)\s+)?(?:{lx.REQUEST_NOUNS})\s+of\s+")
_SUFFIX = re.compile(rf"[\s,;.!]*(?:(?<![\w'])(?:{lx.POLITE_SUFFIX})(?!\w)|:\)|:-\)|<3)[\s,;.!]*$")
_EMOTICON = re.compile(r"(?<![\w(])[:;=]-?[)(dp](?![\w:])")
_WEIGHT = re.compile(r":\s*(-?\d+(?:\.\d+)?)(?![\w.])")
_TOKEN = re.compile(
    r"(?P<o>[(\[{])|(?P<c>[)\]}])|(?P<s>[,;|.!?:\n])"
    r"|(?P<w>\x02-?\d+(?:\.\d+)?|\d+(?:\.\d+)?[^\W\d_]*|[^\W_]+(?:'[^\W_]+)*|&)|(?P<x>[^\w\s])"
)
_WMARK = "\x02"  # marks an explicit weight number: "(cat:1.3)" -> "cat^1", "\x021.3^1"


def _phrase_table() -> dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]]:
    table: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    for line in lx.SYNONYM_GROUPS:
        forms = [tuple(f.split()) for f in line.split("|")]
        for form in forms[1:] + [forms[0]]:
            table.setdefault(form[0], []).append((form, forms[0]))
    for options in table.values():
        options.sort(key=lambda o: -len(o[0]))
    return table


_PHRASES = _phrase_table()
_PHRASE_KEYS = frozenset(_PHRASES)
# canonical single word -> its single-word spellings, so "hughly" is still a typo of "highly"
_VARIANTS: dict[str, tuple[str, ...]] = {}
for _line in lx.SYNONYM_GROUPS:
    _forms = [f.strip() for f in _line.split("|") if " " not in f.strip()]
    if _forms and _forms[0] == _line.split("|")[0].strip():
        _VARIANTS[_forms[0]] = tuple(_forms)
_SPELL_STEMS = sorted(lx.SPELLING, key=len, reverse=True)


@lru_cache(maxsize=65536)
def _norm_word(w: str) -> str:
    if "'" in w:
        w = w.strip("'")
    if w.endswith("'s") and len(w) > 3:
        w = w[:-2]
    if w in lx.NUMBER_WORDS or not w:
        return lx.NUMBER_WORDS.get(w, w)
    for stem in _SPELL_STEMS:
        if w.startswith(stem):
            return lx.SPELLING[stem] + w[len(stem):]
    if len(w) >= 7 and not w.endswith("wise"):
        for end, rep in (("isation", "ization"), ("ised", "ized"), ("ising", "izing")):
            if w.endswith(end):
                return w[: -len(end)] + rep
    return w


def _apply_phrases(tokens: list[str]) -> list[str]:
    """Rewrite synonym phrases to their canonical form; a rewrite is rescanned, so chains
    such as "uhd 4k resolution" -> "4k resolution" -> "4k" resolve in one pass."""
    if _PHRASE_KEYS.isdisjoint(tokens):
        return tokens
    out: list[str] = []
    get = _PHRASES.get
    i, n = 0, len(tokens)
    while i < n:
        options = get(tokens[i])
        if options is not None:
            for form, canon in options:
                k = len(form)
                if k == 1 or tuple(tokens[i:i + k]) == form:
                    if form != canon:
                        tokens = [*canon, *tokens[i + k:]]
                        i, n = 0, len(tokens)
                    else:
                        out.extend(canon)
                        i += k
                    break
            else:
                out.append(tokens[i])
                i += 1
        else:
            out.append(tokens[i])
            i += 1
    return out


def _strip_suffix(text: str) -> str:
    for _ in range(3):
        text, n = _SUFFIX.subn("", text)
        if not n:
            break
    return text


@dataclass(frozen=True, slots=True)
class Parsed:
    segments: tuple[tuple[str, ...], ...]
    quoted: tuple[str, ...]
    words: frozenset[str]
    counts: Counter


def _parsed(segments: tuple[tuple[str, ...], ...], quoted: tuple[str, ...]) -> Parsed:
    counts = Counter(t for seg in segments for t in seg)
    return Parsed(segments, quoted, frozenset(counts), counts)




def _has_brackets(text: str) -> bool:
    return any(c in text for c in "()[]{}")

_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_SEP = "\x01"
_FAST = str.maketrans({**{c: _SEP for c in ",;|!?:\n"},
                       **{c: " " for c in '"#$%*+-/<=>@\\^_`~\t\r'}})


@lru_cache(maxsize=8192)
def parse(text: str) -> Parsed:
    """Canonical prompt -> segments of normalised content tokens (emphasis as "^depth")."""
    quoted = tuple(sorted(" ".join(q.split()) for q in _DQUOTED.findall(text))) if '"' in text else ()
    text = text.lower().strip()
    tail = len(text) - 64
    if tail > 0:  # the polite-suffix regex only needs the end of the prompt
        text = text[:tail] + _strip_suffix(text[tail:])
    else:
        text = _strip_suffix(text)
    text = _NOUN_PREFIX.sub("", _PREFIX.sub("", text))
    if ":" in text or ";" in text or "=" in text:
        text = _WEIGHT.sub(lambda m: f" {_WMARK}{m.group(1)} ", _EMOTICON.sub(" ", text))
    if not text.isascii() or _has_brackets(text):
        return _parsed(_tokenise_slow(text), quoted)
    if "." in text:
        text = text.replace(". ", _SEP)
        if "." in text:
            text = _PERIOD.sub(_SEP, text)
    segments = []
    drop, norm = lx.DROP, _norm_word
    for part in text.translate(_FAST).split(_SEP):
        toks = [w for w in map(norm, part.split()) if w not in drop]
        if toks:
            segments.append(tuple(_apply_phrases(toks)))
    return _parsed(tuple(segments), quoted)


def _tokenise_slow(text: str) -> tuple[tuple[str, ...], ...]:
    """Brackets (emphasis depth) and non-ASCII text (emoji kept as words, other scripts too)."""
    segments: list[tuple[str, ...]] = []
    current: list[str] = []
    depth = 0
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "o":
            depth += 1
        elif kind == "c":
            depth = max(0, depth - 1)
        elif kind == "s":
            if current:
                segments.append(tuple(_apply_phrases(current)))
                current = []
        else:
            tok = m.group()
            if kind == "x":
                cat = unicodedata.category(tok)
                if ord(tok) < 128 or cat.startswith("P"):
                    if cat.startswith("P") and ord(tok) >= 128 and current:
                        segments.append(tuple(_apply_phrases(current)))
                        current = []
                    continue
            else:
                tok = _norm_word(tok)
            if tok in lx.DROP:
                continue
            current.append(f"{tok}^{depth}" if depth else tok)
    if current:
        segments.append(tuple(_apply_phrases(current)))
    return tuple(segments)


# ---------------------------------------------------------------------------- word tests

def _base(tok: str) -> str:
    return tok.split("^", 1)[0]


@lru_cache(maxsize=65536)
def singular(w: str) -> str:
    if w in lx.IRREGULAR_PLURALS:
        return lx.IRREGULAR_PLURALS[w]
    if len(w) <= 3 or not w.isalpha() or w in lx.UNCOUNTABLE_S or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


_CATEGORIES = (("negation", lx.NEGATION), ("count", lx.COUNT), ("color", lx.COLOR),
               ("age", lx.AGE), ("gender", lx.GENDER), ("season_weather", lx.SEASON_WEATHER),
               ("time_of_day", lx.TIME_OF_DAY), ("spatial", lx.SPATIAL),
               ("species", lx.SPECIES), ("medium", lx.MEDIUM), ("style", lx.STYLE),
               ("preposition", lx.PREPOSITION))
_LEXICON = frozenset().union(*(words for _, words in _CATEGORIES))
_ORDER = {r: i for i, r in enumerate(REASONS)}
_DICT: dict[str, int] | None = None
KNOWN_FREQ = 500  # a word seen this often in the spelling dictionary is a real word


def _dictionary() -> dict[str, int]:
    global _DICT
    if _DICT is None:
        try:
            from spellchecker import SpellChecker
            _DICT = dict(SpellChecker(distance=1).word_frequency.dictionary)
        except Exception:  # no dictionary: nothing counts as an unknown word, no typo forgiven
            _DICT = {}
    return _DICT


def _known(w: str) -> bool:
    d = _dictionary()
    if not d:
        return True
    return singular(w) in _LEXICON or d.get(w, 0) >= KNOWN_FREQ or not w.isalpha()


def _edits(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance, or limit + 1 once it exceeds limit."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _is_typo(x: str, y: str) -> bool:
    bx, by = _base(x), _base(y)
    if x[len(bx):] != y[len(by):] or min(len(bx), len(by)) < 4:
        return False
    if not (bx.isalpha() and by.isalpha()) or singular(bx) == singular(by):
        return False
    limit = 2 if min(len(bx), len(by)) >= 8 else 1
    for vx in _VARIANTS.get(bx, (bx,)):
        for vy in _VARIANTS.get(by, (by,)):
            if min(len(vx), len(vy)) >= 4 and _edits(vx, vy, limit) <= limit:
                return not (_known(vx) and _known(vy))
    return False


def category(tok: str, segment: tuple[str, ...] = ()) -> str:
    w = _base(tok)
    if w.startswith(_WMARK):
        return "weight"
    s = singular(w)
    for name, words in _CATEGORIES:
        if w in words or s in words:
            return name
    if w.isdigit():
        return "count"
    if w.endswith("less") and len(w) > 6:
        return "negation"
    if s in lx.ARTIST_NAMES or _after_marker(tok, segment):
        return "artist"
    if w.isalpha() and not w.endswith(("ly", "ing", "ed", "ous", "ful", "ive", "ic", "ish",
                                         "able", "esque", "est")):
        return "subject"
    return "other"


def _after_marker(tok: str, segment: tuple[str, ...]) -> bool:
    if tok not in segment:
        return False
    return any(_base(t) in lx.ARTIST_MARKERS for t in segment[: segment.index(tok)])


# ---------------------------------------------------------------------------- comparison

_NO_COMPOUND = lx.COLOR | lx.NEGATION  # "green house" is no greenhouse, "no one" no "noone"


def _merge_compounds(segments: tuple[tuple[str, ...], ...], own: frozenset[str], new):
    """Join adjacent words that the other prompt writes as one ("art station" / "artstation")."""
    pairs = {(c[:k], c[k:]) for c in new for k in range(1, len(c))
             if c[:k] in own and c[k:] in own and "^" not in c}
    pairs = {p for p in pairs if not set(p) & _NO_COMPOUND}
    if not pairs:
        return segments
    out = []
    for seg in segments:
        toks, i, merged = [], 0, False
        while i < len(seg):
            if i + 1 < len(seg) and (seg[i], seg[i + 1]) in pairs:
                toks.append(_norm_word(seg[i] + seg[i + 1]))
                i += 2
                merged = True
            else:
                toks.append(seg[i])
                i += 1
        out.append(tuple(_apply_phrases(toks)) if merged else seg)
    return tuple(out)


def _pick_reason(extras: list[tuple[str, tuple[str, ...]]]) -> str:
    reason = min({category(t, seg) for t, seg in extras}, key=_ORDER.__getitem__)
    return "spatial" if reason == "preposition" else reason


def _segment_of(tok: str, segments) -> tuple[str, ...]:
    for seg in segments:
        if tok in seg:
            return seg
    return ()


def _order_reason(sa, sb) -> Verdict:
    """Same words, other order: accept tag/sentence reordering and dropped separators only."""
    flat_a = [t for s in sa for t in s]
    flat_b = [t for s in sb for t in s]
    if flat_a == flat_b or sorted(sa) == sorted(sb):
        return OK
    common = Counter(sa) & Counter(sb)
    rest_a, rest_b = Counter(common), Counter(common)
    left_a = [t for s in sa if not _take(rest_a, s) for t in s]
    left_b = [t for s in sb if not _take(rest_b, s) for t in s]
    if left_a == left_b:
        return OK
    detail = f"order: {' '.join(map(_base, left_a))[:80]} | {' '.join(map(_base, left_b))[:80]}"
    nexts_a = {(t, left_a[i + 1]) for i, t in enumerate(left_a[:-1]) if _base(t) in lx.ATTRIBUTE}
    nexts_b = {(t, left_b[i + 1]) for i, t in enumerate(left_b[:-1]) if _base(t) in lx.ATTRIBUTE}
    if nexts_a != nexts_b:
        return Verdict(False, "binding", detail)
    if any(_base(t) in lx.SPATIAL for t in left_a):
        return Verdict(False, "spatial", detail)
    return Verdict(False, "role", detail)


def _take(counter: Counter, seg) -> bool:
    if counter[seg] > 0:
        counter[seg] -= 1
        return True
    return False


def _minus(x: Counter, y: Counter) -> Counter:
    return Counter({t: n - y[t] for t, n in x.items() if n > y[t]})


def verify(a: str, b: str) -> Verdict:
    """Would the picture cached for canonical prompt `a` answer canonical prompt `b`?"""
    if a == b:
        return OK
    pa, pb = parse(a), parse(b)
    if pa.quoted != pb.quoted:
        return Verdict(False, "text", f"quoted text {list(pa.quoted)} != {list(pb.quoted)}")
    if not pa.segments or not pb.segments:
        return Verdict(False, "empty", "no comparable words")
    sa, sb = pa.segments, pb.segments
    if sa == sb:
        return OK
    ca, cb = pa.counts, pb.counts
    if ca != cb:
        ma = _merge_compounds(sa, pa.words, _minus(cb, ca).keys())
        mb = _merge_compounds(sb, pb.words, _minus(ca, cb).keys())
        if ma is not sa or mb is not sb:
            sa, sb = ma, mb
            ca, cb = Counter(t for s in sa for t in s), Counter(t for s in sb for t in s)
    if ca != cb:
        only_a, only_b = _minus(ca, cb), _minus(cb, ca)
        fix_a: dict[str, str] = {}
        fix_b: dict[str, str] = {}
        if len(only_a) == len(only_b) <= 6:  # else some word is surely left: no typo search
            for x in list(only_a):
                for y in list(only_b):
                    if only_a[x] == only_b[y] and (cb[x] == 0 or ca[y] == 0) and _is_typo(x, y):
                        (fix_a.__setitem__(x, y) if cb[x] == 0 else fix_b.__setitem__(y, x))
                        del only_a[x], only_b[y]
                        break
                else:
                    break  # x has no partner: refuse
        if only_a or only_b:
            return _refuse(list(only_a.elements()), list(only_b.elements()), sa, sb)
        sa = tuple(tuple(fix_a.get(t, t) for t in s) for s in sa)
        sb = tuple(tuple(fix_b.get(t, t) for t in s) for s in sb)
    return _order_reason(sa, sb)


def _refuse(left_a: list[str], left_b: list[str], sa, sb) -> Verdict:
    detail = f"-{' '.join(left_a)[:100]} +{' '.join(left_b)[:100]}"
    sing_a, sing_b = {singular(_base(t)) for t in left_a}, {singular(_base(t)) for t in left_b}
    if sing_a & sing_b:
        return Verdict(False, "count", "singular/plural " + detail)
    bases_a, bases_b = {_base(t) for t in left_a}, {_base(t) for t in left_b}
    extras = [(t, _segment_of(t, sa)) for t in left_a] + [(t, _segment_of(t, sb)) for t in left_b]
    if bases_a & bases_b:
        extras.append((_WMARK, ()))  # same word, other emphasis
    return Verdict(False, _pick_reason(extras), detail)
