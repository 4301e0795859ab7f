"""Content policy: refuse prompts in problematic categories before they reach the cache or the
generator. Pure, no I/O.

Categories (all term lists are in `TERMS`, one place):

- `minors_sexual`: ALWAYS refused, whatever the settings. A term that is sexual about minors by
  itself (`lolicon`), or a minor term (`child`, `teen`, `little girl`, an age under 18) together
  with a sexual term (`nude`, `sexy`, `lingerie`) anywhere in the prompt. A minor term alone
  (`kid`, `children`) or an adult term with a sexual one (`young woman, sexy`) is not refused
  here. This category also sees the prompt with leetspeak undone (`l0l1` -> `loli`) and spaced
  letters joined (`n u d e` -> `nude`).
- `explicit`, `gore`, `hate`: word lists, conservative: no `blood`, `shot`, `hate`, `bottomless`
  (a "bottomless chasm"), `gruesome` or `flayed` (moods of horror art, measured on real prompts).
- `real_person`: a very famous living person (short list) or "photo of First Last" (two or three
  capitalised words that name no place or thing) *together with* a photographic cue or a sexual
  term. A painting or caricature of a famous person is not refused; a photo-like one is.

Matching is on whole words, case-insensitive, accents removed; hyphens and punctuation split
words, so multi-word entries ("little girl") also match "little-girl".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Action = Literal["refuse", "allow"]
ALWAYS_REFUSED = "minors_sexual"


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """What happens to each category. minors_sexual is not a setting: it is always refused.

    Defaults refuse everything: the cache serves an image to whoever sends the same prompt, hosted
    backends (OpenAI) refuse these anyway after the caller has waited, and an operator who runs
    its own model for adult, horror or satire work can allow a category explicitly.
    """

    explicit: Action = "refuse"
    gore: Action = "refuse"
    hate: Action = "refuse"
    real_person: Action = "refuse"

    def refuses(self, category: str) -> bool:
        return category == ALWAYS_REFUSED or getattr(self, category, "refuse") == "refuse"


@dataclass(frozen=True, slots=True)
class Violation:
    category: str
    term: str  # what matched, as normalised (lower case): for the error message

    @property
    def message(self) -> str:
        return f"the prompt was refused by the content policy: {self.category} ({self.term!r})"


@dataclass(frozen=True, slots=True)
class _Terms:
    """One term list, parsed once. Entries: "word", "several words", "stem*"."""

    words: frozenset[str]
    stems: tuple[str, ...]                 # " decapitat": a word starting with it
    phrases: Mapping[str, tuple[str, ...]]  # first word -> " several words " entries
    ignore: Mapping[str, tuple[str, ...]]   # phrases removed first ("al gore")
    firsts: frozenset[str]                 # the keys of `phrases`
    ignore_firsts: frozenset[str]          # the keys of `ignore`

    @staticmethod
    def _index(phrases: list[str]) -> Mapping[str, tuple[str, ...]]:
        index: dict[str, list[str]] = {}
        for phrase in phrases:
            index.setdefault(phrase.split()[0], []).append(f" {phrase} ")
        return MappingProxyType({k: tuple(v) for k, v in index.items()})

    @classmethod
    def of(cls, entries: str, ignore: str = "") -> _Terms:
        items = [e.strip() for e in entries.split(",") if e.strip()]
        phrases = cls._index([e for e in items if " " in e])
        skip = cls._index([e.strip() for e in ignore.split(",") if e.strip()])
        return cls(frozenset(e for e in items if " " not in e and not e.endswith("*")),
                   tuple(f" {e[:-1]}" for e in items if e.endswith("*")),
                   phrases, skip, frozenset(phrases), frozenset(skip))

    def find(self, text: _Text) -> str | None:
        """The first entry found in `text` (whole words), or None."""
        joined, words = text.joined, text.words
        if (near := words & self.ignore_firsts) and (
                skip := [p for w in near for p in self.ignore[w] if p in joined]):
            for phrase in skip:
                joined = joined.replace(phrase, " ")
            words = frozenset(joined.split())
        if hit := words & self.words:
            return min(hit)
        for stem in self.stems:
            if (at := joined.find(stem)) >= 0:
                return joined[at + 1:joined.index(" ", at + 1)]
        if starts := words & self.firsts:
            for first in sorted(starts):
                for phrase in self.phrases[first]:
                    if phrase in joined:
                        return phrase.strip()
        for run in text.runs:  # spaced-out letters: any entry inside the run
            for entry in sorted(self.words) + [s.strip() for s in self.stems]:
                if len(entry) > 2 and entry in run:
                    return entry
        return None


_SEXUAL = (
    "nude, nudes, naked, nudity, nudist, topless, undressed, undressing, unclothed, "
    "no clothes, without clothes, sex, sexy, sexual, sexualized, sexualised, porn, porno, "
    "pornographic, pornography, nsfw, xxx, erotic, erotica, eroticism, seductive, seduction, "
    "seducing, sensual, sultry, provocative, lingerie, underwear, panties, panty, bra, thong, "
    "bikini, cleavage, breasts, boobs, tits, nipples, nipple, genitals, genitalia, penis, vagina, "
    "vulva, pussy, crotch, lewd, hentai, ecchi, fetish, bdsm, bondage, orgasm, masturbat*, "
    "aroused, horny, spread legs, legs spread, stripper, striptease, intercourse, blowjob, fellatio, cum, "
    "cumshot, semen, ejaculat*, rape, raped, molest*, groping, lap dance, pinup, pin up, boudoir, "
    "skimpy, see through, onlyfans, playboy, uncensored")

TERMS: Mapping[str, _Terms] = MappingProxyType({
    # sexual about minors by itself
    "minors_sexual": _Terms.of(
        "lolicon, shotacon, child porn, child pornography, kiddie porn, kiddy porn, pedophile, "
        "pedophiles, pedophilia, paedophile, paedophilia, pedo, pedos, jailbait, csam"),
    # minors: only refused together with a `sexual` term
    "minor": _Terms.of(
        "child, children, childs, childlike, kid, kids, kiddie, kiddies, toddler, toddlers, "
        "infant, infants, newborn, newborns, preteen, preteens, pre teen, pre teens, tween, "
        "tweens, teen, teens, teenage, teenaged, teenager, teenagers, underage, under age, loli, "
        "lolis, lolita, shota, shotas, schoolgirl, schoolgirls, schoolboy, schoolboys, "
        "school girl, school girls, school boy, school boys, little girl, little girls, "
        "little boy, little boys, young girl, young girls, young boy, young boys, little kid, "
        "prepubescent, pubescent, youngster, youngsters, elementary school, middle schooler, "
        "grade schooler"),
    "sexual": _Terms.of(_SEXUAL),
    "explicit": _Terms.of(
        "nude, nudes, naked, nudity, topless, porn, porno, pornographic, pornography, "
        "nsfw, xxx, hentai, ecchi, sex, sexual intercourse, intercourse, genitals, genitalia, "
        "penis, vagina, vulva, nipples, nipple, erection, orgasm, masturbat*, blowjob, fellatio, "
        "cunnilingus, cumshot, ejaculat*, bdsm, erotic, erotica, lewd, uncensored, striptease, "
        "rape, raped, bare breasts, naked breasts, exposed breasts",
        ignore="sex pistols, nude color, nude colour, nude lipstick, nude heels, nude tone"),
    "gore": _Terms.of(
        "gore, gory, dismember*, decapitat*, behead*, disembowel*, eviscerat*, "
        "mutilat*, entrails, severed head, severed heads, severed limb, severed limbs, "
        "severed arm, severed leg, severed hand, exposed organs, exposed intestines, "
        "spilled guts, spilling guts, guts spilling, torn flesh, skinned alive, "
        "blood splatter, blood splattered, pool of blood, bloodbath, gunshot wound, "
        "gunshot wounds, bullet wound, slit throat, snuff",
        ignore="al gore, gore tex, goretex, gore vidal, lesley gore"),
    "hate": _Terms.of(
        "nigger, niggers, nigga, niggas, kike, kikes, faggot, faggots, wetback, wetbacks, "
        "raghead, ragheads, towelhead, towelheads, gook, gooks, heil hitler, sieg heil, "
        "white power, white supremacy, white supremacist, gas the jews, kill all jews, "
        "kill all muslims, kill all blacks, kill all gays, death to jews, death to muslims"),
    "famous": _Terms.of(
        "donald trump, trump, joe biden, biden, barack obama, obama, michelle obama, "
        "vladimir putin, putin, xi jinping, kim jong un, elon musk, mark zuckerberg, bill gates, "
        "jeff bezos, pope francis, king charles, emmanuel macron, narendra modi, zelensky, "
        "zelenskyy, kamala harris, hillary clinton, bill clinton, greta thunberg, emma watson, "
        "taylor swift, scarlett johansson, kim kardashian, keanu reeves, tom cruise, brad pitt, "
        "angelina jolie, beyonce, rihanna, oprah winfrey, lady gaga, justin bieber, "
        "selena gomez, ariana grande, billie eilish, dwayne johnson, leonardo dicaprio, "
        "margot robbie, jennifer lawrence, zendaya, tom hanks, morgan freeman, will smith, "
        "johnny depp, cristiano ronaldo, lionel messi",
        ignore="trump card, trump cards"),
    "likeness": _Terms.of(
        "photo, photos, photograph, photographs, photography, photographic, photorealistic, "
        "realistic, hyperrealistic, hyperrealism, ultra realistic, dslr, polaroid, footage, "
        "cctv, security camera, bodycam, paparazzi, press photo, selfie, mugshot, headshot, "
        "deepfake, leaked, candid, webcam, film still, movie still, news photo, 35mm, 50mm, "
        "85mm, canon eos, nikon, " + _SEXUAL),
})

# no leading \b: the regex engine then scans for the literals (`_real_person` checks the start)
_NAMED = re.compile(r"(?:photo|photograph|selfie|mugshot|footage|paparazzi shot|press photo)s?"
                    r" of ((?:[A-Z][a-z]+)(?: [A-Z][a-z]+){1,2})\b")
_NAMED_HINTS = ("photo", "selfie", "mugshot", "footage", "paparazzi")
_NOT_PERSON = frozenset(
    "House Tower Bridge Street Road Avenue City Park Opera Building Temple Church Cathedral "
    "Palace Castle Square Mountain Mount River Lake Beach Island Station Hall Museum Garden "
    "Valley Canyon Falls Desert Forest Sea Ocean Bay New San Los Las Saint St North South East "
    "West Great Grand Old Times Empire State Central Golden Gate Eiffel Santa Claus Mickey "
    "Mouse Harry Potter Darth Vader Iron Man Spider Batman Superman".split())
# An age under 18. Each pattern starts with what the regex engine can scan for (no leading
# assertion); `_minor_age` checks that a word starts there.
_AGE_NUMBER = re.compile(r"(\d(?: ?\d)?) ?-? ?(?:(?:years?|yrs?) ?-? ?old|y ?/ ?o|yo)\b")
_AGE_AGED = re.compile(r"aged? (\d(?: ?\d)?)\b")
_AGE_WORDS = re.compile(r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
                        r"thirteen|fourteen|fifteen|sixteen|seventeen) ?-? ?years? ?-? ?old\b")
# Leetspeak inside a word ("l0li", "s3x", "$exy", "5exy", "nud3"), not "8k", "3d", "1950s" or
# "4th". It starts with the leet character so that the regex engine can scan for it.
_LEET = re.compile(r"[013457@$](?:(?<=[a-z].)(?=[013457@$]*[a-z])|(?<=[@$])(?=[a-z])"
                   r"|(?<![a-z0-9_].)(?<=[013457])(?!st|nd|rd|th)(?=[a-z]{2})"
                   r"|(?<=[a-z]{2}.)(?<=[013457])(?![a-z0-9_]))")
_SPACED = re.compile(r" [a-z] [a-z] [a-z] ")
_WORDS = re.compile(r"[^\W_]+")
_COMBINING = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_LEET_I = str.maketrans("013457@$", "oieastas")
_LEET_L = str.maketrans("013457@$", "oleastas")


@dataclass(frozen=True, slots=True)
class _Text:
    """A prompt reduced to lower-case words: a set for single words, a padded string for
    phrases, and (read with `squeeze`) runs of spaced letters joined up ("n u d e k i d" ->
    "nudekid"), in which terms are looked for as substrings."""

    words: frozenset[str]
    joined: str
    spaced: bool  # three one-letter words in a row ("n u d e"), not spaced digits ("1 9 5 0")
    runs: tuple[str, ...] = ()
    listed: tuple[str, ...] = ()  # the words in order

    @classmethod
    def of(cls, text: str, *, squeeze: bool = False) -> _Text:
        words = _WORDS.findall(text)
        joined = f" {' '.join(words)} "
        spaced = _SPACED.search(joined) is not None
        runs: list[str] = []
        if squeeze and spaced:
            run: list[str] = []
            for w in [*words, "  "]:
                if len(w) == 1:
                    run.append(w)
                    continue
                if len(run) >= 3:
                    runs.append("".join(run))
                run = []
        return cls(frozenset(words), joined, spaced, tuple(runs), tuple(words))


def _fold(text: str) -> str:
    """Lower case without accents ("Beyoncé" -> "beyonce")."""
    text = text.lower()
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return text if decomposed == text else _COMBINING.sub("", decomposed)


def _minor_age(text: str) -> str | None:
    matches = []
    if "y" in text:
        matches += _AGE_NUMBER.finditer(text)
        if "year" in text:
            matches += _AGE_WORDS.finditer(text)
    if "age" in text:
        matches += _AGE_AGED.finditer(text)
    for m in matches:
        before = text[m.start() - 1] if m.start() else " "
        if before.isalnum() or before == ".":  # "1.5 years old", "image 12", "thirty-one"
            continue
        if m.re is _AGE_WORDS or int(m[1].replace(" ", "")) < 18:
            return m[0]
    return None


def _minors_sexual(base: str, plain: _Text) -> str | None:
    variants = [plain]
    if plain.spaced or _LEET.search(base):  # leetspeak or spaced letters: read those too
        variants += [_Text.of(base.translate(_LEET_I), squeeze=True),
                     _Text.of(base.translate(_LEET_L), squeeze=True)]
    for v in variants:
        if term := TERMS["minors_sexual"].find(v):
            return term
    minor = next((t for v in variants if (t := TERMS["minor"].find(v))), None)
    if minor is None:
        minor = _minor_age(base)
    if minor is None:
        return None
    sexual = next((t for v in variants if (t := TERMS["sexual"].find(v))), None)
    return f"{minor} + {sexual}" if sexual else None


def _real_person(text: str, base: str, plain: _Text) -> str | None:
    name = TERMS["famous"].find(plain)
    if name is None:
        if not any(k in base for k in _NAMED_HINTS):
            return None
        m = next((m for m in _NAMED.finditer(text)
                  if not (m.start() and text[m.start() - 1].isalnum())
                  and not _NOT_PERSON.intersection(m[1].split())), None)
        if m is None:
            return None
        name = m[1].lower()
    cue = TERMS["likeness"].find(plain)
    return f"{name} + {cue}" if cue else None


@dataclass(frozen=True, slots=True)
class Screened:
    violation: Violation | None
    words: tuple[str, ...]  # the prompt's lower-case words, accents removed (for the enhancers)


def screen(text: str, settings: PolicySettings) -> Screened:
    """The first refused category that `text` falls in (or None), and the words read. `text`
    is the standardised prompt (case kept: the "photo of First Last" pattern reads capitals)."""
    base = _fold(text)
    plain = _Text.of(base)
    if term := _minors_sexual(base, plain):
        return Screened(Violation(ALWAYS_REFUSED, term), plain.listed)
    for category in ("explicit", "gore", "hate"):
        if settings.refuses(category) and (term := TERMS[category].find(plain)):
            return Screened(Violation(category, term), plain.listed)
    if settings.refuses("real_person") and (term := _real_person(text, base, plain)):
        return Screened(Violation("real_person", term), plain.listed)
    return Screened(None, plain.listed)


def check(text: str, settings: PolicySettings) -> Violation | None:
    """The first refused category that `text` falls in, or None."""
    return screen(text, settings).violation


ALLOW_ALL = PolicySettings(explicit="allow", gore="allow", hate="allow", real_person="allow")
