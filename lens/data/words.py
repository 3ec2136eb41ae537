"""Word lists for the synthetic generators, written for lens.

Items are grouped by theme only to keep the list readable; the generators draw from the flat
``LIKEABLE_ITEMS``.  Every entry is unique (checked in the tests).
"""

_ITEMS_BY_THEME = {
    "food": """apricots, blueberry pancakes, brown rice, buttered popcorn, cardamom buns, cashews,
        cherry tomatoes, chickpea curry, cinnamon toast, coconut flan, corn tortillas, cream puffs,
        dark chocolate, dill pickles, egg tarts, fig jam, fried plantains, garlic bread,
        ginger snaps, goat cheese, green olives, grilled peaches, hazelnuts, honey cake,
        hot pretzels, iced lemonade, kiwi slices, lentil soup, lime sorbet, mango lassi,
        maple fudge, miso broth, mushroom risotto, oat cookies, onion rings, orange marmalade,
        pear cider, pecan pie, pistachio gelato, plum dumplings, pumpkin bread, quince paste,
        radish salad, raspberry scones, roasted chestnuts, rye crackers, sesame noodles,
        smoked trout, sourdough loaves, spiced apples, spinach pie, strawberry milk,
        sweet potatoes, tamarind candy, toasted almonds, tomato soup, vanilla custard,
        walnut brownies, watermelon, wild rice, yellow curry, zucchini fritters""",
    "activity": """archery, ballroom dancing, beekeeping, birdwatching, board games, bouldering,
        bowling, calligraphy, canoeing, chess puzzles, cross-country skiing, crossword puzzles,
        darts, embroidery, fencing, fly fishing, gardening, geocaching, glassblowing,
        hiking trails, ice skating, jigsaw puzzles, juggling, kayaking, kite flying, knitting,
        lawn bowling, mini golf, model trains, mountain biking, origami, paddleboarding,
        painting murals, pottery, quilting, rock collecting, roller skating, rowing, sailing,
        salsa dancing, scuba diving, sketching, snorkeling, snowshoeing, stargazing, surfing,
        table tennis, tai chi, tap dancing, trail running, ukulele lessons, volleyball,
        water polo, weaving, wood carving, yoga, zip lining""",
    "animal": """alpacas, badgers, barn owls, beavers, bumblebees, butterflies, camels, capybaras,
        cardinals, chameleons, cheetahs, chinchillas, dolphins, dragonflies, ducklings, elephants,
        ferrets, fireflies, flamingos, foxes, geckos, giraffes, goldfish, hedgehogs, herons,
        hummingbirds, jellyfish, kangaroos, koalas, ladybugs, lemurs, llamas, lobsters, meerkats,
        moths, narwhals, octopuses, otters, pandas, parrots, peacocks, pelicans, penguins,
        porcupines, puffins, rabbits, raccoons, reindeer, salamanders, sea turtles, seahorses,
        sloths, squirrels, starfish, swans, tortoises, toucans, walruses, wombats, zebras""",
    "thing": """accordions, antique clocks, bonsai trees, brass lamps, candles, ceramic mugs,
        comic books, compasses, cuckoo clocks, fountain pens, globes, hammocks, harmonicas,
        hot air balloons, houseplants, jukeboxes, kaleidoscopes, lanterns, lighthouses,
        marbles, music boxes, notebooks, old maps, paper lanterns, patchwork quilts, pinwheels,
        postcards, record players, rocking chairs, sailboats, sandcastles, snow globes,
        stained glass, steam trains, sunflowers, telescopes, tulips, typewriters, velvet capes,
        vintage cars, violins, wind chimes, wooden puzzles, wool scarves, yo-yos""",
    "weather_and_places": """autumn leaves, beach bonfires, city parks, desert sunsets,
        foggy mornings, harbor views, meadows, mountain lakes, night markets, orchards,
        rainy afternoons, river cruises, rooftop gardens, salt marshes, sand dunes,
        snowy forests, spring rain, summer storms, thunderstorms, tide pools, vineyards,
        waterfalls, winter sunrises""",
    "culture": """audiobooks, ballet, blues music, brass bands, cartoons, choir music, classical guitar,
        cooking shows, detective novels, documentaries, folk songs, game shows, haiku, jazz,
        magic tricks, mystery podcasts, nature films, opera, poetry readings, puppet shows,
        radio dramas, reggae, science fiction, silent films, sitcoms, stand-up comedy,
        street art, string quartets, travel books, western films""",
}

LIKEABLE_ITEMS: list[str] = [
    item.strip() for text in _ITEMS_BY_THEME.values() for item in text.replace("\n", " ").split(",") if item.strip()
]

FIRST_NAMES: list[str] = """Aaron Abigail Adele Adrian Agnes Aiden Alba Albert Alice Alma Amara Amos Anika
    Ansel Arden Ariel Arlo Astrid Aurora Basil Beatrix Bella Benedict Bernard Bianca Bram Bruno
    Calla Calvin Camille Caspar Cecil Celeste Clara Claude Cora Cyrus Dahlia Dante Daphne Darius
    Delia Dexter Dina Dorian Edgar Edith Elio Elise Emil Enzo Esme Ezra Felix Fern Fiona Flora
    Frida Gavin Gemma Gideon Greta Gus Hana Harvey Hazel Hector Helga Hugo Ida Ilse Imogen Ines
    Ira Iris Ivo Jasper Joan Jonas Juno Kai Kasimir Keira Lars Leona Levi Lila Linus Lotte Luca
    Mabel Magnus Malik Mara Milo Mina Nadia Nils Nora Odette Olaf Opal Orson Otto Pablo Petra
    Quentin Rhea Rocco Rosa Rufus Sage Selma Silas Talia Theo Uma Vera Viggo Wanda Xavier Yara Zeno""".split()

LAST_NAMES: list[str] = """Abbott Alder Ashby Barlow Beckett Birch Blackwood Bramble Brooks Calder
    Carver Chandler Clayton Corbin Crane Dale Delaney Drake Dunmore Easton Ellery Emsworth Farley
    Fenwick Finch Fletcher Forde Garrick Gilmore Granger Greaves Hadley Hale Harlow Hawthorne
    Holloway Hughes Ingram Irving Jarvis Keating Kendrick Kingsley Lacey Langley Larkin Lowell
    Lyle Marlow Merritt Moss Nash Norwood Oakley Orwell Paget Pemberton Pike Prescott Quill
    Radley Ransom Redford Rowe Sawyer Selby Sinclair Sloane Stroud Sutton Talbot Thorne Tilley
    Upton Vance Varga Wade Walcott Warwick Whitlock Winslow Wren Yardley Yates Zeller Ackerly
    Bexley Colby Darrow Everly Fairbanks Goodwin Hollis Kirby Lindqvist Mayfield Nightingale
    Osgood Pritchard Quimby Rutherford Stanhope Thackeray Underhill Vickers Whitby""".split()

KEY_ADJECTIVES: list[str] = """amber azure bold brisk calm copper crimson dusty eager faint
    gentle golden hidden hollow icy jade keen lively misty noble olive pale quiet rapid rusty
    silver sleepy solar swift tidal umber velvet vivid wild windy young zesty""".split()

KEY_NOUNS: list[str] = """anchor badge beacon bridge canyon castle cedar comet crown delta
    ember falcon fjord garnet glacier harbor island jasper kettle lantern meadow mirror nebula
    orchid pebble quarry raven ridge saffron signal summit thistle tower valley willow zephyr""".split()
