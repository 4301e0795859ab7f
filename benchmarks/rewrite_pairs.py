"""Labelled rewrite pairs of the issue 18 kinds, made from real prompts, with hard negatives.

    .venv/bin/python benchmarks/rewrite_pairs.py                 # verifier alone, by kind
    .venv/bin/python benchmarks/rewrite_pairs.py --per-kind 200 --show 5 --write out.jsonl

Acceptable rewrites (label `pos`), each one edit of a real prompt from ../shared/data/prompts
(dev prompts left out):

- `coord_reorder`: two coordinated noun phrases swapped, attributes with their nouns ("a corgi
  wearing a purple party hat and a red bowtie" -> "... a red bowtie and a purple party hat");
  only where the coordination ends the clause or is the subject before a verb or a place.
- `fronted_phrase`: the prompt's final prepositional phrase moved to the front, with or without a
  comma ("A dog gives an apple to a squirrel" -> "To a squirrel, a dog gives an apple."), from
  sentence prompts whose clause has no other preposition.
- `typo`: one keyboard slip in a content word of four letters or more (a neighbouring key, a
  dropped, doubled or swapped letter, also the first two letters swapped) that makes no real
  word; as in the dev split, `a` (cached) has the typo and `b` is the clean prompt.
- `article_case`: a short prompt (one to four words) with its leading article added or dropped
  and its case changed ("Man" <-> "a man", "robot" -> "A Robot.").

Hard negatives (label `neg`) of the same surface kinds:

- `coord_swapped_attributes`: the modifiers of two coordinated nouns exchanged ("a red car and a
  blue bike" -> "a blue car and a red bike").
- `swapped_roles`: the subject and object of a verb exchanged ("a dog chasing a cat" -> "a cat
  chasing a dog"; benchmarks/pairs.py's generator).
- `fronted_swapped`: the phrase fronted *and* its noun exchanged with the subject ("A dog gives
  an apple to a squirrel" -> "To a dog, a squirrel gives an apple.").
- `real_word_typo`: a content word replaced by another real word one letter away ("cat" ->
  "car", "hat" -> "bat", "horse" -> "house"): words used at least 5 times in the prompts and
  in the spelling dictionary, not a spelling variant or plural of each other. Some such pairs
  are harmless (the word list cannot know every synonym); they are counted as near-misses all
  the same.
- `count_change`: a number changed, or a short prompt's article turned into a count ("four
  ships" -> "five ships", "a man" -> "two men", "a robot" -> "robots").

Seeded (`--seed`): the same prompts and edits every run. The word lists here were written for
the generator, not taken from the verifier. `generate()` is what benchmarks/semantic_service.py
runs through the service (its `rewrites` group).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.pairs import gen_swapped_roles, load_dev, load_prompts  # noqa: E402
from promptcache.prompts import canonical_prompt  # noqa: E402

SHARED = REPO.parent / "shared"

G_PREPS = set("""in on at with without of to from by for under over near behind above below into
onto beside inside outside through across along around against among between beneath
underneath toward towards upon like during next atop""".split())
G_NOT_NP = G_PREPS | set("""and or is are was were be has have had that which who while as than
its his her their very""".split())
DETS = r"(?:a|an|the|two|three|four|five|some|one)"
# a noun phrase: determiner + 1-4 plain words (no preposition, conjunction or -ing form)
WORD = r"(?!(?:and|or|with|in|on|at|of|to|by|for|is|are)\b)(?![a-z]+ing\b)[a-z]+"
NP = rf"\b{DETS}\s+{WORD}(?:[\s-]{WORD}){{0,3}}"
PARTICIPLES = ("sitting|standing|playing|running|walking|eating|lying|sleeping|flying|swimming|"
               "looking|holding|wearing|dancing|talking|riding")
COORD = re.compile(rf"(?P<x>{NP})\s+and\s+(?P<y>{NP})(?P<after>\s*(?:[,.;!]|$)|\s+(?:in|on|at|"
                   rf"under|near|inside|{PARTICIPLES})\b)", re.I)
FINAL_PP = re.compile(
    r"^(?P<clause>[A-Za-z][A-Za-z' -]*?)\s+(?P<pp>(?:to|in|on|at|under|near|beside|behind|inside|"
    r"during|from|for|above|below|next to|in front of|on top of)\s+(?:a|an|the|his|her|their)\s+"
    r"[a-z]+(?:\s+(?:of\s+)?[a-z]+){0,3})\s*\.?$")
KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_POS = {c: (r, i) for r, row in enumerate(KEYBOARD) for i, c in enumerate(row)}
NUMBER_WORDS = "one two three four five six seven eight nine ten".split()
BRITISH = {"colour", "grey", "centre", "theatre", "armour", "harbour", "favourite", "jewellery"}


def _words_ok(np_text: str) -> bool:
    words = np_text.lower().replace("-", " ").split()[1:]
    return bool(words) and not any(w in G_NOT_NP or w.endswith("ing") for w in words)


def _neighbours(c: str) -> list[str]:
    if c not in _POS:
        return []
    r, i = _POS[c]
    row = KEYBOARD[r]
    return [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]


# -- positives --------------------------------------------------------------------------------

def gen_coord_reorder(p: str, rnd: random.Random):
    for m in COORD.finditer(p):
        x, y = m.group("x"), m.group("y")
        if not (_words_ok(x) and _words_ok(y)) or x.lower() == y.lower():
            continue
        after = m.group("after").strip().lower()
        if after and after[0].isalpha() and m.start() > 0 and p[:m.start()].strip():
            continue  # an object followed by more: who has what is ambiguous
        b = p[:m.start("x")] + y + " and " + x + p[m.end("y"):]
        if m.start("x") == 0:
            b = b[:1].upper() + b[1:] if p[:1].isupper() else b
        return b, {"swapped": [x, y]}
    return None


def _fronted(p: str):
    if "," in p or '"' in p or len(p.split()) > 20:
        return None
    m = FINAL_PP.match(p.strip())
    if not m:
        return None
    clause, pp = m.group("clause"), m.group("pp")
    cw = clause.lower().split()
    if len(cw) < 2 or any(w in G_PREPS for w in cw) or cw[0] not in ("a", "an", "the"):
        return None
    return clause, pp


def gen_fronted_phrase(p: str, rnd: random.Random):
    parts = _fronted(p)
    if not parts:
        return None
    clause, pp = parts
    sep = rnd.choice([", ", ", ", " "])
    b = pp[:1].upper() + pp[1:] + sep + clause[:1].lower() + clause[1:] + rnd.choice([".", ""])
    return b, {"fronted": pp, "comma": sep == ", "}


def _typo(word: str, rnd: random.Random) -> tuple[str, str] | None:
    ops = ["neighbour", "drop", "double", "swap", "first_swap"]
    rnd.shuffle(ops)
    for op in ops:
        i = rnd.randrange(1, len(word) - 1)
        if op == "neighbour":
            near = _neighbours(word[i])
            if near:
                return word[:i] + rnd.choice(near) + word[i + 1:], op
        elif op == "drop":
            return word[:i] + word[i + 1:], op
        elif op == "double":
            return word[:i] + word[i] + word[i:], op
        elif op == "swap" and word[i] != word[i + 1]:
            return word[:i] + word[i + 1] + word[i] + word[i + 2:], op
        elif op == "first_swap" and word[0] != word[1]:
            return word[1] + word[0] + word[2:], op
    return None


class Vocab:
    def __init__(self, prompts) -> None:
        self.counts = collections.Counter(
            w for _, p in prompts for w in re.findall(r"[a-z]+", p.lower()))
        try:
            from spellchecker import SpellChecker
            self.dictionary = set(SpellChecker(distance=1).word_frequency.dictionary)
        except Exception:  # noqa: BLE001 - without it: the corpus alone
            self.dictionary = set()
        self.by_deletion: dict[str, list[str]] = collections.defaultdict(list)
        for w, n in self.counts.items():
            if n >= 5 and len(w) >= 3 and w in self.dictionary:
                for i in range(len(w)):
                    self.by_deletion[w[:i] + w[i + 1:]].append(w)

    def real(self, w: str) -> bool:
        return w in self.dictionary or self.counts[w] >= 2


QUOTES = re.compile("[\"\u201c\u201d\u2018\u2019']")


def gen_typo(vocab: Vocab):
    def gen(p: str, rnd: random.Random):
        if QUOTES.search(p):  # quoted text is drawn: a typo there is another picture
            return None
        words = [m for m in re.finditer(r"\b[a-z]{4,}\b", p) if m.group(0) not in G_NOT_NP]
        for m in rnd.sample(words, len(words)):
            res = _typo(m.group(0), rnd)
            if res and not vocab.real(res[0]):
                typo = p[:m.start()] + res[0] + p[m.end():]
                return typo, {"op": res[1], "typo": res[0], "word": m.group(0)}
        return None
    return gen


def gen_article_case(p: str, rnd: random.Random):
    words = p.strip(" .!").split()
    if not 1 <= len(words) <= 4 or not all(re.fullmatch(r"[A-Za-z'-]+", w) for w in words):
        return None
    body = words[1:] if words[0].lower() in ("a", "an", "the") else words
    if not body or body[0].lower() in NUMBER_WORDS:
        return None
    article = "an" if body[0][:1].lower() in "aeiou" else "a"
    had = len(body) < len(words)
    forms = [" ".join(body), f"{article} {' '.join(body)}", f"the {' '.join(body)}"]
    forms = [f for f in forms if f.lower() != " ".join(words).lower()] or forms
    b = rnd.choice(forms)
    b = rnd.choice([str.lower, str.title, str.capitalize, str.upper])(b) + rnd.choice(["", ".", ""])
    return b, {"had_article": had}


# -- negatives --------------------------------------------------------------------------------

def gen_coord_swapped_attributes(p: str, rnd: random.Random):
    for m in COORD.finditer(p):
        x, y = m.group("x"), m.group("y")
        if not (_words_ok(x) and _words_ok(y)):
            continue
        xw, yw = x.split(), y.split()
        if len(xw) < 3 or len(yw) < 3 or xw[1].lower() == yw[1].lower() \
                or xw[-1].lower() == yw[-1].lower():
            continue
        nx = " ".join([xw[0], yw[1], *xw[2:]])
        ny = " ".join([yw[0], xw[1], *yw[2:]])
        return p[:m.start("x")] + nx + " and " + ny + p[m.end("y"):], {"swapped": [xw[1], yw[1]]}
    return None


def gen_fronted_swapped(p: str, rnd: random.Random):
    parts = _fronted(p)
    if not parts:
        return None
    clause, pp = parts
    cw, pw = clause.split(), pp.split()
    verb = next((i for i, w in enumerate(cw) if i > 1 and (
        w.lower() in ("is", "are", "was", "were", "has", "gives", "holds") or w.endswith("ing"))),
        len(cw))
    subject, obj = cw[verb - 1], pw[-1]  # the subject's head noun: the word before its verb
    if subject.lower() == obj.lower() or verb < 2:
        return None
    clause2 = " ".join([*cw[:verb - 1], obj, *cw[verb:]])
    pp2 = " ".join([*pw[:-1], subject])
    b = pp2[:1].upper() + pp2[1:] + ", " + clause2[:1].lower() + clause2[1:] + "."
    return b, {"swapped": [subject, obj]}


def gen_real_word_typo(vocab: Vocab):
    def gen(p: str, rnd: random.Random):
        if '"' in p:
            return None
        words = [m for m in re.finditer(r"\b[a-z]{3,}\b", p) if m.group(0) not in G_NOT_NP]
        for m in rnd.sample(words, len(words)):
            w = m.group(0)
            near = {v for i in range(len(w)) for v in vocab.by_deletion.get(w[:i] + w[i + 1:], ())}
            near |= set(vocab.by_deletion.get(w, ()))
            near = sorted(v for v in near if v != w and v.rstrip("s") != w.rstrip("s")
                          and v.replace("our", "or") != w.replace("our", "or")
                          and v not in BRITISH and w not in BRITISH and v not in G_NOT_NP)
            if near:
                new = rnd.choice(near)
                return p[:m.start()] + new + p[m.end():], {"from": w, "to": new}
        return None
    return gen


def gen_count_change(p: str, rnd: random.Random):
    m = re.search(r"\b(\d{1,2}|" + "|".join(NUMBER_WORDS) + r")\s+([a-z]+)\b", p, re.I)
    if m and m.group(1).lower() != "one":
        old = m.group(1)
        new = str(int(old) + rnd.choice([1, 2])) if old.isdigit() else rnd.choice(
            [n for n in NUMBER_WORDS[1:] if n != old.lower()])
        return p[:m.start(1)] + new + p[m.end(1):], {"from": old, "to": new}
    words = p.strip(" .!").split()
    if 2 <= len(words) <= 3 and words[0].lower() in ("a", "an") \
            and re.fullmatch(r"[a-z]+", words[-1].lower()) and not words[-1].lower().endswith("s"):
        noun = words[-1].lower()
        plural = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else \
            noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
        plural = {"man": "men", "woman": "women", "child": "children", "person": "people",
                  "mouse": "mice"}.get(noun, plural)
        count = rnd.choice(["", "two ", "three "])
        b = " ".join([*(w for w in words[1:-1]), plural])
        return (count + b).strip(), {"from": words[0] + " " + noun, "to": count + plural}
    return None


def generators(vocab: Vocab):
    return [
        ("coord_reorder", "pos", gen_coord_reorder),
        ("fronted_phrase", "pos", gen_fronted_phrase),
        ("typo", "pos", gen_typo(vocab)),
        ("article_case", "pos", gen_article_case),
        ("coord_swapped_attributes", "neg", gen_coord_swapped_attributes),
        ("swapped_roles", "neg", gen_swapped_roles),
        ("fronted_swapped", "neg", gen_fronted_swapped),
        ("real_word_typo", "neg", gen_real_word_typo(vocab)),
        ("count_change", "neg", gen_count_change),
    ]


def generate(shared: Path, per_kind: int, seed: int) -> list[dict]:
    """Up to `per_kind` pairs of each kind, from prompts the dev split does not use."""
    rnd = random.Random(seed)
    dev = load_dev(shared)
    dev_canon = {canonical_prompt(r[k]) for r in dev for k in ("a", "b")}
    prompts = load_prompts(shared)
    vocab = Vocab(prompts)
    pool = [(s, p) for s, p in prompts if canonical_prompt(p) not in dev_canon]
    pairs: list[dict] = []
    for kind, label, gen in generators(vocab):
        order = rnd.sample(pool, len(pool))
        # short prompts first half the time: typos and counts in short prompts are the hard
        # cases for the embedding; long tag lists the other half
        order.sort(key=lambda sp: rnd.random() + (0.5 if len(sp[1].split()) > 12 else 0))
        seen: set[str] = set()
        got = 0
        for source, p in order:
            if got >= per_kind:
                break
            if p in seen:
                continue
            res = gen(p, rnd)
            if not res or canonical_prompt(res[0]) == canonical_prompt(p):
                continue
            seen.add(p)
            got += 1
            b = res[0]
            a, b = (b, p) if kind == "typo" else (p, b)  # the typo is cached, as in dev
            pairs.append({"id": f"rw-{kind}-{got}", "a": a, "b": b, "label": label, "kind": kind,
                          "source": source, "detail": res[1], "words_a": len(a.split())})
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--show", type=int, default=0, help="print this many pairs of each kind")
    ap.add_argument("--wrong", action="store_true", help="print the verifier's wrong answers")
    ap.add_argument("--write", type=Path, help="write the pairs as JSON lines here")
    args = ap.parse_args(argv)
    from promptcache.semantic.verifier import verify
    pairs = generate(args.shared, args.per_kind, args.seed)
    if args.write:
        args.write.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    by_kind: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)
    shown: collections.Counter[str] = collections.Counter()
    print("verifier alone (no embedding, no threshold): share of pairs it accepts")
    for r in pairs:
        ca, cb = canonical_prompt(r["a"]), canonical_prompt(r["b"])
        v = verify(ca, cb)
        by_kind[(r["label"], r["kind"])].append(v.ok)
        if shown[r["kind"]] < args.show:
            shown[r["kind"]] += 1
            print(f"  {r['kind']}: {r['a'][:90]!r} -> {r['b'][:90]!r}  {v.ok} {v.reason}")
        if args.wrong and v.ok != (r["label"] == "pos"):
            print(f"  WRONG {r['kind']}: {r['a'][:120]!r} | {r['b'][:120]!r} {v.reason} {v.detail}")
    for (label, kind), oks in sorted(by_kind.items()):
        print(f"{label:<4} {kind:<26} n={len(oks):<4} accepted {100 * sum(oks) / len(oks):5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
