"""The prompt optimizer: standardise -> validate -> enhance -> fit the 77-token window.

One entry point, `optimize`, pure and synchronous (tens of microseconds: it sits on every
request's path, before the cache lookup). It never raises anything but `Refused`, whatever the
input: 10,000 characters, control characters, lone surrogates, mixed scripts, emoji, broken
weighting syntax.

What the cache key is made of: `key_prompt`, the user's canonical prompt *before* enhancers (for
a truncating backend, only the tags that fit its window), `key_negative` likewise, and
`key_version` (`OPTIMIZER_VERSION`, plus whether enhancers were on: the same prompt with and
without them is a different picture). Enhancers and default negatives are a function of what the
generator reads of the user's prompt, so they need no place in the key of their own.

`prompt_used` always fits the window: enhancers are dropped first, then the user's trailing
tags, then (one long tag) its trailing words. `dropped` says what went.

`enabled` (the request's `options.optimize`) switches the enhancers and default negatives only:
standardisation, the content policy and the window always apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptcache.errors import RequestRejected
from promptcache.optimizer.enhance import STYLES
from promptcache.optimizer.enhance import enhance as _enhance
from promptcache.optimizer.policy import ALLOW_ALL, PolicySettings, screen
from promptcache.optimizer.standardise import PromptRejected
from promptcache.optimizer.standardise import standardise as _standardise
from promptcache.optimizer.tokens import (
    WINDOW,
    Fitted,
    count,
    count_tag,
    fits,
    split_tags,
    window_text,
)
from promptcache.optimizer.tokens import fit as fit_window
from promptcache.optimizer.weights import repair_weights
from promptcache.prompts import canonical_of_clean, clean_prompt

# (`standardise` and `enhance` are imported under other names so that
# `promptcache.optimizer.standardise` stays the module.)

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
    added: tuple[str, ...]      # the enhancers that made it into prompt_used
    tokens: int                 # CLIP tokens of prompt_used (<= WINDOW)
    dropped: tuple[str, ...]    # what did not fit the window ("negative: " for the negative)
    changes: tuple[str, ...]    # what standardisation changed
    enhanced: bool
    version: str = OPTIMIZER_VERSION

    @property
    def key_version(self) -> str:
        """The optimizer version for the cache key: enhanced and plain prompts differ."""
        return f"{self.version}+e" if self.enhanced else self.version


def _fit_user(tags: list[str]) -> tuple[Fitted, list[str]]:
    """The user's own tags fitted to the window (trailing tags dropped first), and the tags."""
    fitted = fit_window(tags, [])
    if not fitted.dropped:
        return fitted, tags
    if any(c in fitted.text for c in "()[]"):  # cut short: a group may have lost its closer
        repaired = fit_window(split_tags(clean_prompt(repair_weights(fitted.text))), [])
        fitted = Fitted(repaired.text, repaired.tokens, fitted.dropped + repaired.dropped)
    return fitted, split_tags(fitted.text)


def _with_extras(user: Fitted, tags: list[str], extras: tuple[str, ...]) -> Fitted:
    """`user` followed by `extras` (enhancers or default negatives), extras dropped to fit."""
    if not extras:
        return user
    if not tags:
        return fit_window([], list(extras))
    last = tags[-1].rstrip(".!?;: ") or tags[-1]  # "a red car, highly detailed", not "car.,"
    n = user.tokens
    if last != tags[-1]:  # the stripped marks were one word to CLIP when a letter precedes them
        n = n - count_tag(tags[-1][len(last):].strip()) if last[-1].isalnum() else None
    return fit_window(tags[:-1] + [last], list(extras), tags_count=n)


def _shown(dropped: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(d if len(d) <= _SHOWN else d[:_SHOWN - 1] + "…" for d in dropped)


def optimize(prompt: str, negative: str | None = None, *, enabled: bool = True,
             policy: PolicySettings | None = None, truncates: bool = False) -> Optimized:
    """Optimise one prompt, or raise `Refused`.

    `policy`: what to refuse (default `PolicySettings()`: every category but minors_sexual is
    configurable, all refused). `truncates`: the backend reads only the first 75 tokens (plain
    diffusers / CLIP), so prompts that differ past them must share a key; False for backends
    that read long prompts (A1111 chunks them, OpenAI reads them).
    """
    if not isinstance(prompt, str):
        raise Refused("invalid_prompt", None, "the prompt is not text")
    try:
        std = _standardise(prompt)
    except PromptRejected as exc:
        raise Refused(exc.code, None, exc.message) from None
    screened = screen(std.text, policy or PolicySettings())
    if (violation := screened.violation) is not None:
        raise Refused("blocked_content", violation.category, violation.message)
    changes = list(std.changes)

    neg_std: str | None = None
    neg_tags: list[str] = []
    if isinstance(negative, str):  # a negative is never refused: it says what not to draw
        try:
            neg = _standardise(negative)
            neg_std, neg_tags = neg.text, list(neg.tags)
        except PromptRejected as exc:
            changes.append(f"negative prompt ignored: {exc.message}")

    # The user's tags are fitted first and enhancers chosen from what the generator will read,
    # so text past the window (the same prompt to a truncating backend) cannot change them.
    user, tags = _fit_user(list(std.tags))
    user_neg, neg_tags = _fit_user(neg_tags) if neg_std else (Fitted("", 0, ()), [])
    words = screened.words if user.text == std.text else None  # read once, by the policy
    enhancement = _enhance(user.text, neg_std, words=words) if enabled else None
    final = _with_extras(user, tags, enhancement.enhancers if enhancement else ())
    final_neg = _with_extras(user_neg, neg_tags, enhancement.negatives if enhancement else ())
    # A truncating backend reads only the window: its key is the user's prompt as fitted to
    # it, which is exactly the user's part of what the generator is sent.
    key_prompt = canonical_of_clean(user.text if truncates else std.text)
    key_negative = canonical_of_clean(user_neg.text if truncates else neg_std) if neg_std else None
    return Optimized(
        prompt_used=final.text, negative_used=final_neg.text or None,
        key_prompt=key_prompt, key_negative=key_negative or None,
        style=enhancement.style if enhancement else None,
        added=tuple(e for e in (enhancement.enhancers if enhancement else ())
                    if e not in final.dropped),
        tokens=final.tokens,
        dropped=_shown(user.dropped + final.dropped
                       + tuple(f"negative: {d}" for d in user_neg.dropped + final_neg.dropped)),
        changes=tuple(changes), enhanced=enabled)
