"""Word lists for the semantic-tier verifier (see verifier.py). Pure data, no I/O.

Two kinds of lists live here:

- *equivalences*: wording that asks for the same picture (synonym groups, British/American
  spelling, number words, request phrases and politeness that carry no content). These are the
  only things the verifier forgives, so every entry must be truly equivalent for a picture.
- *categories*: closed word classes whose change alters the picture (colour, count, negation,
  spatial, time of day, season/weather, age, gender, species, medium, style, artist markers).
  They only name the reason of a refusal and veto typo matching: any differing content word is
  refused whether or not it is listed here.

All words are lower case; categories hold singular forms. The functions at the end are the
word-level normalisation built on these lists (spelling, synonyms, plurals, typos).
"""

from __future__ import annotations

from functools import lru_cache


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# -- equivalences ---------------------------------------------------------------------------

# Each line: canonical form | variants. Multi-word phrases allowed; matched on whole tokens.
SYNONYM_GROUPS = """
wearing | dressed in | clad in | wears | dressed with
holding | carrying | holds | carries | holding onto
looking at | gazing at | gazes at | looks at | gazing upon
sitting | seated | sits | sat
standing | stands
photo | photograph | photo graph
image | picture | pic
sofa | couch | settee
car | automobile
child | kid
children | kids
small | tiny
large | big
huge | enormous | gigantic | massive | immense
cute | adorable
beautiful | gorgeous | lovely | stunning
realistic | lifelike | true to life | life like
very | highly | extremely | really | super | incredibly | ultra | very very
fantasy | fantastical
futuristic | futurist
colorful | multicolored | multicolor | multi colored | vibrantly colored
art | artwork
illustration | illustrated artwork | illustrated art | illustrated
in style of | in art style of | in manner of | styled after | in artstyle of
of | depicting
unreal engine | unreal engine 5 | ue5 | ue 5 | unreal 5 | unreal engine 4 | ue4 | unreal engine5
4k | 4 k | 4k resolution | 4k uhd | uhd 4k | 4k hd | 4k res
8k | 8 k | 8k resolution | 8k uhd | uhd 8k | 8k hd | 8k res
high resolution | hi res | hires | high res | highres | high-res
hd | high definition
3d | 3 d
2d | 2 d
light | lighting
very detailed | high detail | high details
intricate | intricately detailed
depth of field | dof
oil painting | oil on canvas
elegant | graceful
vivid | vibrant
high quality | hq
aerial view | bird eye view | birds eye view | birdseye view
cityscape | city view
sharp focus | in sharp focus | sharply focused
clouds | cloud cover
photorealistic | photoreal
hyperrealistic | hyperreal
scifi | science fiction
next to | beside | alongside | by side of
under | underneath | beneath | below
on top of | atop
inside | inside of
near | close to | nearby
to left of | on left of | left of | at left of | on left side of | to left side of
to right of | on right of | right of | at right of | on right side of | to right side of
man | guy
men | guys
woman | lady
women | ladies
people | persons
happy | joyful | cheerful
forest | woods
jumping | leaping
shiny | glossy
scary | frightening
sunset | sundown
ocean | sea
autumn | fall | autumnal
old | elderly
center | middle
on | upon
dog | doggy | doggo | pooch
person | human
render | rendering
uhd | ultra hd
pants | trousers
sweater | pullover
eyeglasses | spectacles
spaceship | spacecraft
bicycle | bike
motorcycle | motorbike
airplane | aeroplane | plane
phone | cellphone | smartphone | mobile phone | cell phone
tv | television
movie | film
film still | movie still | still from movie | still from film | still of movie
rabbit | bunny
trending on artstation | artstation trending | trending at artstation | trending in artstation
and | &
""".strip().splitlines()

# British spelling stems (prefix match) -> American.
SPELLING = {
    "colour": "color", "armour": "armor", "harbour": "harbor", "neighbour": "neighbor",
    "flavour": "flavor", "favourite": "favorite", "honour": "honor", "vapour": "vapor",
    "humour": "humor", "rumour": "rumor", "behaviour": "behavior", "parlour": "parlor",
    "grey": "gray", "centre": "center", "theatre": "theater", "metre": "meter",
    "jewellery": "jewelry", "aluminium": "aluminum", "moustache": "mustache",
    "pyjama": "pajama", "tyre": "tire", "storey": "story", "plough": "plow",
    "mould": "mold", "grey-": "gray-",
}

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "hundred": "100", "thousand": "1000",
}

# Words dropped everywhere: they never change the picture.
DROP = _words("a an the please pls plz kindly")

# Request phrasing at the start and politeness at the end (regex alternations, lower case).
REQUEST_VERBS = ("generate|create|make|draw|render|produce|design|show|give|imagine|depict|"
                 "visualize|visualise|illustrate")
REQUEST_NOUNS = "picture|image|pic|artwork|render|rendering"
POLITE_ENDS = ("please", "pls", "plz", "thanks", "you", " u", "thx", " ty", "cheers", ")", ":d",
               "<3", "(:", "lot", "much", "advance")
POLITE_SUFFIX = ("please|pls|plz|thanks|thank you|thank u|thx|ty|thanks a lot|"
                 "thank you very much|thanks in advance|cheers|:\\)|:-\\)|:d|<3|;\\)|\\(:")

# -- categories -----------------------------------------------------------------------------

COLOR = _words("""
red blue green yellow orange purple violet pink brown black white gray silver gold golden bronze
copper beige tan ivory cream crimson scarlet maroon burgundy navy teal turquoise cyan aqua magenta
indigo lavender lilac amber emerald ruby sapphire jade olive khaki peach coral salmon charcoal
ebony rust mustard chartreuse fuchsia vermilion ochre sepia blonde blond brunette auburn ginger
platinum rainbow monochrome monochromatic colorful pastel neon multicolored greyscale grayscale
azure cerulean cobalt mint lime plum mauve taupe
""")

COUNT = _words("""
single pair couple dozen several many few multiple some lot lots both twin twins triple trio duo
quartet numerous countless hundreds thousands dozens only alone solo group crowd herd flock pack
swarm first second third fourth fifth half quarter double
""") | frozenset(NUMBER_WORDS.values())

NEGATION = _words("""
no not without never none nothing nobody nowhere neither nor don't doesn't isn't aren't wasn't
weren't won't can't cannot lacking lack missing absent except excluding minus empty free devoid
hairless headless faceless eyeless armless legless wingless less non un
""")

SPATIAL = _words("""
left right above below under over beneath underneath behind front back before after next beside
near far top bottom inside outside atop between among around across through facing toward towards
against along upside down up center centre middle corner side foreground background distance
opposite surrounding surrounded beyond past ahead adjacent nearby close closer farther further
leftmost rightmost vertical horizontal diagonal sideways overhead underground underwater aerial
""")

TIME_OF_DAY = _words("""
day night morning evening dusk dawn sunrise sunset noon midday midnight twilight daytime nighttime
afternoon daylight moonlight moonlit sunlit starlit nocturnal night-time
""")

SEASON_WEATHER = _words("""
spring summer autumn fall winter snow snowy snowing snowfall rain rainy raining rainfall sunny
cloudy foggy fog mist misty storm stormy thunder thunderstorm lightning windy wind overcast clear
hail drizzle blizzard frost frosty icy ice hazy haze humid tornado hurricane monsoon sunshine wet
dry drought flood christmas halloween easter summertime wintertime
""")

AGE = _words("""
young old elderly aged baby infant toddler child kid teen teenage teenager adolescent adult senior
middle-aged youthful newborn puppy kitten cub calf foal chick duckling lamb piglet elder
grandmother grandfather granny grandma grandpa ancient juvenile youth age year-old old-aged aging
ageing wrinkled
""")

GENDER = _words("""
man woman male female boy girl he she his her him hers himself herself king queen prince princess
god goddess actor actress lady gentleman guy gal husband wife father mother dad mom mum son
daughter brother sister uncle aunt nephew niece waiter waitress monk nun bride groom sir madam mr
mrs ms miss masculine feminine boyfriend girlfriend emperor empress duke duchess lord hero heroine
wizard witch sorcerer sorceress businessman businesswoman policeman policewoman fireman firewoman
gentlemen grandmother grandfather
""")

SPECIES = _words("""
dog cat horse cow pig sheep goat chicken duck goose turkey rabbit hamster mouse rat squirrel fox
wolf bear panda koala kangaroo lion tiger leopard cheetah jaguar panther lynx elephant giraffe
zebra hippo hippopotamus rhino rhinoceros monkey ape gorilla chimpanzee orangutan lemur sloth bat
deer moose elk reindeer camel llama alpaca donkey mule bison buffalo ox yak boar hedgehog porcupine
beaver otter raccoon skunk badger weasel ferret mole bird eagle hawk falcon owl parrot penguin
flamingo swan pelican crow raven pigeon dove sparrow robin hummingbird peacock ostrich emu seagull
gull stork heron crane woodpecker toucan fish shark whale dolphin octopus squid jellyfish crab
lobster shrimp starfish seal walrus turtle tortoise frog toad lizard snake crocodile alligator
iguana chameleon gecko dinosaur dragon unicorn butterfly bee wasp ant spider beetle ladybug
dragonfly mosquito fly moth snail slug worm scorpion caterpillar corgi poodle pug husky shiba inu
labrador retriever dalmatian bulldog chihuahua beagle terrier dachshund greyhound sheepdog collie
pomeranian rottweiler doberman kitten puppy axolotl capybara meerkat mongoose platypus narwhal
manatee orca salmon trout goldfish koi seahorse cobra python phoenix griffin mermaid centaur
pegasus yeti tabby
""")

MEDIUM = _words("""
photo photograph photography painting paint oil watercolor acrylic gouache pastel charcoal pencil
ink sketch drawing illustration render rendering sculpture statue bust mosaic tapestry embroidery
stained origami clay claymation woodcut engraving etching lithograph print poster collage graffiti
mural fresco tattoo vector lego knitted crochet papercraft blueprint diagram sticker emoji icon
logo comic polaroid x-ray xray selfie linocut screenprint silkscreen cartoon animation film still
snapshot portrait marble bronze ceramic porcelain needlepoint quilt doodle infographic map painting
canvas daguerreotype cyanotype photomontage hologram pixel voxel 3d 2d cgi fresco relief
""")

STYLE = _words("""
anime manga realistic photorealistic hyperrealistic surreal surrealism surrealist abstract
impressionist impressionism expressionist expressionism cubist cubism baroque renaissance gothic
nouveau deco pop minimalist minimalism cyberpunk steampunk vaporwave synthwave fantasy scifi noir
retro vintage low-poly isometric psychedelic ukiyo-e chibi kawaii dieselpunk solarpunk rococo
romanticism realism pointillism futurism dada dadaism brutalist brutalism cel-shaded pixar disney
ghibli cartoonish lowpoly photoreal hyperreal victorian medieval art-deco art-nouveau modernist
modern contemporary classical primitive folk tribal naive kitsch grunge gritty whimsical dreamy
ethereal dark horror cinematic futuristic dystopian utopian post-apocalyptic apocalyptic biopunk
afrofuturism ornate
""")

# Prepositions: a change is spatial, but any other category names a refusal better.
PREPOSITION = _words("on in at into onto within upon from off to of with during for")

# Words after which names are taken as artists ("by", "style of", ...).
ARTIST_MARKERS = _words("by style artist artists painter photographer illustrator inspired")

# A few names that appear in many prompts (surnames / handles), for the `artist` reason only.
ARTIST_NAMES = _words("""
rutkowski artgerm mucha wlop beeple greg magritte dali picasso monet kahlo klimt hokusai warhol
basquiat haring rockwell moebius giger frazetta mignola miyazaki ghibli kuvshinov sakimichan
rossdraws loish ilya alphonse vincent gogh rembrandt vermeer caravaggio munch bosch beksinski
zdzislaw syd mead simon stalenhag craig mullins james gurney jean giraud boris vallejo tolkien
leyendecker mucha sargent turner hopper escher kandinsky pollock
""")

# Words of image prompts that a general dictionary lacks: real words here, never typos.
PROMPT_WORDS = _words("""
artstation cgsociety deviantart pixiv behance octane vray zbrush unreal mecha cyberpunk steampunk
synthwave vaporwave dieselpunk solarpunk bokeh chibi kawaii ghibli moebius hdr uhd dslr photoreal
hyperrealism hyperrealistic photorealism lowpoly isometric cinematic volumetric subsurface
raytracing redshift blender houdini maya midjourney dalle lineart cel tonemapped anime manga
""")

# Attributes whose binding to an object matters (used to name `binding` refusals).
ATTRIBUTE = COLOR | _words("""
wooden wood metallic metal glass plastic leather fabric fluffy furry striped spotted round square
oval rectangular cubic cylindrical triangular spherical tall short big small large tiny long thin
fat wide narrow heavy light dark bright shiny matte rough smooth soft hard wet dry hot cold old new
young broken rusty golden silver stone rubber paper velvet
""")

# For the plural/singular rule.
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "wolves": "wolf", "knives": "knife",
    "leaves": "leaf", "lives": "life", "wives": "wife", "halves": "half", "shelves": "shelf",
    "elves": "elf", "dwarves": "dwarf", "calves": "calf", "loaves": "loaf", "oxen": "ox",
    "cacti": "cactus", "fungi": "fungus", "dice": "die", "thieves": "thief", "scarves": "scarf",
}
UNCOUNTABLE_S = _words("""
glass grass class boss dress mess moss chess gas bus lens cactus octopus iris atlas canvas circus
virus status campus bonus series species news physics mathematics always perhaps this his its hers
yours ours is was has does goes as us plus thus yes kiss cross across princess goddess actress
waitress empress duchess witness wilderness darkness
""")


# -- word-level normalisation ---------------------------------------------------------------

def _phrase_table() -> dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]]:
    table: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    for line in SYNONYM_GROUPS:
        forms = [tuple(f.split()) for f in line.split("|")]
        for form in forms[1:] + [forms[0]]:
            if form != forms[0] or len(form) > 1:  # a one-word canonical form needs no rule
                table.setdefault(form[0], []).append((form, forms[0]))
    for options in table.values():
        options.sort(key=lambda o: -len(o[0]))
    return table


_PHRASES = _phrase_table()
_PHRASE_KEYS = frozenset(_PHRASES)
# canonical single word -> its single-word spellings, so "hughly" is still a typo of "highly"
VARIANTS: dict[str, tuple[str, ...]] = {}
for _line in SYNONYM_GROUPS:
    _forms = [f.strip() for f in _line.split("|") if " " not in f.strip()]
    if _forms and _forms[0] == _line.split("|")[0].strip():
        VARIANTS[_forms[0]] = tuple(_forms)
_SPELL_STEMS = sorted(SPELLING, key=len, reverse=True)


NORM_CACHE: dict[str, str] = {}


def norm_word(w: str) -> str:
    """One word's spelling-level normal form (memoised in NORM_CACHE, bounded)."""
    out = NORM_CACHE.get(w)
    if out is not None:
        return out
    out = _norm_word_uncached(w)
    if len(NORM_CACHE) < 100_000:
        NORM_CACHE[w] = out
    return out


def _norm_word_uncached(w: str) -> str:
    if "'" in w:
        w = w.strip("'")
    if w.endswith("'s") and len(w) > 3:
        w = w[:-2]
    if w in NUMBER_WORDS or not w:
        return NUMBER_WORDS.get(w, w)
    for stem in _SPELL_STEMS:
        if w.startswith(stem):
            return SPELLING[stem] + w[len(stem):]
    if len(w) >= 7 and not w.endswith("wise"):
        for end, rep in (("isation", "ization"), ("ised", "ized"), ("ising", "izing")):
            if w.endswith(end):
                return w[: -len(end)] + rep
    return w


def apply_phrases(tokens: list[str]) -> list[str]:
    """Rewrite synonym phrases to their canonical form; a rewrite is rescanned, so chains
    such as "uhd 4k resolution" -> "4k resolution" -> "4k" resolve in one pass."""
    if _PHRASE_KEYS.isdisjoint(tokens):
        return tokens
    out: list[str] = []
    get = _PHRASES.get
    i, n = 0, len(tokens)
    while i < n:
        options = get(tokens[i])
        if options is not None:
            for form, canon in options:
                k = len(form)
                if k == 1 or tuple(tokens[i:i + k]) == form:
                    if form != canon:
                        tokens = [*canon, *tokens[i + k:]]
                        i, n = 0, len(tokens)
                    else:
                        out.extend(canon)
                        i += k
                    break
            else:
                out.append(tokens[i])
                i += 1
        else:
            out.append(tokens[i])
            i += 1
    return out


@lru_cache(maxsize=65536)
def singular(w: str) -> str:
    """A light English singular: "cats" -> "cat", "puppies" -> "puppy", "men" -> "man"."""
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if len(w) <= 3 or not w.isalpha() or w in UNCOUNTABLE_S or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


CATEGORY_WORDS = (NEGATION | COUNT | COLOR | AGE | GENDER | SEASON_WEATHER | TIME_OF_DAY | SPATIAL
                  | SPECIES | MEDIUM | STYLE | PREPOSITION)
_DICT: dict[str, int] | None = None
KNOWN_FREQ = 1  # any word of the spelling dictionary is a real word (its typos are not in it)


def _dictionary() -> dict[str, int]:
    global _DICT
    if _DICT is None:
        try:
            from spellchecker import SpellChecker
            _DICT = dict(SpellChecker(distance=1).word_frequency.dictionary)
        except Exception:  # no dictionary: nothing counts as an unknown word, no typo forgiven
            _DICT = {}
    return _DICT


def known_word(w: str) -> bool:
    """A real word (or a listed one), so no typo of another real word."""
    d = _dictionary()
    if not d:
        return True
    s = singular(w)
    return (s in CATEGORY_WORDS or s in ARTIST_NAMES or s in PROMPT_WORDS
            or d.get(w, 0) >= KNOWN_FREQ or not w.isalpha())


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance, or limit + 1 once it exceeds limit."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]
