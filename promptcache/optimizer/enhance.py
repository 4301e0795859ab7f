"""Style-aware quality enhancers and default negative prompts. Pure, no I/O.

`STYLES` is the one place to configure them. The style of a prompt is the style of the first
trigger word or phrase in it (prompts put the subject and medium first), else `default`. An
entry "tag|alias|alias" adds `tag` only when neither it nor an alias is already in the prompt
(whole words, case-insensitive, after standardisation): "highly detailed" is not added to a prompt
that says "hyper detailed". A default negative is also left out when the prompt asks for what it
would suppress (no "blurry" for a prompt with "bokeh", no "text" when the prompt quotes text to
draw) or when the user's negative prompt has it already.

Enhancers go after the user's tags, so fitting the 77-token window drops them first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_DETAIL = ("highly detailed|high detail|hyper detailed|ultra detailed|intricate details|"
           "intricate detail|extremely detailed|very detailed|detailed")
_SHARP = "sharp focus|in focus|tack sharp|sharp"
_VIVID = "vibrant colors|vibrant colours|vivid colors|vivid colours|rich colors|colorful"
_BLURRY = "blurry|blur|blurred|bokeh|motion blur|out of focus|soft focus|dreamy|hazy"
_TEXT = 'text|"|sign|signs|lettering|letters|words|caption|title|logo|typography|says'
_LOWRES = "lowres|low resolution|pixel art|pixelated|8 bit|16 bit"
_JPEG = "jpeg artifacts|glitch|glitch art"
_MARK = "watermark|stamp"


@dataclass(frozen=True, slots=True)
class Style:
    name: str
    triggers: tuple[str, ...]   # words or phrases (lower case, whole words)
    enhancers: tuple[str, ...]  # "tag|alias|alias": add tag unless the prompt has one of them
    negatives: tuple[str, ...]  # "tag|conflict|conflict": add unless the prompt asks for one


STYLES: tuple[Style, ...] = (
    Style("photo",
          ("photo", "photos", "photograph", "photographs", "photography", "photographic",
           "photorealistic", "photoshoot", "photo shoot", "dslr", "35mm", "50mm", "85mm",
           "polaroid", "kodak", "portra", "canon eos", "nikon", "film photo", "street photography",
           "award winning photo"),
          (_SHARP, "natural lighting|natural light|studio lighting|soft lighting|golden hour|"
                   "dramatic lighting|cinematic lighting|lighting", _DETAIL),
          (_BLURRY, _LOWRES, "deformed", "cartoon|anime|illustration|drawing|"
           "painting|comic|sketch", "cgi|render|3d", _MARK, _TEXT)),
    Style("anime",
          ("anime", "manga", "waifu", "ghibli", "studio ghibli", "makoto shinkai", "kyoani",
           "kyoto animation", "pixiv", "cel shaded", "cel shading", "chibi", "visual novel",
           "anime style", "anime key visual"),
          ("anime style|anime", "clean lineart|lineart|line art|clean lines", _VIVID),
          (_LOWRES, "bad anatomy", "bad hands", _BLURRY, _JPEG, _MARK,
           _TEXT)),
    Style("3d",
          ("3d", "3d render", "render", "rendered", "rendering", "octane", "octane render",
           "unreal engine", "blender", "cinema 4d", "c4d", "redshift", "vray", "keyshot", "cgi",
           "ray tracing", "ray traced", "zbrush", "houdini", "pixar", "claymation"),
          ("global illumination|ray tracing|ray traced|raytracing",
           "physically based rendering|pbr", _DETAIL),
          (_LOWRES, _BLURRY, "noisy|noise|grain|grainy|film grain", _JPEG, _MARK, _TEXT)),
    Style("painting",
          ("painting", "oil painting", "oil on canvas", "watercolor", "watercolour", "gouache",
           "acrylic", "impasto", "impressionist", "impressionism", "fresco", "tempera",
           "brushstrokes", "brush strokes", "canvas", "matte painting", "painted"),
          ("visible brushstrokes|brushstrokes|brush strokes|brushwork|brush",
           "fine art|masterpiece", "rich colors|" + _VIVID),
          ("photo|photograph|photography|photographic|photorealistic", _BLURRY, _LOWRES,
           _MARK, "signature|signed", _TEXT)),
    Style("illustration",
          ("illustration", "illustrated", "digital art", "concept art", "drawing", "drawn",
           "sketch", "vector", "vector art", "comic", "comics", "cartoon", "storybook",
           "childrens book", "children s book", "digital painting", "line art", "lineart",
           "ink", "inking", "flat design", "graphic novel", "character design", "artstation"),
          ("clean lines|lineart|line art|clean lineart",
           "detailed illustration|" + _DETAIL, _VIVID),
          (_BLURRY, _LOWRES, _JPEG, _MARK, "signature|signed", _TEXT)),
)
DEFAULT = Style("default", (), (_DETAIL, _SHARP),
                (_BLURRY, _LOWRES, _JPEG, _MARK, "deformed", _TEXT))

_WORD = re.compile(r"[^\W_]+")
_TRIGGERS: dict[str, Style] = {}
for _style in STYLES:
    for _trigger in _style.triggers:
        _TRIGGERS.setdefault(_trigger, _style)
_FIRST_WORDS = frozenset(t.split()[0] for t in _TRIGGERS if " " in t)
_ANY_TRIGGER = _FIRST_WORDS | frozenset(t for t in _TRIGGERS if " " not in t)
_MAX_TRIGGER_WORDS = max(len(t.split()) for t in _TRIGGERS)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One "tag|alias|alias" entry, parsed once: single words are matched as a set."""

    tag: str
    words: frozenset[str]
    phrases: tuple[str, ...]
    quote: bool  # '"' is an alias: present when the prompt quotes text

    @classmethod
    def of(cls, entry: str) -> _Entry:
        aliases = entry.split("|")
        return cls(aliases[0], frozenset(a for a in aliases if " " not in a and a != '"'),
                   tuple(f" {a} " for a in aliases if " " in a), '"' in aliases)

    def present(self, text: str, words: frozenset[str], joined: str) -> bool:
        if not words.isdisjoint(self.words) or (self.quote and '"' in text):
            return True
        for phrase in self.phrases:
            if phrase in joined:
                return True
        return False


_ENTRIES: dict[str, tuple[tuple[_Entry, ...], tuple[_Entry, ...]]] = {
    style.name: (tuple(map(_Entry.of, style.enhancers)), tuple(map(_Entry.of, style.negatives)))
    for style in (*STYLES, DEFAULT)}


@dataclass(frozen=True, slots=True)
class Enhancement:
    style: str
    enhancers: tuple[str, ...]  # tags to append to the prompt, in order
    negatives: tuple[str, ...]  # tags to append to the negative prompt, in order


def _style_of(words: list[str], present: frozenset[str]) -> Style:
    if not (candidates := present & _ANY_TRIGGER):  # no trigger at all: no walk
        return DEFAULT
    for i in range(min(map(words.index, candidates)), len(words)):
        word = words[i]
        if word in _FIRST_WORDS:  # longest trigger first at one position
            for n in range(min(_MAX_TRIGGER_WORDS, len(words) - i), 1, -1):
                if (style := _TRIGGERS.get(" ".join(words[i:i + n]))) is not None:
                    return style
        if (style := _TRIGGERS.get(word)) is not None:
            return style
    return DEFAULT


def detect_style(text: str) -> Style:
    """The style of the first trigger in `text`, else DEFAULT."""
    words = _WORD.findall(text.lower())
    return _style_of(words, frozenset(words))


def enhance(prompt: str, negative: str | None = None, *,
            words: Sequence[str] | None = None) -> Enhancement:
    """Enhancers and default negatives for a standardised `prompt` and the user's standardised
    `negative` (which they never duplicate). `words`: the prompt's lower-case words, when the
    caller has them already."""
    listed = list(words) if words is not None else _WORD.findall(prompt.lower())
    words, joined = frozenset(listed), f" {' '.join(listed)} "
    style = _style_of(listed, words)
    enhancer_entries, negative_entries = _ENTRIES[style.name]
    enhancers = tuple(e.tag for e in enhancer_entries if not e.present(prompt, words, joined))
    negatives: tuple[str, ...] = ()
    if negative_entries:
        neg_listed = _WORD.findall(negative.lower()) if negative else []
        neg_joined = f" {' '.join(neg_listed)} "
        negatives = tuple(e.tag for e in negative_entries
                          if not e.present(prompt, words, joined)
                          and f" {e.tag} " not in neg_joined)
    return Enhancement(style.name, enhancers, negatives)
