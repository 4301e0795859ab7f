"""Word order that does not change the picture: reordered coordinations and fronted phrases.

Works on the verifier's segments parsed with article marks (`MARK` where "a", "an" or "the"
stood: an article opens a noun phrase, which is how a conjunct's start is found without a
tagger). `normal_form` rewrites a prompt's segments into one order, so that two prompts that
differ only in these orders get the same form:

- **coordinated noun phrases** are sorted: "a corgi wearing a purple party hat and a red
  bowtie" and "... a red bowtie and a purple party hat" both become "... purple party hat and red
  bowtie". A conjunct is a whole noun phrase: it starts after an article, at the start of a
  segment, or right after a preposition or a listed verb, and runs over words that are neither
  prepositions, verbs, -ing forms nor "and". So its attributes move with it, and "a red car and
  a blue bike" / "a blue car and a red bike" keep different forms. A coordination is sorted only
  where what follows it applies to all of its conjuncts: the segment's end, or, for the subject
  at the start of a segment, a scene preposition ("in a forest") or a shared verb ("... sitting
  on a bench"); never before "with" or "of" ("a cat and a dog with a hat": the hat belongs to
  the dog), never an object followed by more ("a dog on a sofa and a cat on a chair" has no
  coordination "sofa and cat"), and never when a modifier without an article stands in front of
  the first conjunct ("sleeping cat and dog").
- **a fronted prepositional phrase** at the start of the prompt goes back to the end of its
  clause: "To a squirrel, a dog gives an apple" -> "a dog gives an apple to a squirrel". Only
  when that clause has no preposition or spatial word of its own (else the phrase could attach
  to another noun: "behind a wall, a man in front of a car"), and for "with"/"without"/"like"
  phrases only when the clause has one subject (no "and").

Who does what to whom never moves: a conjunct cannot cross a verb, so "a dog chasing a cat" and
"a cat chasing a dog" keep their forms. Anything unsure is left as written: a missed
reordering costs one generation, a wrong one serves the wrong picture.
"""

from __future__ import annotations

from promptcache.semantic import lexicon as lx

MARK = "\x03"  # where an article stood
ARTICLES = frozenset({"a", "an", "the"})

PREPS = lx.PREPOSITION | frozenset("""
above below under beneath underneath behind beside near inside outside over across through along
among amid amidst between against around atop toward towards into onto within without via like
past beyond throughout next by
""".split())
# After a coordination, these apply to every conjunct ("a cat and a dog in a box").
SCENE_PREPS = frozenset("""
in on at inside under beneath underneath near during among amid atop above below behind beside
over into onto next against around outside
""".split())
# Verbs whose subject or object a noun phrase is: a conjunct never crosses them.
VERBS = frozenset("""
is are was were be been being has have had holds hold gives give wears eats drinks rides reads
chases carries throws kicks hugs feeds bites offers follows attacks touches lifts pulls pushes
catches watches sees meets fights hits grabs sniffs licks
""".split())
# Nouns ending in -ing (other -ing words are verb forms: no part of a noun phrase).
ING_NOUNS = frozenset("""
painting paintings building buildings ceiling clothing evening morning king kings ring rings wing
wings thing things string strings swing swings sibling siblings pudding wedding dumpling dumplings
earring earrings ding spring sling offspring stuffing frosting icing lightning lighting ending
drawing drawings etching engraving carving carvings sculpting railing railings stocking
stockings bedding awning awnings
""".split())
FRONTING_ONE_SUBJECT = frozenset({"with", "without", "like"})
_NO_CLAUSE_WORDS = (PREPS - {"of"}) | lx.SPATIAL


def _ing(w: str) -> bool:
    return len(w) > 4 and w.endswith("ing") and w not in ING_NOUNS


def _np_word(w: str) -> bool:
    """Part of a noun phrase: no article mark, conjunction, preposition, verb or -ing form."""
    return (w != MARK and w not in ("and", "or", "&") and w not in PREPS and w not in VERBS
            and not _ing(w) and "^" not in w and not w.startswith("\x02"))


def _np_run(seg: tuple[str, ...], i: int) -> int:
    """End of the noun-phrase words starting at i (i itself when there are none)."""
    while i < len(seg) and _np_word(seg[i]):
        i += 1
    return i


def _starts(seg: tuple[str, ...], i: int) -> bool:
    if i == 0:
        return True
    before = seg[i - 1]
    return before == MARK or before in PREPS or before in VERBS


def _ends(seg: tuple[str, ...], i: int, j: int) -> bool:
    """May a coordination from i to j be reordered? At the segment's end always; before a scene
    preposition or a verb only as the subject (at the start of the segment): an object's
    coordination followed by more ("on a sofa and a cat on a chair") is no coordination of
    the object at all."""
    if j == len(seg):
        return True
    after = seg[j]
    subject = i == 0 or (i == 1 and seg[0] == MARK)
    return subject and (after in SCENE_PREPS or after in VERBS or _ing(after))


def _coordination(seg: tuple[str, ...], i: int) -> tuple[list[tuple[str, ...]], int] | None:
    """The conjuncts of a coordination of noun phrases starting at i, and where it ends."""
    end = _np_run(seg, i)
    if end == i or end >= len(seg) or seg[end] != "and":
        return None
    conjuncts = [seg[i:end]]
    while end < len(seg) and seg[end] == "and":
        k = end + 1
        if k < len(seg) and seg[k] == MARK:
            k += 1
        stop = _np_run(seg, k)
        if stop == k:
            return None
        conjuncts.append(seg[k:stop])
        end = stop
    return (conjuncts, end) if _ends(seg, i, end) else None


def sort_coordinations(seg: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(seg):
        if seg[i] != MARK and _starts(seg, i) and (found := _coordination(seg, i)) is not None:
            conjuncts, end = found
            for k, conjunct in enumerate(sorted(conjuncts)):
                if k:
                    out.append("and")
                out.append(MARK)
                out.extend(conjunct)
            i = end
            continue
        out.append(seg[i])
        i += 1
    return tuple(out)


def _phrase_length(seg: tuple[str, ...]) -> int:
    """Length of the prepositional phrase that opens `seg` (0 when it does not open with one):
    preposition(s) and a noun phrase, then more of them ("in a bathroom with red fixtures")."""
    i = 0
    while i < len(seg) and seg[i] in PREPS and seg[i] != "of":
        i += 1
    if i == 0:
        return 0
    while True:
        if i < len(seg) and seg[i] == MARK:
            i += 1
        stop = _np_run(seg, i)
        if stop == i:
            return 0
        i = stop
        if i + 1 < len(seg) and seg[i] in PREPS:  # "in a field of flowers", "at the beach at
            i += 1                                  # sunrise": the whole chain moves
            while i < len(seg) and seg[i] in PREPS:
                i += 1
            continue
        return i


def _clause_takes(clause: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    if not clause or not (clause[0] == MARK or _np_word(clause[0])):
        return False
    if any(w in _NO_CLAUSE_WORDS or "^" in w for w in clause):
        return False
    return not (phrase[0] in FRONTING_ONE_SUBJECT and "and" in clause)


def unfront(segments: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """Move a prepositional phrase that opens the prompt to the end of its clause."""
    if not segments:
        return segments
    first = segments[0]
    n = _phrase_length(first)
    if not n:
        return segments
    if n == len(first) and len(segments) > 1 and _clause_takes(segments[1], first):
        return (segments[1] + first, *segments[2:])  # "to a squirrel, a dog gives an apple"
    if n < len(first) and first[n] == MARK and _clause_takes(first[n:], first[:n]):
        return (first[n:] + first[:n], *segments[1:])  # "to a squirrel a dog gives an apple"
    return segments


def normal_form(segments: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """Segments with fronted phrases moved back and coordinations sorted, article marks gone."""
    out = []
    for seg in unfront(segments):
        out.append(tuple(w for w in sort_coordinations(seg) if w != MARK))
    return tuple(out)


def _plain_clause(clause: tuple[str, ...]) -> bool:
    """A noun phrase, optionally with prepositional phrases: "cat", "cat on chair"."""
    i = _np_run(clause, 0)
    if i == 0:
        return False
    while i < len(clause):
        k = i
        while k < len(clause) and clause[k] in PREPS:
            k += 1
        stop = _np_run(clause, k)
        if k == i or stop == k:
            return False
        i = stop
    return True


def listed_items(segments: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]] | None:
    """The items of a prompt that is a list of self-contained noun phrases, split at commas and
    "and" ("a red apple, a green pear and a yellow banana"), or None when some "and" joins
    anything else. Within a coordination either every item has its own prepositional phrase or
    none does: in "a cat and a dog on a sofa" the sofa may be both animals'."""
    items: list[tuple[str, ...]] = []
    for seg in segments:
        if "and" not in seg:
            items.append(seg)
            continue
        clauses: list[tuple[str, ...]] = []
        start = 0
        for i, w in enumerate((*seg, "and")):
            if w == "and":
                clauses.append(seg[start:i])
                start = i + 1
        if not all(_plain_clause(c) for c in clauses):
            return None
        with_phrase = [any(w in PREPS for w in c) for c in clauses]
        if any(with_phrase) and not all(with_phrase):
            return None
        items.extend(clauses)
    return sorted(items)
