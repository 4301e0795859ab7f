"""The prompt optimizer: standardise -> validate -> enhance -> fit the 77-token window.

One entry point, `optimize`, pure and synchronous (tens of microseconds: it sits on every
request's path, before the cache lookup). It never raises anything but `Refused`, whatever the
input: 10,000 characters, control characters, lone surrogates, mixed scripts, emoji, broken
weighting syntax.

What the cache key is made of: `key_prompt`, the user's canonical prompt *before* enhancers (for
a truncating backend, only what fits its window), `key_negative` likewise, and `key_version`
(`OPTIMIZER_VERSION`, plus whether enhancers were on: the same prompt with and without them is
a different picture). Enhancers and default negatives are a function of those, so they need no
place in the key of their own.

`enabled` (the request's `options.optimize`) switches the enhancers and default negatives only:
standardisation, the content policy and the window always apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumers.errors import RequestRejected
from consumers.optimizer.enhance import STYLES
from consumers.optimizer.enhance import enhance as _enhance
from consumers.optimizer.policy import ALLOW_ALL, PolicySettings, Violation, check
from consumers.optimizer.standardise import PromptRejected, split_tags
from consumers.optimizer.standardise import standardise as _standardise
from consumers.optimizer.tokens import WINDOW, count, fits, window_text
from consumers.optimizer.tokens import fit as fit_window
from consumers.prompts import canonical_prompt

# (`standardise` and `enhance` are imported under other names so that
# `consumers.optimizer.standardise` stays the module.)

# Bumped whenever a rule here changes what a prompt turns into; part of every cache key.
OPTIMIZER_VERSION = "2"
_SHOWN = 120  # longest dropped text reported as is; longer ones are cut with an ellipsis

__all__ = [
    "ALLOW_ALL", "OPTIMIZER_VERSION", "STYLES", "WINDOW", "Optimized", "PolicySettings",
    "Refused", "count", "fits", "optimize", "window_text",
]


class Refused(RequestRejected):
    """The request is answered `rejected` with `code`: `blocked_content` (with the policy
    `category`), `empty_prompt` or `invalid_prompt` (category None)."""

    def __init__(self, code: str, category: str | None, message: str) -> None:
        super().__init__(message, code=code)
        self.category = category


@dataclass(frozen=True, slots=True)
class Optimized:
    prompt_used: str            # what the generator is sent
    negative_used: str | None   # the user's negative plus default negatives, fitted
    key_prompt: str             # canonical user prompt before enhancers: the cache key's prompt
    key_negative: str | None    # canonical user negative before defaults: the key's negative
    style: str | None           # the detected style when enhancers were on
    tokens: int                 # CLIP tokens of prompt_used (<= WINDOW)
    dropped: tuple[str, ...]    # what did not fit the window ("negative: " for the negative)
    changes: tuple[str, ...]    # what standardisation changed
    enhanced: bool
    version: str = OPTIMIZER_VERSION

    @property
    def key_version(self) -> str:
        """The optimizer version for the cache key: enhanced and plain prompts differ."""
        return f"{self.version}+e" if self.enhanced else self.version


def _standardise_negative(negative: str | None, truncates: bool,
                          changes: list[str]) -> tuple[str | None, str | None]:
    """(standardised negative, its key form); a negative with nothing left in it is ignored
    rather than refused: it only says what not to draw."""
    if negative is None:
        return None, None
    try:
        std = _standardise(negative)
    except PromptRejected as exc:
        changes.append(f"negative prompt ignored: {exc.message}")
        return None, None
    return std.text, canonical_prompt(window_text(std.text) if truncates else std.text) or None


def optimize(prompt: str, negative: str | None = None, *, enabled: bool = True,
             policy: PolicySettings | None = None, truncates: bool = False) -> Optimized:
    """Optimise one prompt, or raise `Refused`.

    `policy`: what to refuse (default `PolicySettings()`: every category refused).
    `truncates`: the backend reads only the first 75 tokens (plain diffusers/CLIP), so prompts
    that differ past them share a key; False for backends that read it all (A1111 chunks long
    prompts, OpenAI reads them).
    """
    if not isinstance(prompt, str):
        raise Refused("invalid_prompt", None, "the prompt is not text")
    if negative is not None and not isinstance(negative, str):
        negative = None
    try:
        std = _standardise(prompt)
    except PromptRejected as exc:
        raise Refused(exc.code, None, exc.message) from None
    violation: Violation | None = check(std.text, policy or PolicySettings())
    if violation is not None:
        raise Refused("blocked_content", violation.category, violation.message)

    changes = list(std.changes)
    neg_text, key_negative = _standardise_negative(negative, truncates, changes)
    # The user's tags are fitted first, and enhancers chosen from what the generator will read:
    # text past the window (the same prompt to a truncating backend) cannot change them.
    tags = split_tags(std.text)
    user = fit_window(tags, [])
    if user.dropped:
        tags = split_tags(user.text)
    enhancement = _enhance(user.text, neg_text) if enabled else None
    final = user
    if enhancement is not None and enhancement.enhancers:
        final = fit_window(tags, list(enhancement.enhancers), tags_count=user.tokens)
    neg_tags = split_tags(neg_text) if neg_text else []
    neg_extras = list(enhancement.negatives) if enhancement else []
    negative_used, negative_dropped = None, ()
    if neg_tags or neg_extras:
        fitted = fit_window(neg_tags, neg_extras)
        negative_used = fitted.text or None
        negative_dropped = tuple(f"negative: {d}" for d in fitted.dropped)
    fits_whole = not user.dropped and user.text == std.text
    key_prompt = canonical_prompt(window_text(std.text) if truncates and not fits_whole
                                  else std.text)
    return Optimized(
        prompt_used=final.text, negative_used=negative_used,
        key_prompt=key_prompt or canonical_prompt(std.text), key_negative=key_negative,
        style=enhancement.style if enhancement else None, tokens=final.tokens,
        dropped=tuple(d if len(d) <= _SHOWN else d[:_SHOWN - 1] + "…"
                      for d in user.dropped + final.dropped + negative_dropped),
        changes=tuple(changes),
        enhanced=enabled)
