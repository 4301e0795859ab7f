"""Does serving the cached image of prompt `a` answer prompt `b`? A rule-based check, no model.

`verify(a, b)` compares two CANONICAL prompts (`promptcache.prompts.canonical_prompt`) and accepts
only when every difference between them is harmless wording:

- request phrasing and politeness ("generate an image of", "draw me", "pls", "thank you", ":)"),
  articles, punctuation and separators (",", ";", "|", "."), hyphens, case outside quotes;
- synonyms and spellings that ask for the same picture (lexicon.SYNONYM_GROUPS, colour/color,
  number words and digits), compounds written apart ("art station" / "artstation");
- a typo: a slip of the finger (a letter dropped, doubled or added, two letters swapped, one
  replaced by a neighbouring key, or by another vowel in a longer word), not of the first letter
  (unless the first two are swapped), of a word of at least 4 letters that the other prompt has
  and this one lacks, with no second candidate there, of which at most one is a known word (so
  "horse"/"house", "black"/"back", "tiger"/"giger", "witcher"/"witches" are no typos). A
  3-letter typo only of a common 4-letter word ("brd"/"bird"). Typos are looked for among the
  words as typed, and the phrases read again once spelled right ("on the rigght of");
- reordering of whole tags or sentences, and dropped separators inside an otherwise equal text;
- word order that keeps every attribute and role in place (structure.py): coordinated noun
  phrases reordered ("a purple party hat and a red bowtie" / "a red bowtie and a purple party
  hat"), a list of self-contained noun phrases reordered across its commas, and a
  prepositional phrase fronted ("To a squirrel, a dog gives an apple").

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
from itertools import chain

from promptcache.semantic import lexicon as lx
from promptcache.semantic import structure as st
from promptcache.semantic.spelling import corrected, frequency, slip

# Refusal reasons, most telling first ("preposition" ranks a lone in/on/at change last and is
# reported as "spatial").
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
_WMARK = "\x02"  # marks an explicit weight number: "(cat:1.3)" -> "cat^1", "\x021.3^1"



def _strip_suffix(text: str) -> str:
    if not text.rstrip(" ,;.!").endswith(lx.POLITE_ENDS):
        return text
    for _ in range(3):
        text, n = _SUFFIX.subn("", text)
        if not n:
            break
    return text


def request_core(text: str) -> str:
    """What the semantic tier embeds for a canonical prompt: the prompt without its request
    phrasing and politeness ("please draw me a ...", "an image of ...", "..., thank you"), with
    unknown words spelled as their nearest known word (`spelling.corrected`: "froest" ->
    "forest"), so that wording and typos this verifier forgives do not pull the similarity of
    short prompts under the threshold."""
    core = _NOUN_PREFIX.sub("", _PREFIX.sub("", _strip_suffix(text.strip())))
    return corrected(core.strip(" ,;.!") or text)


@dataclass(frozen=True, slots=True)
class Parsed:
    segments: tuple[tuple[str, ...], ...]
    quoted: tuple[str, ...]
    words: frozenset[str]
    counts: Counter


def _parsed(segments: tuple[tuple[str, ...], ...], quoted: tuple[str, ...]) -> Parsed:
    counts = Counter(chain.from_iterable(segments))
    return Parsed(segments, quoted, frozenset(counts), counts)


def _has_brackets(text: str) -> bool:
    return any(c in text for c in "()[]{}")


_BRACKETS = re.compile(r"([()\[\]{}])")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_SEP = "\x01"
_FAST = str.maketrans({**{c: _SEP for c in ",;|!?:\n"},
                       **{c: " " for c in '"#$%*+-/<=>@\\^_`~\t\r'}})


@lru_cache(maxsize=8192)
def parse(text: str) -> Parsed:
    """Canonical prompt -> segments of normalised content tokens (emphasis as "^depth")."""
    return _parse(text, marks=False)


@lru_cache(maxsize=1024)
def parse_marked(text: str) -> Parsed:
    """`parse` with `structure.MARK` where an article stood (synonym phrases are applied between
    the marks): what the word-order rules read. Only parsed when two prompts have the same
    words in another order."""
    return _parse(text, marks=True)


@lru_cache(maxsize=1024)
def parse_raw(text: str) -> Parsed:
    """`parse` without synonym phrases: the words as typed, where typos are looked for (a slip
    inside a phrase, "on the rigght of", keeps the phrase from being read)."""
    return _parse(text, marks=False, phrases=False)


def _phrases(tokens: list[str], marks: bool) -> tuple[str, ...]:
    """Synonym phrases applied; with marks, between them, except that a mark inside a phrase
    ("on the left of" -> "to left of") goes. When the marks cannot be placed so that the words
    match the unmarked parse, the segment has none (its word order is then taken as written)."""
    plain = tuple(lx.apply_phrases([t for t in tokens if t != st.MARK]))
    if not marks or st.MARK not in tokens:
        return plain
    active = {i for i, t in enumerate(tokens) if t == st.MARK}
    out = _phrase_runs(tokens, active)
    for i in sorted(active):
        if _unmarked(out) == plain:
            return out
        trial = _phrase_runs(tokens, active - {i})
        if _unmarked(trial) != _unmarked(out):  # a phrase spans this mark: drop it
            active, out = active - {i}, trial
    return out if _unmarked(out) == plain else plain


def _phrase_runs(tokens: list[str], active: set[int]) -> tuple[str, ...]:
    out: list[str] = []
    run: list[str] = []
    for i, t in enumerate(tokens):
        if t != st.MARK:
            run.append(t)
        elif i in active:
            out.extend(lx.apply_phrases(run))
            out.append(t)
            run = []
    out.extend(lx.apply_phrases(run))
    return tuple(out)


def _unmarked(tokens: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t for t in tokens if t != st.MARK)


def _parse(text: str, marks: bool, phrases: bool = True) -> Parsed:
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
    if not text.isascii():
        text = text.translate({ord(c): _unicode_char(c) for c in set(text) if not c.isascii()})
    if "." in text:
        text = text.replace(". ", _SEP)
        if "." in text:
            text = _PERIOD.sub(_SEP, text)
    segments: list[tuple[str, ...]] = []
    current: list[str] = []
    depth = 0
    drop, cache, norm = lx.DROP, lx.NORM_CACHE, lx.norm_word
    for piece in _BRACKETS.split(text) if _has_brackets(text) else (text,):
        if len(piece) == 1 and piece in "([{)]}":
            depth = depth + 1 if piece in "([{" else max(0, depth - 1)
            continue
        for j, part in enumerate(piece.translate(_FAST).split(_SEP)):
            if j and current:
                segments.append(_phrases(current, marks) if phrases else tuple(current))
                current = []
            words = (cache[x] if x in cache else norm(x) for x in part.split())
            if marks:
                toks = [st.MARK if w in st.ARTICLES else w for w in words
                        if w not in drop or w in st.ARTICLES]
            else:
                toks = [w for w in words if w not in drop]
            current.extend(f"{t}^{depth}" for t in toks) if depth else current.extend(toks)
    if current:
        segments.append(_phrases(current, marks) if phrases else tuple(current))
    if marks:  # a segment that is only article marks is no segment
        segments = [s for s in segments if any(t != st.MARK for t in s)]
    return _parsed(tuple(segments), quoted)


@lru_cache(maxsize=4096)
def _unicode_char(c: str) -> str:
    """Non-ASCII: letters and digits stay in words, punctuation separates, symbols (emoji)
    become words of their own, marks and format characters vanish."""
    cat = unicodedata.category(c)
    if cat[0] in "LN":
        return c
    if cat in ("Ps", "Pe", "Pi", "Pf", "Pd", "Pc"):
        return " "
    if cat[0] == "P":
        return _SEP
    if cat[0] == "S":
        return f" {c} "
    return "" if cat[0] in "MC" else " "


# ---------------------------------------------------------------------------- word tests

def _base(tok: str) -> str:
    return tok.split("^", 1)[0]


_CATEGORIES = (("negation", lx.NEGATION), ("count", lx.COUNT), ("color", lx.COLOR),
               ("age", lx.AGE), ("gender", lx.GENDER), ("season_weather", lx.SEASON_WEATHER),
               ("time_of_day", lx.TIME_OF_DAY), ("spatial", lx.SPATIAL),
               ("species", lx.SPECIES), ("medium", lx.MEDIUM), ("style", lx.STYLE),
               ("preposition", lx.PREPOSITION))
lx.CATEGORY_WORDS = frozenset().union(*(words for _, words in _CATEGORIES))
_ORDER = {r: i for i, r in enumerate(REASONS)}
_NUMBER_NAMES = {digits: word for word, digits in lx.NUMBER_WORDS.items()}
_COMMON = 20_000  # dictionary frequency of a common word ("blue" 124k, "bird" 56k, "pony" 7k)
_VOWELS = frozenset("aeiouy")


def _is_typo(x: str, y: str) -> bool:
    """Is one of the two tokens a slip of the finger for the other? (see `_slip`)"""
    bx, by = _base(x), _base(y)
    if x[len(bx):] != y[len(by):]:
        return False
    bx, by = _NUMBER_NAMES.get(bx, bx), _NUMBER_NAMES.get(by, by)  # "foru" for "four" ("4")
    if min(len(bx), len(by)) < 3 or max(len(bx), len(by)) < 4:
        return False
    if not (bx.isalpha() and by.isalpha() and bx.isascii() and by.isascii()):
        return False  # digits, emoji, other scripts (one CJK character is a whole word)
    if lx.singular(bx) == lx.singular(by) or (
            by in (bx + "s", bx + "es") and not bx.endswith("s")) or (
            bx in (by + "s", by + "es") and not by.endswith("s")):
        return False  # a plural is a count ("pikachu"/"pikachus")
    for vx in lx.VARIANTS.get(bx, (bx,)):
        for vy in lx.VARIANTS.get(by, (by,)):
            # one edit, not of the first letter ("tiger"/"giger", "matte"/"latte" are no
            # typos) unless the first two letters are swapped ("hpoto"/"photo")
            if min(len(vx), len(vy)) == 3:
                # a dropped letter of a word of four, the short one no word, and either
                # without a vowel ("frg"/"frog": no name or word is spelled so) or the long one
                # a common word ("ble"/"blue", but not "pon"/"pony"): three letters leave too
                # little to tell anything else apart
                short, long_ = sorted((vx, vy), key=len)
                if (len(long_) == 4 and short[0] == long_[0] and not lx.known_word(short)
                        and (_VOWELS.isdisjoint(short) or frequency(long_) >= _COMMON)
                        and lx.known_word(long_) and lx.edit_distance(short, long_, 1) <= 1
                        and _one_letter_fills(short) == {long_}):
                    return True
                continue
            if min(len(vx), len(vy)) >= 4 and (
                    (vx[0] == vy[0] and lx.edit_distance(vx, vy, 1) <= 1 and slip(vx, vy))
                    or (vx[:2] == vy[1::-1] and vx[2:] == vy[2:])):
                return not (lx.known_word(vx) and lx.known_word(vy))
    return False


def category(tok: str, segment: tuple[str, ...] = ()) -> str:
    w = _base(tok)
    if w.startswith(_WMARK):
        return "weight"
    s = lx.singular(w)
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
                toks.append(lx.norm_word(seg[i] + seg[i + 1]))
                i += 2
                merged = True
            else:
                toks.append(seg[i])
                i += 1
        out.append(tuple(lx.apply_phrases(toks)) if merged else seg)
    return tuple(out)


def _pick_reason(extras: list[tuple[str, tuple[str, ...]]]) -> str:
    reason = min({category(t, seg) for t, seg in extras}, key=_ORDER.__getitem__)
    return "spatial" if reason == "preposition" else reason


def _segment_of(tok: str, segments) -> tuple[str, ...]:
    for seg in segments:
        if tok in seg:
            return seg
    return ()


def _same_order(sa, sb) -> bool:
    """Tags or sentences reordered, or separators dropped inside an otherwise equal text."""
    if sorted(sa) == sorted(sb) or [t for s in sa for t in s] == [t for s in sb for t in s]:
        return True
    common = Counter(sa) & Counter(sb)
    rest_a, rest_b = Counter(common), Counter(common)
    left_a = [t for s in sa if not _take(rest_a, s) for t in s]
    left_b = [t for s in sb if not _take(rest_b, s) for t in s]
    return left_a == left_b


def _same_structure(a: str, b: str, fix_a: dict[str, str], fix_b: dict[str, str]) -> bool:
    """The same words in an order that asks for the same picture (structure.normal_form:
    coordinated noun phrases reordered, a fronted phrase), read with article marks."""
    ma = _fixed(parse_marked(a).segments, fix_a, marks=True)
    mb = _fixed(parse_marked(b).segments, fix_b, marks=True)
    na, nb = st.normal_form(ma), st.normal_form(mb)
    if na == nb or _same_order(na, nb):
        return True
    items_a = st.listed_items(na)
    return items_a is not None and items_a == st.listed_items(nb)


def _order_reason(sa, sb, a: str = "", b: str = "", fix_a: dict[str, str] | None = None,
                  fix_b: dict[str, str] | None = None) -> Verdict:
    """Same words, other order: accept tag/sentence reordering, dropped separators, reordered
    coordinations and a fronted phrase only."""
    flat_a = [t for s in sa for t in s]
    flat_b = [t for s in sb for t in s]
    if flat_a == flat_b or sorted(sa) == sorted(sb):
        return OK
    common = Counter(sa) & Counter(sb)
    rest_a, rest_b = Counter(common), Counter(common)
    left_a = [t for s in sa if not _take(rest_a, s) for t in s]
    left_b = [t for s in sb if not _take(rest_b, s) for t in s]
    if left_a == left_b or (a and b and _same_structure(a, b, fix_a or {}, fix_b or {})):
        return OK
    detail = f"order: {' '.join(map(_base, left_a))[:80]} | {' '.join(map(_base, left_b))[:80]}"
    nexts_a = {(t, left_a[i + 1]) for i, t in enumerate(left_a[:-1]) if _base(t) in lx.ATTRIBUTE}
    nexts_b = {(t, left_b[i + 1]) for i, t in enumerate(left_b[:-1]) if _base(t) in lx.ATTRIBUTE}
    if nexts_a != nexts_b:
        return Verdict(False, "binding", detail)
    if any(_base(t) in lx.SPATIAL for t in left_a):
        return Verdict(False, "spatial", detail)
    return Verdict(False, "role", detail)


def _without_and(segments) -> list[str]:
    return [t for s in segments for t in s if t != "and"]


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
    merged = False
    fix_a: dict[str, str] = {}
    fix_b: dict[str, str] = {}
    if ca != cb:
        ma = _merge_compounds(sa, pa.words, _minus(cb, ca).keys())
        mb = _merge_compounds(sb, pb.words, _minus(ca, cb).keys())
        if ma is not sa or mb is not sb:
            sa, sb, merged = ma, mb, True
            ca, cb = Counter(t for s in sa for t in s), Counter(t for s in sb for t in s)
    if ca != cb:
        # typos are looked for among the words as typed (a slip inside a phrase keeps it from
        # being read: "on the rigght of" is no "to right of" until spelled right)
        ra, rb = (sa, sb) if merged else (parse_raw(a).segments, parse_raw(b).segments)
        rca = Counter(t for s in ra for t in s) if merged else parse_raw(a).counts
        rcb = Counter(t for s in rb for t in s) if merged else parse_raw(b).counts
        only_a, only_b = _minus(rca, rcb), _minus(rcb, rca)
        if len(only_a) <= 8 and len(only_b) <= 8:  # else some word is surely left
            for x in list(only_a):
                # a misspelling of exactly one word the other prompt has and this one lacks:
                # with two candidates ("bost" for "best" or "bust") it is no known typo
                partners = [y for y in only_b if only_a[x] == only_b[y]
                            and (rcb[x] == 0 or rca[y] == 0) and _is_typo(x, y)]
                if len(partners) == 1:
                    y = partners[0]
                    # rename on a side that lacks the other's word, the typo's side if both do
                    if rcb[x] == 0 and (rca[y] != 0 or (
                            lx.known_word(_base(y)) and not lx.known_word(_base(x)))):
                        fix_a[x] = y  # a's typo, spelled as b does
                    else:
                        fix_b[y] = x
                    del only_a[x], only_b[y]
        if fix_a or fix_b:  # spelled right, phrases are read again, on both sides
            sa, sb = _fixed(ra, fix_a), _fixed(rb, fix_b)
            ca, cb = Counter(t for s in sa for t in s), Counter(t for s in sb for t in s)
        only_a, only_b = _minus(ca, cb), _minus(cb, ca)
        if set(only_a) | set(only_b) == {"and"} and _without_and(sa) == _without_and(sb):
            return OK  # "muscled and young" / "muscled young", "a cat and a dog" / "a cat, a dog"
        if only_a or only_b:
            return _refuse(list(only_a.elements()), list(only_b.elements()), sa, sb)
    if merged:  # compounds joined: the marked parse would not line up
        return _order_reason(sa, sb)
    return _order_reason(sa, sb, a, b, fix_a, fix_b)


def _fixed(segments, fix: dict[str, str], marks: bool = False):
    """Segments with typos replaced by the words they misspell, synonym phrases applied again."""
    return tuple(_phrases([fix.get(t, t) for t in s], marks) for s in segments)


def _refuse(left_a: list[str], left_b: list[str], sa, sb) -> Verdict:
    detail = f"-{' '.join(left_a)[:100]} +{' '.join(left_b)[:100]}".replace(_WMARK, ":")
    shared = {_base(t) for t in left_a} & {_base(t) for t in left_b}
    left_a = [t for t in left_a if _base(t) not in shared and not t.startswith(_WMARK)]
    left_b = [t for t in left_b if _base(t) not in shared and not t.startswith(_WMARK)]
    if not left_a and not left_b:  # only emphasis differs: "(cat:1.3)" vs "cat"
        return Verdict(False, "weight", "emphasis " + detail)
    bases_a, bases_b = {_base(t) for t in left_a}, {_base(t) for t in left_b}
    sing_a, sing_b = {lx.singular(t) for t in bases_a}, {lx.singular(t) for t in bases_b}
    if sing_a & sing_b:
        return Verdict(False, "count", "singular/plural " + detail)
    extras = [(t, _segment_of(t, sa)) for t in left_a] + [(t, _segment_of(t, sb)) for t in left_b]
    return Verdict(False, _pick_reason(extras), detail)


def _one_letter_fills(short: str) -> set[str]:
    """The known words one added letter makes of `short`: a three-letter slip is a typo of a
    word only when no other word is as near ("pnk" could be "pink" or "punk": refused)."""
    return {w for i in range(len(short) + 1) for c in "abcdefghijklmnopqrstuvwxyz"
            if lx.known_word(w := short[:i] + c + short[i:])}
