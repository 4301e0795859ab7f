"""The semantic-tier verifier: which prompt pairs may share a cached picture.

Hand-written pairs, one kind of difference each, checked in both directions (the verifier is
used with either prompt cached). Prompts go through canonical_prompt first, as in the service.
"""

from __future__ import annotations


import pytest

from promptcache.prompts import canonical_prompt
from promptcache.semantic import lexicon
from promptcache.semantic.verifier import Verdict, parse, verify


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
