"""The semantic-tier verifier: which prompt pairs may share a cached picture.

Hand-written pairs, one kind of difference each, checked in both directions (the verifier is
used with either prompt cached). Prompts go through canonical_prompt first, as in the service.
"""

from __future__ import annotations


import pytest

from promptcache.prompts import KEY_SCHEMA, cache_key, canonical_prompt, normalize_params
from promptcache.semantic import lexicon
from promptcache.semantic.verifier import Verdict, parse, request_core, verify
from schemas.events import Params


def check(a: str, b: str) -> tuple[Verdict, Verdict]:
    ca, cb = canonical_prompt(a), canonical_prompt(b)
    return verify(ca, cb), verify(cb, ca)


MUST_REFUSE = [
    # (reason, a, b)
    ("color", "a yellow umbrella on a rainy street", "a purple umbrella on a rainy street"),
    ("color", "knight in silver armour, castle gate", "knight in golden armour, castle gate"),
    ("count", "three apples on a plate", "five apples on a plate"),
    ("count", "3 candles on a cake", "4 candles on a cake"),
    ("count", "a candle on a wooden table", "candles on a wooden table"),
    ("negation", "an old sailor with a beard", "an old sailor without a beard"),
    ("negation", "a city street with no cars", "a city street with cars"),
    ("negation", "a portrait of a man, not smiling", "a portrait of a man, smiling"),
    ("spatial", "a lamp to the left of the sofa", "a lamp to the right of the sofa"),
    ("spatial", "a kite above the trees", "a kite below the trees"),
    ("spatial", "a child in front of the barn", "a child behind the barn"),
    ("spatial", "a ball on top of a box", "a box on top of a ball"),
    ("spatial", "a cup on the table", "a cup under the table"),
    ("time_of_day", "a lighthouse at night", "a lighthouse at noon"),
    ("time_of_day", "city skyline at sunrise, photo", "city skyline at midnight, photo"),
    ("time_of_day", "a quiet village square", "a quiet village square at dusk"),
    ("season_weather", "a log cabin by a lake in winter", "a log cabin by a lake in summer"),
    ("season_weather", "a tram on a sunny day", "a tram on a foggy day"),
    ("age", "portrait of an old fisherman", "portrait of a young fisherman"),
    ("age", "a puppy playing in the grass", "a dog playing in the grass"),
    ("gender", "a queen sitting on a throne", "a king sitting on a throne"),
    ("gender", "she is reading a book by the fire", "he is reading a book by the fire"),
    ("species", "a fox sleeping under an oak", "a wolf sleeping under an oak"),
    ("species", "a hummingbird drinking nectar", "a bumblebee drinking nectar"),
    ("subject", "a teapot on a kitchen shelf", "a vase on a kitchen shelf"),
    ("artist", "misty mountains, by claude monet", "misty mountains, by caspar friedrich"),
    ("artist", "a ruined abbey in the style of hokusai", "a ruined abbey in the style of moebius"),
    ("medium", "a watercolor of a harbor at dawn", "an etching of a harbor at dawn"),
    ("style", "a cubist portrait of a violinist", "a baroque portrait of a violinist"),
    ("text", 'a shop sign that says "OPEN"', 'a shop sign that says "CLOSED"'),
    ("text", 'a mug printed with "Good Morning"', 'a mug printed with "GOOD MORNING"'),
    ("binding", "a green apple and a red pear", "a red apple and a green pear"),
    ("binding", "a wooden chair next to a metal table", "a metal chair next to a wooden table"),
    ("binding", "a woman with red hair and blue eyes", "a woman with blue hair and red eyes"),
    ("role", "a cat chasing a mouse", "a mouse chasing a cat"),
    ("role", "a boy teaching a robot to paint", "a robot teaching a boy to paint"),
    ("weight", "a (red:1.4) kite over the sea", "a red kite over the sea"),
    ("weight", "a castle, ((dramatic sky))", "a castle, dramatic sky"),
]


@pytest.mark.parametrize(("reason", "a", "b"), MUST_REFUSE)
def test_refuses_picture_changes(reason: str, a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert not forward.ok and not backward.ok, (forward, backward)
    assert forward.reason == reason, forward
    assert backward.reason == reason, backward


REFUSE_ANY_REASON = [
    ("a horse in a field of poppies", "a house in a field of poppies"),  # one letter, two words
    ("a mouse on a desk", "a moose on a desk"),
    ("a castle, matte painting", "a castle, latte painting"),  # not a typo on the first letter
    ("a tiger in the jungle", "a giger in the jungle"),
    ("a bowl of soup", "a bowl of soup with bread"),  # added content
    ("a bowl of soup, 8k, trending on artstation", "a bowl of soup"),  # quality tags
    ("a green house in a garden", "a greenhouse in a garden"),  # colour + noun is no compound
    ("a 🐶 in a party hat", "a 🐱 in a party hat"),
    ("一只猫在雪中", "一只狗在雪中"),
    ("a cat", ""),
    ("!!!", "???"),
    ("a red fox, snow", "a red fox, snow, 4 k"),
    ("a photo of a bridge", "a painting of a bridge"),
    ("a dog sitting on a bench", "a dog standing on a bench"),
]


@pytest.mark.parametrize(("a", "b"), REFUSE_ANY_REASON)
def test_refuses_other_differences(a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert not forward.ok and not backward.ok, (forward, backward)
    assert forward.reason and backward.reason


MUST_ACCEPT = [
    # punctuation, separators, hyphens
    ("a red fox, snowy forest, moonlight", "a red fox | snowy forest | moonlight"),
    ("a red fox, snowy forest, moonlight", "a red fox; snowy forest; moonlight!"),
    ("a red fox, snowy forest, moonlight", "a red fox snowy forest moonlight"),
    ("a hand-drawn map of an island", "a hand - drawn map of an island"),
    # filler: requests, politeness, articles
    ("a lighthouse on a cliff", "please draw me a lighthouse on a cliff"),
    ("a lighthouse on a cliff", "Create an image of a lighthouse on a cliff, thanks!"),
    ("a lighthouse on a cliff", "the lighthouse on cliff pls"),
    ("a lighthouse on a cliff", "I want a picture of a lighthouse on a cliff :)"),
    # synonyms and spelling
    ("a kid riding a bike", "a child riding a bicycle"),
    ("a colourful parrot on a branch", "a colorful parrot on a branch"),
    ("a grey cat on a windowsill", "a gray cat on a windowsill"),
    ("two dogs on a beach", "2 dogs on a beach"),
    ("a huge whale under a boat", "an enormous whale beneath a boat"),
    ("a photo of a stone bridge", "a photograph of a stone bridge"),
    ("close - up of a bee on a flower", "closeup of a bee on a flower"),
    ("a sci-fi city, unreal engine", "a scifi city, unreal engine 5"),
    ("a harbor in the style of van gogh", "a harbor in the art style of van gogh"),
    ("portrait of a knight, highly detailed, 8k", "portrait of a knight, very detailed, 8 k"),
    ("a woman sitting on a couch", "a lady seated on a sofa"),
    ("a stylised owl logo", "a stylized owl logo"),
    # typos (one of the two words is no real word)
    ("a majestic elephant in the savanna", "a majestic elephnat in the savanna"),
    ("portrait of a knight, highly detailed", "portrait of a knight, hihgly detailed"),
    ("a wizard casting a spell, fantasy art by greg rutkowski",
     "a wizard casting a spell, fantasy art by greg rutkowsky"),
    # "and" between items, reordered tags, clauses and sentences
    ("a tall and young soldier, desert", "a tall young soldier, desert"),
    ("a red kite and a green balloon", "a green balloon and a red kite"),
    ("a forest, art by ivan shishkin and bob ross", "a forest, art by bob ross and ivan shishkin"),
    ("castle, fog, moonlight, oil painting", "oil painting, moonlight, castle, fog"),
    ("A red car. A blue sky.", "A blue sky. A red car."),
    # same text, other scripts and emoji
    ("一只猫, 在雪中", "一只猫 在雪中"),
    ("a 🐶 in a party hat", "a 🐶 in a party hat!"),
    ('a sign that says "Hello World", pixel art', 'a sign that says "Hello World" | pixel art'),
]


@pytest.mark.parametrize(("a", "b"), MUST_ACCEPT)
def test_accepts_harmless_rewrites(a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert forward.ok and backward.ok, (forward, backward)


def test_verdict_for_equal_and_reasons_are_named() -> None:
    assert verify("a cat", "a cat") == Verdict(True, None, "")
    v = verify(canonical_prompt("a red car"), canonical_prompt("a blue car"))
    assert v.reason == "color" and "red" in v.detail and "blue" in v.detail


def test_without_spelling_dictionary_no_typo_is_forgiven(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lexicon, "_DICT", {})
    a, b = "a majestic elephant in the savanna", "a majestic elephnat in the savanna"
    assert not verify(a, b).ok
    monkeypatch.setattr(lexicon, "_DICT", None)
    assert verify(a, b).ok


def test_parse_is_stable_under_bad_input() -> None:
    for text in ["", " ", "(((", ")))", "[[a]]", "\"unclosed", "a" * 5000, "🎨" * 50,
                 "(cat:1.2:3)", "::::", "\x00\x01\x02", "a. b. c.", "1.5 2.5 3.5"]:
        assert parse(text) == parse(text), text  # no state carried between calls
        base, cat, dog = (canonical_prompt(text + extra) for extra in ("", " cat", " dog"))
        assert verify(base, base).ok, text
        assert not verify(base, cat).ok, text  # an added subject never passes
        swapped = verify(cat, dog)
        assert not swapped.ok and swapped.reason == "species", (text, swapped)


# --- issue 18: natural rewrites that ask for the same picture, and their hard negatives ------

REORDERED = [
    # coordinated noun phrases swapped, attributes staying with their nouns
    ("a corgi wearing a purple party hat and a red bowtie",
     "a corgi wearing a red bowtie and a purple party hat"),
    ("a brown dog and a white cat", "a white cat and a brown dog"),
    ("two cats and three dogs", "three dogs and two cats"),
    ("a man holding a cat and a dog", "a man holding a dog and a cat"),
    ("a dog and a cat sitting on a bench", "a cat and a dog sitting on a bench"),
    ("a cat and a dog in a box", "a dog and a cat in a box"),
    ("a red apple, a green pear and a yellow banana",
     "a yellow banana, a green pear and a red apple"),
    ("a cat on a chair and a dog on a sofa", "a dog on a sofa and a cat on a chair"),
    ("a bowl of apples and oranges", "a bowl of oranges and apples"),
    # a fronted prepositional phrase, with or without its comma
    ("A dog gives an apple to a squirrel", "To a squirrel, a dog gives an apple."),
    ("A dog gives an apple to a squirrel", "To a squirrel a dog gives an apple"),
    ("a pig in a forest", "In a forest, a pig"),
    ("a frog on the left of a table", "On the left of a table, a frog"),
    ("a pickup truck at the beach at sunrise", "At the beach at sunrise, a pickup truck"),
    ("a city skyline at night, oil painting", "At night, a city skyline, oil painting"),
    ("a pig and a cow in a forest", "In a forest, a cow and a pig"),
]


@pytest.mark.parametrize(("a", "b"), REORDERED)
def test_accepts_reordered_coordinations_and_fronted_phrases(a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert forward.ok and backward.ok, (forward, backward)


REORDER_REFUSED = [
    # (reason, a, b): the same words, another picture
    ("binding", "a red car and a blue bike", "a blue car and a red bike"),
    ("binding", "a girl in a red dress and a blue hat", "a girl in a blue dress and a red hat"),
    ("role", "a dog chasing a cat", "a cat chasing a dog"),
    ("role", "a dog chasing a cat and a mouse", "a cat chasing a dog and a mouse"),
    ("role", "a dog and a cat chasing a mouse", "a mouse chasing a dog and a cat"),
    ("role", "a squirrel gives an apple to a dog", "To a squirrel, a dog gives an apple."),
    ("role", "a cat on a chair and a dog on a sofa", "a cat on a sofa and a dog on a chair"),
    # the modifier or phrase may belong to one conjunct only: moving it is a binding change
    ("role", "a cat and a dog with a hat", "a dog and a cat with a hat"),
    ("role", "a sleeping cat and a dog", "a sleeping dog and a cat"),
    ("role", "a cat and a dog wearing hats", "a dog wearing hats and a cat"),
    ("role", "a dog on a sofa and a cat on a chair", "a dog on a cat and a sofa on a chair"),
    # a fronted phrase whose clause has a relation of its own could attach elsewhere
    ("spatial", "behind a wall, a man in front of a car", "a man in front of a car behind a wall"),
    ("role", "with a hat, a man and a woman", "a man and a woman with a hat"),
]


@pytest.mark.parametrize(("reason", "a", "b"), REORDER_REFUSED)
def test_refuses_reorders_that_move_attributes_or_roles(reason: str, a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert not forward.ok and not backward.ok, (forward, backward)
    assert forward.reason == reason and backward.reason == reason, (forward, backward)


TYPOS = [
    ("a pig in a forest", "a pig in a froest"),
    ("four ships", "four shipps"),
    ("darth maul", "datrh maul"),
    ("a photo of a lighthouse", "a hpoto of a lighthouse"),  # first two letters swapped
    ("four swans and two suitcases", "foru swans and two suitcases"),  # a number word
    ("a woman on the right of a phone", "a woman on the rigght of a phone"),  # inside a phrase
    ("fat cat eating hamburger high detail photo", "fat cat eating hamburger hifh detail photo"),
    ("a tumbling acrobat", "a tunbling acrobat"),  # a neighbouring key
    ("one cat sitting on the grass", "one cat sitting on the grasss"),
]


@pytest.mark.parametrize(("a", "b"), TYPOS)
def test_accepts_a_misspelling_of_a_word_the_other_prompt_has(a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert forward.ok and backward.ok, (forward, backward)


NOT_TYPOS = [
    ("a cat on a mat", "a car on a mat"),  # two real words, however close
    ("a man in a hat", "a man in a bat"),
    ("a horse in a field", "a house in a field"),
    ("portrait of a witcher", "portrait of a witches"),  # r/s: no neighbouring keys
    ("a wooden pikachu", "wooden pikachus"),  # a plural is a count, not a typo
    ("bruce pon and trent mcconaghy", "bruce pony and trent mcconaghy"),  # "pony" is rare
    ("pepe the frog", "pope the frog"),  # a vowel for another in a short word
    ("a bast boat", "a best bust boat"),  # added word
    ("a red cat and a bast dog", "a red cat and a best dog"),
    ("three apples", "tree apples"),  # both real words
]


@pytest.mark.parametrize(("a", "b"), NOT_TYPOS)
def test_refuses_real_words_that_look_like_typos(a: str, b: str) -> None:
    forward, backward = check(a, b)
    assert not forward.ok and not backward.ok, (forward, backward)


def test_a_typo_needs_a_single_partner() -> None:
    """"mose" is one slip from both "moose" and "mouse": no telling which was meant."""
    a, b = canonical_prompt("a mose and a mouse"), canonical_prompt("a moose and a mouse")
    assert verify(a, b).ok and verify(b, a).ok  # "mouse" is in both: "mose" is "moose"
    a, b = canonical_prompt("a mose and a moise"), canonical_prompt("a moose and a mouse")
    assert not verify(a, b).ok and not verify(b, a).ok


def test_articles_and_case_are_one_exact_key() -> None:
    """A determiner-only difference at the start is the same exact key (KEY_SCHEMA k2); an
    article elsewhere, a count or quoted text is not."""
    params = normalize_params(Params(), default_model="m")

    def key(text: str) -> str:
        return cache_key(canonical_prompt(text), None, params, "1")

    assert key("Man") == key("a man") == key("MAN")
    # "the" starts names of other things: never folded
    assert key("The Rock") != key("rock") and key("The Who") != key("who")
    assert key("The Office") != key("office")
    assert key("robot") == key("a robot") == key("A Robot")
    assert key("an apple on a table") == key("apple on a table")
    assert key("a man") != key("men") and key("a man") != key("two men")
    assert key("the letter a") != key("the letter")
    assert key('"a" sign') != key('"the" sign') and key("a") != key("")
    assert KEY_SCHEMA == "k2"
    for a, b in (("Man", "a man"), ("robot", "a robot")):  # the verifier agrees both ways
        assert check(a, b) == (Verdict(True, None, ""), Verdict(True, None, ""))


def test_request_core_spells_unknown_words_for_the_embedding() -> None:
    """What the semantic tier embeds: typos spelled as the nearest common word, known words,
    names without a close word and quoted text left alone."""
    assert request_core("a pig in a froest") == "a pig in a forest"
    assert request_core("please draw datrh maul") == "darth maul"
    assert request_core("four shipps") == "four ships"
    assert request_core("a computer behind a tble") == "a computer behind a table"  # not "able"
    assert request_core("a cat by greg rutkowski, artstation") == \
        "a cat by greg rutkowski, artstation"
    assert request_core('a sign that says "Helo wrld"') == 'a sign that says "Helo wrld"'


def test_without_spelling_dictionary_nothing_is_respelled(monkeypatch: pytest.MonkeyPatch) -> None:
    from promptcache.semantic import spelling
    spelling.correct_word.cache_clear()
    monkeypatch.setattr(lexicon, "_DICT", {})
    try:
        assert request_core("a pig in a froest") == "a pig in a froest"
    finally:
        spelling.correct_word.cache_clear()
    monkeypatch.setattr(lexicon, "_DICT", None)
    assert request_core("a pig in a froest") == "a pig in a forest"


def test_three_letter_slips_with_two_readings_are_refused() -> None:
    """"pnk" is one letter from "pink" and "punk": no telling which was meant. So is "ble"
    (blue, able, bale, ...) and "frg" (frog, frig): a three-letter slip is accepted only when
    one word alone is one letter away (recall given up for never serving a wrong picture)."""
    for slip, word in (("pnk", "punk"), ("pnk", "pink"), ("lng", "lung"), ("lng", "long"),
                       ("ble", "blue"), ("frg", "frog")):
        a = canonical_prompt(f"a {slip} car")
        b = canonical_prompt(f"a {word} car")
        assert not verify(a, b).ok and not verify(b, a).ok


def test_an_unmatched_quote_is_plain_text() -> None:
    from promptcache.semantic.spelling import corrected

    assert corrected('a 12" vinyl recrod cover').startswith('a 12" vinyl')
    assert corrected('a sign saying "open all night') == corrected('a sign saying "open all night')
    request_core(canonical_prompt('a sign saying "open all nihgt'))  # no RecursionError
