"""The vocabulary of the LIMIT-structure generator (``limit-pairs``), written for lens.

LIMIT's items are Title-Case likeable things ("Snow Leopards", "Candle Making").  A pairs design
over N documents needs C(N, 2) distinct items (2,016 at N=64), so the items here are built from
themed modifier and head lists (a modifier only meets the heads of its own theme, so every item
reads as a thing a person could like), plus the hand-written ``LIKEABLE_ITEMS`` in Title Case.

The vocabulary is split once, by a fixed seed, into two disjoint halves: ``train`` (what
``experiments/train_blocksearch.py`` draws from) and ``eval`` (what sweeps and the app use).
Names split the same way: first and last names are halved, so no evaluation name, nor either of
its parts, is ever seen in training.
"""

from __future__ import annotations

import random
from functools import lru_cache

from lens.data.words import FIRST_NAMES, LAST_NAMES, LIKEABLE_ITEMS

SPLITS = ("train", "eval")
_SPLIT_SEED = 20260701

# theme: (modifiers, heads); items are "<Modifier> <Head>"
_THEMES: dict[str, tuple[str, str]] = {
    "food": (
        """Spicy Smoked Roasted Honey Lemon Garlic Ginger Maple Coconut Almond Cinnamon Vanilla
        Mango Cherry Walnut Pistachio Sesame Truffle Pumpkin Blueberry Caramel Chili Basil
        Saffron Peach Hazelnut Raspberry Mint Apricot Tamarind""",
        """Noodles Dumplings Pancakes Waffles Biscuits Muffins Cookies Crackers Scones Tarts
        Pastries Pies Soups Stews Curries Salads Sandwiches Omelettes Risotto Sorbet Gelato
        Fudge Toffee Brownies Bagels Pretzels Doughnuts Crepes Custard Porridge""",
    ),
    "craft": (
        """Candle Soap Quilt Basket Paper Glass Leather Clay Wood Silver Wire Bead Lace Felt
        Rope Tile Stone Copper Mosaic Bamboo Wool Linen Cork Shell Brass Velvet Resin Yarn""",
        """Making Weaving Carving Painting Printing Binding Dyeing Stitching Folding Casting
        Sculpting Etching Turning Blowing Knotting Framing Gilding Cutting Tooling Stamping
        Braiding Spinning Glazing Polishing Shaping""",
    ),
    "animal": (
        """Snow Red Arctic Spotted Golden Pygmy Giant Striped Desert Mountain River Forest
        Jungle Marsh Coastal Prairie Island Highland Crested Horned Silver Woolly Dwarf Ringed
        Painted Barred Tufted Royal""",
        """Leopards Foxes Owls Hawks Otters Bears Wolves Turtles Frogs Geckos Herons Finches
        Goats Hares Lizards Cranes Seals Badgers Eagles Ferrets Deer Bats Salamanders Parrots
        Squirrels Weasels Moles Tortoises Ibises""",
    ),
    "sport": (
        """Beach Indoor Night Ice Street Table Mountain Snow Trail Water Desert Canyon Speed
        Cross Free Relay Sprint Tandem Urban Winter Summer Park Lake River Ocean""",
        """Volleyball Hockey Running Cycling Skating Skiing Climbing Rowing Sailing Diving
        Surfing Archery Fencing Tennis Golf Bowling Racing Kayaking Hiking Boxing Juggling
        Orienteering Biking Swimming Wrestling""",
    ),
    "music": (
        """Jazz Folk Baroque Gospel Blues Swing Celtic Bluegrass Latin Classical Acoustic Choral
        Brass Chamber Piano Organ Flute Harp Cello Violin Banjo Guitar Drum Mandolin Fiddle""",
        """Ballads Concerts Festivals Recitals Quartets Operas Marches Waltzes Lullabies Sonatas
        Symphonies Duets Records Radio Lessons Jams Hymns Anthems Overtures Serenades Suites
        Rhapsodies Etudes Encores""",
    ),
    "place": (
        """Misty Sunny Quiet Rocky Sandy Grassy Frozen Hidden Ancient Floating Sunken Winding
        Rolling Foggy Starlit Moonlit Windswept Lantern Coral Pine Willow Cedar Maple Birch Oak
        Tulip Lavender Orchid""",
        """Harbors Valleys Meadows Lagoons Canyons Islands Villages Gardens Orchards Vineyards
        Bridges Lighthouses Castles Caves Waterfalls Glaciers Beaches Dunes Marshes Cliffs
        Forests Lakes Rivers Markets Temples Plazas Terraces Alleys""",
    ),
    "thing": (
        """Antique Vintage Wooden Paper Brass Glass Crystal Velvet Silk Porcelain Tin Iron
        Pewter Marble Enamel Leather Ivory Amber Jade Onyx Pearl Bronze Ceramic Lacquered""",
        """Clocks Lamps Globes Maps Kites Puzzles Marbles Mirrors Lanterns Compasses Telescopes
        Typewriters Radios Cameras Teapots Vases Chess Sets Music Boxes Spinning Tops Wind
        Chimes Fountain Pens Snow Globes Tin Soldiers""",
    ),
    "reading": (
        """Mystery Fantasy Science History Travel Nature Poetry Horror Romance Adventure
        Detective Spy Pirate Space Ghost Fairy Comic Graphic Western Crime Folk War Sea Time""",
        """Novels Stories Podcasts Films Documentaries Anthologies Magazines Memoirs Plays
        Sagas Epics Fables Legends Serials Radio Dramas Audiobooks Cartoons Essays Chronicles
        Mysteries""",
    ),
}

# multi-word heads in the lists above are written with a space; keep them whole
_JOINED_HEADS = ("Chess Sets", "Music Boxes", "Spinning Tops", "Wind Chimes", "Fountain Pens", "Snow Globes",
                 "Tin Soldiers", "Radio Dramas")


def _heads(text: str) -> list[str]:
    for joined in _JOINED_HEADS:
        text = text.replace(joined, joined.replace(" ", "_"))
    return [w.replace("_", " ") for w in text.split()]


def _title(item: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in item.split())


@lru_cache(maxsize=1)
def _all_items() -> tuple[str, ...]:
    items: list[str] = []
    for modifiers, heads in _THEMES.values():
        items += [f"{m} {h}" for m in modifiers.split() for h in _heads(heads)]
    items += [_title(i) for i in LIKEABLE_ITEMS]
    seen, unique = set(), []
    for item in items:
        # "Snow Snow Globes", "Paper Paper Making"-style repeats read badly: drop them
        if item.lower() not in seen and len(set(item.lower().split())) == len(item.split()):
            seen.add(item.lower())
            unique.append(item)
    return tuple(unique)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")


@lru_cache(maxsize=2)
def limit_items(split: str) -> tuple[str, ...]:
    """The Title-Case items of one half (``train`` or ``eval``); the halves are disjoint."""
    _check_split(split)
    items = list(_all_items())
    random.Random(_SPLIT_SEED).shuffle(items)
    half = len(items) // 2
    return tuple(items[:half] if split == "train" else items[half:])


@lru_cache(maxsize=2)
def limit_names(split: str) -> tuple[str, ...]:
    """"First Last" names of one half; first and last names are each split, so the halves share
    no name part."""
    _check_split(split)
    firsts, lasts = list(FIRST_NAMES), list(LAST_NAMES)
    random.Random(_SPLIT_SEED).shuffle(firsts)
    random.Random(_SPLIT_SEED + 1).shuffle(lasts)
    pick = slice(0, None, 2) if split == "train" else slice(1, None, 2)
    return tuple(f"{f} {l}" for f in firsts[pick] for l in lasts[pick])
