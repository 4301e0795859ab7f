"""Canonicalisation and the exact-tier key."""

from __future__ import annotations

import pytest

from promptcache.prompts import cache_key, canonical_prompt, clean_prompt, normalize_params
from schemas.events import Params


@pytest.mark.parametrize(("a", "b"), [
    ("A red fox in the snow", "a red fox in the snow"),
    ("a red fox  in the\tsnow", "a red fox in the snow"),
    ("a red fox in the snow.", "a red fox in the snow"),
    ("a red fox in the snow!!!", "a red fox in the snow"),
    ("fox , snow,,  golden hour", "fox, snow, golden hour"),
    ("fox,snow", "fox, snow"),
    ("ｆｏｘ　ｉｎ　ｓｎｏｗ", "fox in snow"),  # full-width (NFKC)
    ("fox\u200bin snow", "fox in snow"),  # zero-width space
    ("“quoted” fox — snow", '"quoted" fox - snow'),
    (", fox in snow ,", "fox in snow"),
])
def test_prompts_that_ask_for_the_same_picture_share_a_canonical_form(a, b):
    assert canonical_prompt(a) == canonical_prompt(b)


@pytest.mark.parametrize(("a", "b"), [
    ("a red fox", "a blue fox"),
    ("(fox:1.5) in snow", "fox in snow"),
    ("[fox] in snow", "fox in snow"),
    ('a sign that says "OPEN"', 'a sign that says "open"'),  # text drawn in the image keeps case
    ("3 cats", "2 cats"),
    ("version 1.5", "version 15"),
])
def test_prompts_that_ask_for_different_pictures_stay_apart(a, b):
    assert canonical_prompt(a) != canonical_prompt(b)


def test_clean_prompt_keeps_case_for_the_generator():
    assert clean_prompt("  A Red  Fox ,in snow ") == "A Red Fox, in snow"


def test_params_defaults_are_filled_and_aliases_folded():
    spelt = normalize_params(Params(width=1024, height=1024, steps=30, guidance=7,
                                    sampler="Euler A", model="SDXL"), default_model="x")
    implied = normalize_params(Params(sampler="euler_a", model="sdxl"), default_model="x")
    assert spelt == implied
    assert normalize_params(Params(), default_model="m").model == "m"


def test_cache_key_covers_every_picture_changing_input():
    params = normalize_params(Params(), default_model="m")
    base = cache_key("fox", None, params, "2")
    assert base == cache_key("fox", "", params, "2")
    assert len({
        base,
        cache_key("fox", "blurry", params, "2"),
        cache_key("fox", None, normalize_params(Params(seed=1), default_model="m"), "2"),
        cache_key("fox", None, normalize_params(Params(), default_model="other"), "2"),
        cache_key("fox", None, params, "2+e"),
        cache_key("fox2", None, params, "2"),
    }) == 6
