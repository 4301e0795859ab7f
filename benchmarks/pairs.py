"""Labeled prompt pairs for the semantic-tier benchmarks: the dev split and held-out-style pairs.

Shared by benchmarks/semantic_quality.py (offline: cosine + verifier) and
benchmarks/semantic_service.py (through the running service). The generators make pairs of the
kinds the dev split does not have (swapped attributes and roles, spatial, day/night,
season/weather, age, combined rewrites, plus fresh count / negation / artist edits and an
unlabeled one-letter probe) from real prompts in ../shared/data/prompts, leaving out the dev
prompts. The word lists were written for the generator, not the verifier.
"""

from __future__ import annotations

import collections
import difflib
import json
import random
import re
from pathlib import Path

from promptcache.prompts import canonical_prompt

DEV_FILES = ("positives", "negatives", "borderline")


def load_dev(shared: Path) -> list[dict]:
    """The dev pairs (../shared/eval/dev/*.jsonl), byte-exact."""
    out: list[dict] = []
    for name in DEV_FILES:
        with (shared / "eval" / "dev" / f"{name}.jsonl").open() as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


BAD = re.compile(r"\b(nude|naked|nsfw|sex\w*|porn\w*|gore|blood\w*|kill\w*|corpse|breasts?)\b", re.I)

# -- held-out-style pair generators (word lists written for the generator, not the verifier) --
COLORS = "red blue green yellow black white purple pink orange brown gray grey silver golden".split()
MATERIALS = "wooden metallic glass plastic leather fabric rubber ceramic fluffy".split()
SPATIAL = [("on the left of", "on the right of"), ("on the right of", "on the left of"),
           ("to the left of", "to the right of"), ("to the right of", "to the left of"),
           ("above", "below"), ("below", "above"), ("in front of", "behind"),
           ("behind", "in front of"), ("on top of", "underneath"), ("under", "on top of"),
           ("over", "under"), ("inside", "outside"), ("near", "far from"), ("next to", "far from")]
DAY_NIGHT = [("daytime", "nighttime"), ("nighttime", "daytime"), ("day", "night"), ("night", "day"),
             ("morning", "night"), ("evening", "morning"), ("noon", "midnight"),
             ("midnight", "noon"), ("sunrise", "midnight"), ("sunset", "noon"),
             ("daylight", "moonlight"), ("moonlight", "daylight"), ("dusk", "noon")]
SEASON = [("summer", "winter"), ("winter", "summer"), ("spring", "autumn"), ("autumn", "spring"),
          ("sunny", "rainy"), ("rainy", "sunny"), ("snowy", "sunny"), ("foggy", "clear"),
          ("cloudy", "sunny"), ("stormy", "calm"), ("snow", "rain"), ("rain", "snow")]
AGE = [("young", "old"), ("old", "young"), ("elderly", "young"), ("boy", "old man"),
       ("girl", "old woman"), ("child", "old man"), ("baby", "adult"), ("kid", "old man"),
       ("teenage", "elderly"), ("puppy", "old dog"), ("kitten", "old cat"), ("little", "old")]
INSERTS = {"day_night": [", at night", ", in broad daylight", ", at dawn"],
           "season_weather": [", in winter", ", on a rainy day", ", in the snow", ", in autumn"]}
ARTISTS = ["claude monet", "frida kahlo", "banksy", "yoshitaka amano", "norman rockwell",
           "ansel adams", "edward hopper", "tim burton", "wes anderson", "katsushika hokusai",
           "jean-michel basquiat", "rene magritte", "studio ghibli", "moebius"]
NUMBERS = "two three four five six seven eight nine ten".split()
SYNONYMS = [("photo", "photograph"), ("photograph", "photo"), ("big", "large"), ("large", "big"),
            ("picture", "image"), ("couch", "sofa"), ("sofa", "couch"), ("car", "automobile"),
            ("kid", "child"), ("kids", "children"), ("highly detailed", "very detailed"),
            ("very detailed", "highly detailed"), ("colorful", "colourful"), ("gray", "grey"),
            ("grey", "gray"), ("beautiful", "gorgeous"), ("cute", "adorable"), ("ocean", "sea"),
            ("forest", "woods"), ("jumping", "leaping"), ("shiny", "glossy"), ("happy", "cheerful"),
            ("scary", "frightening"), ("huge", "enormous"), ("wearing", "dressed in"),
            ("holding", "carrying"), ("next to", "beside"), ("beside", "next to"),
            ("under", "beneath"), ("underneath", "beneath"), ("bunny", "rabbit"),
            ("bicycle", "bike"), ("sitting", "seated"), ("looking at", "gazing at"),
            ("in the style of", "in the art style of"), ("unreal engine", "unreal engine 5"),
            ("4k", "4 k"), ("8k", "8 k"), ("artstation", "art station"), ("close-up", "close up"),
            ("sci-fi", "scifi"), ("realistic", "lifelike"), ("fantasy", "fantastical"),
            ("trending on artstation", "artstation trending"), ("digital art", "digital artwork"),
            ("concept art", "concept artwork"), ("illustration", "illustrated artwork"),
            ("small", "tiny"), ("tiny", "small"), ("sunset", "sundown"), ("man", "guy"),
            ("woman", "lady"), ("portrait of", "portrait depicting"), ("stone", "rock"),
            ("photorealistic", "photo-realistic"), ("hyper realistic", "hyperrealistic"),
            ("cinematic lighting", "cinematic light"), ("8k", "8k resolution"),
            ("airplane", "plane"), ("television", "tv"), ("intricate", "intricately detailed")]
ROLE_VERB = re.compile(r"\b(a|an|the)\s+([a-z]{3,})\s+((?:is\s+)?[a-z]+(?:ing|es|s)\s+"
                       r"(?:at\s+|on\s+|with\s+|to\s+)?)(a|an|the)\s+([a-z]{3,})\b", re.I)
NOT_NOUN = set(COLORS + MATERIALS) | {"that", "this", "which", "very", "with", "and", "one"}


def _sub_once(text: str, old: str, new: str) -> str | None:
    """Replace the first whole-word `old` outside double quotes (quoted text is drawn text)."""
    pat = re.compile(rf"(?<![\w-]){re.escape(old)}(?![\w-])", re.I)
    parts = re.split(r'("[^"]*")', text)
    for i in range(0, len(parts), 2):
        if pat.search(parts[i]):
            parts[i] = pat.sub(new, parts[i], count=1)
            return "".join(parts)
    return None


def gen_swap_table(kind, table, inserts=()):
    def gen(p, rnd):
        for old, new in rnd.sample(table, len(table)):
            b = _sub_once(p, old, new)
            if b:
                return b, {"from": old, "to": new}
        if inserts and len(p.split()) <= 40 and rnd.random() < 0.5:
            ins = rnd.choice(inserts)
            head, sep, tail = p.partition(",")
            return head.rstrip(" .") + ins + sep + tail, {"insert": ins}
        return None
    return kind, "neg", gen


def gen_swapped_attributes(p, rnd):
    words = p.split()
    idx = [i for i, w in enumerate(words) if w.lower().strip(",.") in COLORS + MATERIALS
           and i + 1 < len(words)]
    for i in idx:
        for j in idx:
            wi, wj = words[i].lower().strip(",."), words[j].lower().strip(",.")
            if j > i and wi != wj and {wi, wj} != {"gray", "grey"}:
                out = list(words)
                out[i], out[j] = words[j], words[i]
                return " ".join(out), {"swapped": [wi, wj]}
    return None


def gen_swapped_roles(p, rnd):
    m = ROLE_VERB.search(p)
    if not m or m.group(2).lower() == m.group(5).lower():
        return None
    if {m.group(2).lower(), m.group(5).lower()} & NOT_NOUN:
        return None
    b = p[:m.start(2)] + m.group(5) + " " + m.group(3) + m.group(4) + " " + m.group(2) + p[m.end(5):]
    return b, {"swapped": [m.group(2), m.group(5)]}


def gen_spatial_objects(p, rnd):
    m = re.search(r"\b(a|an|the)\s+(\w+)\s+((?:on the (?:left|right) of|to the (?:left|right) of|"
                  r"above|below|behind|in front of|on top of|under|next to))\s+(a|an|the)\s+(\w+)\b",
                  p, re.I)
    if not m or m.group(2).lower() == m.group(5).lower():
        return None
    b = p[:m.start(2)] + m.group(5) + " " + m.group(3) + " " + m.group(4) + " " + m.group(2) + p[m.end(5):]
    return b, {"swapped_objects": [m.group(2), m.group(5)]}


def gen_count(p, rnd):
    m = re.search(r"\b(\d{1,2}|" + "|".join(NUMBERS) + r")\s+([a-z]+s)\b", p, re.I)
    if not m:
        return None
    old = m.group(1)
    new = str(int(old) + rnd.choice([1, 2, 3])) if old.isdigit() else rnd.choice(
        [n for n in NUMBERS if n != old.lower()])
    return p[:m.start(1)] + new + p[m.end(1):], {"from": old, "to": new}


def gen_negation(p, rnd):
    for old, new in ((" with a ", " with no "), (" with ", " with no "), (" and a ", " and no ")):
        if old in p:
            return p.replace(old, new, 1), {"from": old.strip(), "to": new.strip()}
    return None


def gen_artist(p, rnd):
    m = re.search(r"\b(by|style of)\s+([a-z][\w.\-]+(?:\s+[a-z][\w.\-]+)?)", p, re.I)
    if not m:
        return None
    new = rnd.choice([a for a in ARTISTS if a != m.group(2).lower()])
    return p[:m.start(2)] + new + p[m.end(2):], {"from": m.group(2), "to": new}


def gen_combined(p, rnd):
    for old, new in rnd.sample(SYNONYMS, len(SYNONYMS)):
        b = _sub_once(p, old, new)
        if b:
            break
    else:
        return None
    case = rnd.choice(["upper", "title", "capitalize", "lower"])
    b = getattr(b, case)()
    punct = rnd.choice(["pipes", "semicolons", "exclaim", "period", "tight"])
    b = {"pipes": lambda s: s.replace(", ", " | "), "semicolons": lambda s: s.replace(",", ";"),
         "exclaim": lambda s: s.rstrip(" .") + "!!", "period": lambda s: s.rstrip(" .") + ".",
         "tight": lambda s: s.replace(", ", ",")}[punct](b)
    return b, {"synonym": [old, new], "case": case, "punct": punct}


_VOCAB: dict[str, list[str]] = {}  # deletion key -> corpus words (>= 5 uses), for one_letter


def build_vocab(prompts) -> None:
    counts = collections.Counter(w for _, p in prompts for w in re.findall(r"[a-z]{4,}", p.lower()))
    for w, n in counts.items():
        if n >= 5:
            for i in range(len(w)):
                _VOCAB.setdefault(w[:i] + w[i + 1:], []).append(w)


def gen_one_letter(p, rnd):
    """Another real word one letter away ("horse" -> "house"): the typo rule's worst case."""
    words = re.findall(r"\b[a-z]{4,}\b", p)
    for w in rnd.sample(words, len(words)):
        near = {v for i in range(len(w)) for v in _VOCAB.get(w[:i] + w[i + 1:], ())}
        near |= set(_VOCAB.get(w, ()))
        near = sorted(v for v in near if v != w and v.rstrip("s") != w.rstrip("s"))
        if near:
            new = rnd.choice(near)
            return re.sub(rf"\b{w}\b", new, p, count=1), {"from": w, "to": new}
    return None


GENERATORS = [
    ("swapped_attributes", "neg", gen_swapped_attributes), ("swapped_roles", "neg", gen_swapped_roles),
    gen_swap_table("spatial", SPATIAL), ("spatial_objects", "neg", gen_spatial_objects),
    gen_swap_table("day_night", DAY_NIGHT, INSERTS["day_night"]),
    gen_swap_table("season_weather", SEASON, INSERTS["season_weather"]),
    gen_swap_table("age", AGE), ("count_fresh", "neg", gen_count),
    ("negation_fresh", "neg", gen_negation), ("artist_fresh", "neg", gen_artist),
    ("one_letter_word", "probe", gen_one_letter),
    ("combined", "pos", gen_combined),
]


def load_prompts(shared: Path) -> list[tuple[str, str]]:
    d = shared / "data" / "prompts"
    out = [("diffusiondb", r["text"]) for r in json.loads((d / "imagereward_refl_data.json").read_text())]
    out += [("diffusiondb", r["prompt"]) for r in json.loads((d / "imagereward_test.json").read_text())]
    out += [("parti", line.split("\t")[0]) for line in (d / "PartiPrompts.tsv").read_text().splitlines()[1:]]
    out += [("drawbench", t) for t in json.loads((d / "dreambench_drawbench.json").read_text())]
    for f in sorted((d / "t2i_compbench").glob("*.txt")):
        out += [("t2i_compbench", line) for line in f.read_text().splitlines()]
    return [(s, p.strip()) for s, p in out if p.strip() and len(p) <= 600 and not BAD.search(p)]


def own_pairs(prompts, dev_canon: set[str], per_kind: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    build_vocab(prompts)
    pool = [(s, p) for s, p in prompts if canonical_prompt(p) not in dev_canon]
    pairs = []
    for kind, label, gen in GENERATORS:
        order = rnd.sample(pool, len(pool))
        # balance: t2i/parti prompts are short and structured, diffusiondb long tag lists
        order.sort(key=lambda sp: rnd.random() + (0.5 if sp[0] == "diffusiondb" else 0))
        seen, got = set(), 0
        for source, p in order:
            if got >= per_kind or p in seen:
                continue
            res = gen(p, rnd)
            if res and canonical_prompt(res[0]) != canonical_prompt(p):
                seen.add(p)
                got += 1
                pairs.append({"id": f"own-{kind}-{got}", "a": p, "b": res[0], "label": label,
                              "kind": kind, "source": source, "detail": res[1],
                              "words_a": len(p.split())})
    return pairs


def mined_pairs(prompts, limit: int) -> list[dict]:
    """Unlabeled near-duplicates among real DiffusionDB prompts (users retyping a prompt)."""
    buckets: dict[str, list[str]] = collections.defaultdict(list)
    for source, p in prompts:
        c = canonical_prompt(p)
        if source == "diffusiondb" and c not in buckets[" ".join(c.split()[:3])]:
            buckets[" ".join(c.split()[:3])].append(c)
    out = []
    for group in buckets.values():
        for i, a in enumerate(group[:40]):
            for b in group[i + 1:40]:
                if difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.85:
                    out.append({"id": f"mined-{len(out)}", "a": a, "b": b, "label": "unlabeled",
                                "kind": "mined", "source": "diffusiondb", "words_a": len(a.split())})
    return out[:limit]


# -- acceptable rewrites for the service benchmark (held-out style: several harmless edits at
# once, so each rewrite is a new text whose embedding must be computed) ------------------------
REQUEST_PREFIXES = ("please draw ", "draw me ", "can you make ", "generate an image of ",
                    "i want ", "show me ", "create a picture of ", "please create ", "render ",
                    "could you please draw ", "make me an image of ", "give me ", "pls draw ",
                    "i would like ", "depict ", "illustrate ")
POLITE_SUFFIXES = ("", "", ", please", " please", ", thanks", " thank you", " :)", "!")


_QUOTES_OR_BRACKETS = re.compile(r"[\"\u201c\u201d\u2018\u2019()\[\]{}]")
_STARTS_LIKE_A_REQUEST = re.compile(
    r"^(?:me|us|i|please|pls|can|could|draw|render|generate|create|make|show|give|depict|"
    r"illustrate|imagine|design|picture|image|an? (?:picture|image))\b", re.I)


def rewrite(p: str, rnd: random.Random) -> tuple[str, dict] | None:
    """A rewrite a user would accept the same picture for: a request phrasing in front, "a"/"an"
    and "the" exchanged once, the tags after the first reordered (when there are four or more),
    a polite ending. None for prompts where one of these would change what is asked: quoted
    text (drawn in the picture), emphasis brackets, a prompt that already starts like a request
    (or with "me"), or one that does not start with a letter."""
    b = " ".join(p.split())
    if not b[:1].isalpha() or _QUOTES_OR_BRACKETS.search(b) or _STARTS_LIKE_A_REQUEST.match(b):
        return None
    detail: dict = {}
    m = re.search(r"(?<![\w'-])(a|an|the)(?![\w'-])", b, re.I)
    if m and rnd.random() < 0.7:
        new = "the" if m.group(1).lower() in ("a", "an") else "a"
        b = b[:m.start()] + new + b[m.end():]
        detail["article"] = [m.group(1), new]
    tags = [t.strip() for t in b.split(",")]
    if len(tags) >= 4 and all(tags):
        tail = tags[1:]
        for _ in range(5):
            rnd.shuffle(tail)
            if tail != tags[1:]:
                break
        b = ", ".join([tags[0], *tail])
        detail["tags_reordered"] = len(tail)
    prefix = rnd.choice(REQUEST_PREFIXES)
    b = prefix + (b[0].lower() + b[1:] if not b[1:2].isupper() else b)
    suffix = rnd.choice(POLITE_SUFFIXES)
    b = b.rstrip(" .") + suffix
    detail.update(prefix=prefix.strip(), suffix=suffix.strip())
    return b, detail


def gen_request_rewrite(p, rnd):
    return rewrite(p, rnd)


HELD_OUT_STYLE = [*GENERATORS, ("request_rewrite", "pos", gen_request_rewrite)]
