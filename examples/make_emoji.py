"""Build the shipped example set examples/emoji/: every emoji drawn by four artists, described by several sources.

Entities are the fully-qualified emoji of emojibase-data without skin-tone or hair-style variants that all four
artists draw; an emoji and its variants (gender, direction: families()) fall on one side of the split. Each gets one
64x64 palette PNG on white per artist (Google Noto, Twitter Twemoji, Microsoft Fluent flat, OpenMoji) and its
descriptions from independent sources (CLDR short name and keywords, the Unicode name,
emojilib's community keywords, GitHub and Slack shortcodes). The families are split by a hash into train /
validation / held-out, and OpenMoji is held out of training entirely (a style never seen in training). The files it
writes and their roles are listed in examples/emoji/README.md, which quotes the counts this script prints.

    python examples/make_emoji.py [--out DIR] [--packs DIR]    # default: examples/emoji; about 30 s on 2 cores

Inputs: the pinned npm packages of PACKAGES, fetched with `npm pack NAME@VERSION` into a temporary folder (or read
from --packs, a folder of those .tgz files) and checked against their SHA-256; never downloaded at run time of the
repository's scripts. Needs node/npm, Pillow (images saved by Pillow 13), and the SVG renderer rsvg-convert 2.54
(Debian package librsvg2-bin): the same versions give the same bytes on every run.
"""
import argparse
import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from PIL import Image

# name -> (version, SHA-256 of the tarball `npm pack` fetches): the inputs, pinned
PACKAGES = {
    "emoji-datasource-google": ("16.0.0", "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "emoji-datasource-twitter": ("16.0.0", "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
    "fluentui-emoji": ("1.3.0", "ec892e607e854859b812c7d827801756adc19955b0ef56d4ae8afcddd19492c5"),
    "openmoji": ("17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"),
    "emojibase-data": ("17.0.0", "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a"),
    "emojilib": ("4.0.3", "7f9a6b43cff31d18985b7d65d11faba5bd971cbcc60020cf6d09322fbaaaf303"),
}
RSVG_VERSION = "2.54"  # rsvg-convert --version; another version may anti-alias differently (other bytes)
SIZE = 64  # pixels per side, every artist (the emoji-datasource PNGs are drawn at 64)
# artist -> (folder in images/, licence): the order is the order of an entity's depictions
ARTISTS = {"noto": "Apache-2.0", "twemoji": "CC-BY-4.0", "fluent": "MIT", "openmoji": "CC-BY-SA-4.0"}
TRAIN_ARTISTS = ["noto", "twemoji", "fluent"]  # depictions an entity has in training (noto first: the pairs image)
HELD_OUT_ARTIST = "openmoji"  # never in any training file: the style-shift tasks
# split on sha1(family id) % 100: train below 56, validation 56-69, held-out from 70 (as the old set's 70/30); a
# family is an emoji with its variants (families() below), its id the smallest entity id in it
TRAIN_PCT, VAL_PCT = 56, 70
# Family rules. Person forms read as one: man / woman / person, boy / girl / child, old man / old woman / older person
PERSON_FORMS = {"1f468": "person", "1f469": "person", "1f9d1": "person", "1f466": "child", "1f467": "child",
                "1f9d2": "child", "1f474": "older", "1f475": "older", "1f9d3": "older"}
VARIANT_MARKS = {"200d", "2640", "2642", "27a1"}  # ZWJ, female sign, male sign, rightwards arrow ("facing right")
# words that tell variants apart in a CLDR name: the person forms and the directions (a held-out "left arrow" whose
# "right arrow" was trained on is the same drawing turned); "left luggage" / "luggage" is the one tie it adds in error
VARIANT_WORDS = re.compile(r"\b(man|woman|person|men|women|people|boy|girl|child|facing|left|right|up|down|"
                           r"leftwards|rightwards|upwards|downwards)\b")
# The gendered forms whose neutral one has its own code point and another name; no package records this triple
NEUTRAL_FORMS = [("1f934", "1f478", "1fac5")]  # prince, princess, person with crown (the neutral form, Emoji 14)
HAIR = {"1F9B0", "1F9B1", "1F9B2", "1F9B3"}  # hair-style components: their sequences are variants
MIN_CLASS = 3  # a subgroup is a zero-shot class when it has at least this many held-out entities
PAIRED_FRAC = 0.05  # SOTAlign inputs: fraction of the train entities kept as true pairs
TEMPLATES = ["an emoji of a {}.", "a {} emoji.", "an icon of a {}.", "a cartoon {}."]
CLASSNAMES = {  # emojibase subgroup -> class name for the zero-shot prompts (written once, by us)
    "face-smiling": "smiling face", "face-affection": "affectionate face", "face-tongue": "face with tongue",
    "face-hand": "face with hand", "face-neutral-skeptical": "neutral face", "face-sleepy": "sleepy face",
    "face-unwell": "sick face", "face-hat": "face with hat", "face-glasses": "face with glasses",
    "face-concerned": "worried face", "face-negative": "angry face", "face-costume": "costume character",
    "cat-face": "cat face", "monkey-face": "monkey face", "heart": "heart", "emotion": "comic symbol",
    "hand-fingers-open": "open hand", "hand-fingers-partial": "hand gesture", "hand-single-finger": "pointing finger",
    "hand-fingers-closed": "fist", "hands": "pair of hands", "hand-prop": "hand holding something",
    "body-parts": "body part", "person": "person", "person-gesture": "person gesturing", "person-role": "worker",
    "person-fantasy": "fantasy character", "person-activity": "person doing an activity", "person-sport": "athlete",
    "person-resting": "resting person", "family": "family", "person-symbol": "silhouette",
    "animal-mammal": "mammal", "animal-bird": "bird", "animal-amphibian": "amphibian", "animal-reptile": "reptile",
    "animal-marine": "sea animal", "animal-bug": "insect", "plant-flower": "flower", "plant-other": "plant",
    "food-fruit": "fruit", "food-vegetable": "vegetable", "food-prepared": "meal", "food-asian": "asian dish",
    "food-marine": "seafood dish", "food-sweet": "dessert", "drink": "drink", "dishware": "kitchen utensil",
    "place-map": "map", "place-geographic": "landscape", "place-building": "building",
    "place-religious": "place of worship", "place-other": "outdoor scene", "transport-ground": "land vehicle",
    "transport-water": "boat", "transport-air": "aircraft", "hotel": "luggage", "time": "clock",
    "sky-weather": "weather symbol", "event": "celebration", "award-medal": "award", "sport": "sports equipment",
    "game": "game", "arts-crafts": "art supply", "clothing": "piece of clothing", "sound": "loudspeaker",
    "music": "music symbol", "musical-instrument": "musical instrument", "phone": "phone", "computer": "computer",
    "light-video": "camera or light", "book-paper": "book", "money": "money item", "mail": "mail item",
    "writing": "writing tool", "office": "office supply", "lock": "lock", "tool": "tool", "science":
    "science equipment", "medical": "medical item", "household": "household item", "other-object": "object",
    "transport-sign": "transport sign", "warning": "warning sign", "arrow": "arrow", "religion": "religious symbol",
    "zodiac": "zodiac sign", "av-symbol": "media button", "gender": "gender symbol", "math": "math symbol",
    "punctuation": "punctuation mark", "currency": "currency symbol", "other-symbol": "symbol", "keycap": "keycap",
    "alphanum": "text button", "geometric": "geometric shape", "flag": "flag", "country-flag": "country flag",
    "subdivision-flag": "regional flag",
}


# ---------------------------------------------------------------------------- inputs
def fetch(packs: Path, work: Path) -> dict:
    """name -> the unpacked package folder; each tarball from --packs or `npm pack`, checked against PACKAGES."""
    out = {}
    for name, (version, sha) in PACKAGES.items():
        tgz = packs / f"{name}-{version}.tgz" if packs else None
        if tgz is None or not tgz.is_file():
            subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=work, check=True,
                           stdout=subprocess.DEVNULL)
            tgz = work / f"{name}-{version}.tgz"
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if sha and digest != sha:
            sys.exit(f"error: {tgz}: SHA-256 {digest} is not the pinned {sha}; fetch {name}@{version} again")
        with tarfile.open(tgz) as tar:
            tar.extractall(work / name, filter="data")
        out[name] = work / name / "package"
        print(f"{name}@{version}: sha256 {digest}")
    return out


def key(hexcode: str) -> str:
    """An emoji's id across the packages: its code points without variation selectors, lower case (1f468-200d-1f373)."""
    return "-".join(c for c in hexcode.lower().split("-") if c not in ("fe0f", "fe0e"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"['\u2019]", "", text.lower())).strip("-")


def entities(pkg: dict) -> list:
    """The emojibase entries that are emoji in their own right: not components, no skin tones (they sit under
    `skins`), no hair-style sequences, no bare regional indicators (no group)."""
    base = pkg["emojibase-data"] / "en"
    subgroups = {s["order"]: s["key"] for s in json.loads((base / "messages.json").read_text("utf-8"))["subgroups"]}
    out = []
    for e in json.loads((base / "data.json").read_text("utf-8")):
        if "group" not in e or e["group"] == 2 or HAIR & set(e["hexcode"].split("-")):
            continue
        out.append({"id": key(e["hexcode"]), "hexcode": e["hexcode"], "emoji": e["emoji"], "label": e["label"],
                    "tags": e.get("tags", []), "subgroup": subgroups[e["subgroup"]]})
    return out


def sources(pkg: dict) -> dict:
    """The drawings: artist -> {entity id: (kind "png" | "svg", path)}; and the extra descriptions."""
    art = {}
    for artist, name in (("noto", "google"), ("twemoji", "twitter")):
        root = pkg[f"emoji-datasource-{name}"]
        art[artist] = {key(e["unified"]): ("png", root / "img" / name / "64" / e["image"])
                       for e in json.loads((root / "emoji.json").read_text("utf-8")) if e[f"has_img_{name}"]}
    root = pkg["openmoji"]
    art["openmoji"] = {key(e["hexcode"]): ("svg", root / "color" / "svg" / f"{e['hexcode']}.svg")
                       for e in json.loads((root / "data" / "openmoji.json").read_text("utf-8"))}
    flat = pkg["fluentui-emoji"] / "icons" / "flat"
    # Fluent's files are named by the CLDR name; emoji with skin tones have a `-default` (yellow) file
    art["fluent"] = {p.stem[:-len("-default")] if p.stem.endswith("-default") else p.stem: ("svg", p)
                     for p in sorted(flat.glob("*.svg"))}
    return art


def fluent_path(art: dict, e: dict):
    return art["fluent"].get(slug(e["label"]))


def descriptions(e: dict, pkg_data: dict) -> list:
    """The entity's descriptions, source by source: CLDR short name, Unicode name, CLDR keywords, emojilib keywords,
    GitHub and Slack (iamcal) shortcodes; lower-cased, `_` read as a space, de-duplicated (first kept); strings
    without a letter (emoticons such as ':D') dropped."""
    raw = [e["label"], pkg_data["unicode_name"].get(e["id"], ""), *e["tags"],
           *pkg_data["emojilib"].get(e["emoji"].replace("\ufe0f", ""), []),
           *pkg_data["github"].get(e["hexcode"], []), *pkg_data["iamcal"].get(e["hexcode"], [])]
    out = []
    for d in raw:
        d = re.sub(r"\s+", " ", d.replace("_", " ")).strip().lower()
        if re.search(r"[a-z]", d) and d not in out:
            out.append(d)
    return out


def description_sources(pkg: dict) -> dict:
    def codes(name):
        data = json.loads((pkg["emojibase-data"] / "en" / "shortcodes" / f"{name}.json").read_text("utf-8"))
        return {h: ([v] if isinstance(v, str) else v) for h, v in data.items()}
    lib = json.loads((pkg["emojilib"] / "dist" / "emoji-en-US.json").read_text("utf-8"))
    google = json.loads((pkg["emoji-datasource-google"] / "emoji.json").read_text("utf-8"))
    return {"emojilib": {k.replace("\ufe0f", ""): v for k, v in lib.items()}, "github": codes("github"),
            "iamcal": codes("iamcal"), "unicode_name": {key(g["unified"]): g["name"] or "" for g in google}}


def code_key(entity_id: str) -> str:
    """Family rule 1: the code points without ZWJ, gender signs and the "facing right" arrow, person forms as one."""
    return "-".join(PERSON_FORMS.get(c, c) for c in entity_id.split("-") if c not in VARIANT_MARKS)


def name_key(label: str) -> str:
    """Family rule 2: the CLDR name without the VARIANT_WORDS ("" for "person", "man" alone: nothing to compare)."""
    return re.sub(r"\s+", " ", VARIANT_WORDS.sub("", label)).strip(" :,-")


def families(ents: list, pkg: dict) -> dict:
    """entity id -> family id: an emoji and its variants, so that a split never puts "man frowning" in training and
    "person frowning" in the held-out set. Two entities are one family when any of these ties them:
      1. their code points agree once gender signs, the "facing right" arrow and ZWJ are dropped and the person forms
         are read as one (PERSON_FORMS): person / man / woman frowning, man cook / cook, ... walking: facing right;
      2. their CLDR names agree once the VARIANT_WORDS (person forms, directions) are dropped: man dancing / woman
         dancing (two code points), men's room / women's room, left arrow / right arrow, thumbs up / thumbs down;
      3. emoji-datasource records that one obsoletes the other (runner -> man running);
      4. one is a ZWJ sequence that starts from the other, not a person form: black cat / cat, heart on fire / red
         heart, polar bear / bear;
      5. one is named "X face" and the other "X": the head and the whole animal (cat face / cat), the moon with a
         face (full moon face / full moon);
      6. NEUTRAL_FORMS, listed by hand.
    The family id is its smallest entity id, so an emoji without variants keeps its own id (and its split)."""
    ids = {e["id"] for e in ents}
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(members):
        members = sorted(root(i) for i in members)
        for i in members[1:]:
            parent[i] = members[0]

    by_key = {}
    for e in ents:
        by_key.setdefault(("code", code_key(e["id"])), []).append(e["id"])
        name = name_key(e["label"])
        if name:  # "person", "man" alone leave nothing to compare
            by_key.setdefault(("name", name), []).append(e["id"])
        first = e["id"].split("-")[0]
        if "200d" in e["id"] and first in ids and first not in PERSON_FORMS:
            by_key.setdefault(("base", first), [first]).append(e["id"])
    by_label = {e["label"]: e["id"] for e in ents}
    for e in ents:
        if e["label"].endswith(" face") and e["label"][:-len(" face")] in by_label:
            by_key[("face", e["id"])] = [e["id"], by_label[e["label"][:-len(" face")]]]
    for members in by_key.values():
        join(members)
    for g in json.loads((pkg["emoji-datasource-google"] / "emoji.json").read_text("utf-8")):
        pair = [key(g["unified"]), key(g.get("obsoletes") or "")]
        if all(i in ids for i in pair):
            join(pair)
    for triple in NEUTRAL_FORMS:
        join([i for i in triple if i in ids])
    return {i: root(i) for i in ids}


# ---------------------------------------------------------------------------- images
def render(kind: str, path: Path) -> bytes:
    """A SIZE x SIZE 256-colour palette PNG on white: the artist's drawing as its package frames it (not cropped)."""
    if kind == "svg":  # rsvg-convert keeps the aspect ratio with -a; centred on a square below
        png = subprocess.run(["rsvg-convert", "-a", "-w", str(SIZE), "-h", str(SIZE), str(path)], check=True,
                             capture_output=True).stdout
        im = Image.open(BytesIO(png)).convert("RGBA")
    else:
        im = Image.open(path).convert("RGBA")
        if im.size != (SIZE, SIZE):
            im = im.resize((SIZE, SIZE), Image.LANCZOS)
    square = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 255))
    square.alpha_composite(im, ((SIZE - im.width) // 2, (SIZE - im.height) // 2))
    pal = square.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = BytesIO()
    pal.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------- outputs
def write_csv(path: Path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def write_lines(path: Path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def image(artist, e):
    return f"images/{artist}/{e['id']}.png"


def pair_rows(ents, artist="noto"):
    """image,caption rows: the entity's depiction by `artist` with each of its descriptions."""
    return [["image", "caption"]] + [[image(artist, e), d] for e in ents for d in e["descriptions"]]


def class_rows(ents, artists, classes):
    """image,class rows for zeroshot/: the paths relative to that folder, as every list here."""
    return [["image", "class"]] + [["../" + image(a, e), e["subgroup"]] for e in ents for a in artists
                                   if e["subgroup"] in classes]


def retrieval_artist(e):
    """The one training artist whose depiction stands for a held-out entity in retrieval (rotated by the hash)."""
    return TRAIN_ARTISTS[int(hashlib.sha1(f"ret {e['id']}".encode()).hexdigest(), 16) % len(TRAIN_ARTISTS)]


def licence_texts(pkg: dict) -> dict:
    """LICENSES/<file> -> its source. Unicode-DFS-2016.txt (the CLDR data inside emojibase-data) is no package's
    file: it is kept by hand, like README.md."""
    apache = Path("/usr/share/common-licenses/Apache-2.0")  # Noto's images; Debian's base-files ships the text
    if not apache.is_file():
        sys.exit(f"error: {apache} is missing; put the Apache License 2.0 text there (Debian: base-files)")
    return {"Apache-2.0.txt": apache, "MIT-emoji-datasource.txt": pkg["emoji-datasource-google"] / "LICENSE",
            "MIT-fluentui-emoji.txt": pkg["fluentui-emoji"] / "LICENSE",
            "CC-BY-SA-4.0-openmoji.txt": pkg["openmoji"] / "LICENSE.txt",
            "MIT-emojibase.txt": pkg["emojibase-data"] / "LICENSE",
            "MIT-emojilib.txt": pkg["emojilib"] / "LICENSE"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "emoji")
    ap.add_argument("--packs", type=Path, default=None, help="folder with the pinned .tgz files (else npm pack)")
    a = ap.parse_args()
    version = subprocess.run(["rsvg-convert", "--version"], capture_output=True, text=True).stdout.split()
    if version[-1].rsplit(".", 1)[0] != RSVG_VERSION:
        print(f"warning: rsvg-convert {version[-1]}, not {RSVG_VERSION}.x: the SVG images may differ in bytes")
    with tempfile.TemporaryDirectory() as tmp:
        pkg = fetch(a.packs, Path(tmp))
        art, extra = sources(pkg), description_sources(pkg)
        ents, missing = [], Counter()
        for e in entities(pkg):
            drawn = {"noto": art["noto"].get(e["id"]), "twemoji": art["twemoji"].get(e["id"]),
                     "fluent": fluent_path(art, e), "openmoji": art["openmoji"].get(e["id"])}
            if not all(drawn.values()):  # every entity is drawn by all four artists
                missing.update(k for k, v in drawn.items() if not v)
                continue
            e["descriptions"], e["drawn"] = descriptions(e, extra), drawn
            ents.append(e)
        family = families(ents, pkg)
        for e in ents:  # a family falls on one side: the hash of its id decides for all its members
            e["family"] = family[e["id"]]
            h = int(hashlib.sha1(e["family"].encode()).hexdigest(), 16) % 100
            e["split"] = "train" if h < TRAIN_PCT else "val" if h < VAL_PCT else "heldout"
        for d in ("images", "zeroshot"):  # only the folders this script owns
            shutil.rmtree(a.out / d, ignore_errors=True)
        jobs = [(artist, e) for e in ents for artist in ARTISTS]
        with ThreadPoolExecutor(4) as pool:  # rsvg-convert runs as a process: threads overlap them
            pngs = list(pool.map(lambda j: render(*j[1]["drawn"][j[0]]), jobs))
        for artist in ARTISTS:
            (a.out / "images" / artist).mkdir(parents=True)
        for (artist, e), png in zip(jobs, pngs):
            (a.out / image(artist, e)).write_bytes(png)
        (a.out / "LICENSES").mkdir(exist_ok=True)
        for fname, src in licence_texts(pkg).items():
            shutil.copyfile(src, a.out / "LICENSES" / fname)

    split = {s: [e for e in ents if e["split"] == s] for s in ("train", "val", "heldout")}
    train, val, held = split["train"], split["val"], split["heldout"]
    write_csv(a.out / "train.csv", pair_rows(train))
    # SMA's image sets: the other training depictions of each train entity (sma.py --depictions)
    write_csv(a.out / "depictions.csv", [["image", "depiction"]] + [[image("noto", e), image(artist, e)]
                                                                    for e in train for artist in TRAIN_ARTISTS[1:]])
    write_csv(a.out / "heldout.csv", [["image", "caption"]] + [[image(retrieval_artist(e), e), d]
                                                               for e in held for d in e["descriptions"]])
    write_csv(a.out / f"heldout_{HELD_OUT_ARTIST}.csv", pair_rows(held, HELD_OUT_ARTIST))
    write_csv(a.out / "val.csv", [["image", "caption"]] + [[image(retrieval_artist(e), e), d]
                                                           for e in val for d in e["descriptions"]])
    write_csv(a.out / f"val_{HELD_OUT_ARTIST}.csv", pair_rows(val, HELD_OUT_ARTIST))

    # Zero-shot classification by subgroup: every depiction of the entities of a split, as image,class rows
    counts = Counter(e["subgroup"] for e in held)
    classes = sorted(s for s, n in counts.items() if n >= MIN_CLASS)
    (a.out / "zeroshot").mkdir()
    write_csv(a.out / "zeroshot" / "classes.csv", [["class", "name"]] + [[c, CLASSNAMES[c]] for c in classes])
    write_lines(a.out / "zeroshot" / "templates.txt", TEMPLATES)
    write_csv(a.out / "zeroshot" / "heldout.csv", class_rows(held, TRAIN_ARTISTS, classes))
    write_csv(a.out / "zeroshot" / f"heldout_{HELD_OUT_ARTIST}.csv", class_rows(held, [HELD_OUT_ARTIST], classes))
    write_csv(a.out / "zeroshot" / "val.csv", class_rows(val, TRAIN_ARTISTS, classes))
    write_csv(a.out / "zeroshot" / f"val_{HELD_OUT_ARTIST}.csv", class_rows(val, [HELD_OUT_ARTIST], classes))
    # the subgroup of each train entity (as the old set: sweep.py --val-classes)
    write_csv(a.out / "subgroups.csv", [["image", "subgroup"]] + [[image("noto", e), e["subgroup"]] for e in train])

    # SOTAlign: a few true pairs; the images and the descriptions of two disjoint halves (noto depictions)
    order = sorted(train, key=lambda e: hashlib.sha1(f"sotalign {e['id']}".encode()).hexdigest())
    n_pair = round(PAIRED_FRAC * len(order))
    half = n_pair + (len(order) - n_pair) // 2
    by_id = lambda es: sorted(es, key=lambda e: e["id"])  # noqa: E731
    paired, images, texts = by_id(order[:n_pair]), by_id(order[n_pair:half]), by_id(order[half:])
    write_csv(a.out / "sotalign_pairs.csv", pair_rows(paired))
    write_csv(a.out / "unpaired_images.csv", [["image"]] + [[image("noto", e)] for e in images])
    write_lines(a.out / "unpaired_texts.txt", [d for e in texts for d in e["descriptions"]])

    # the counts examples/emoji/README.md quotes
    n_desc = [len(e["descriptions"]) for e in ents]
    owners = Counter(d for e in ents for d in e["descriptions"])
    n_rows = sum(n_desc)
    shared_rows = sum(1 for e in ents for d in e["descriptions"] if owners[d] > 1)
    train_desc = {d for e in train for d in e["descriptions"]}
    held_desc = [d for e in held for d in e["descriptions"]]
    size = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file() and p.name != "README.md")
    n_files = sum(1 for p in a.out.rglob("*") if p.is_file())
    zs = {s: len(class_rows(split[s], TRAIN_ARTISTS, classes)) - 1 for s in ("val", "heldout")}
    print(f"entities: {len(ents)} drawn by all four artists ({len(train)} train, {len(val)} validation, "
          f"{len(held)} held-out); left out for a missing drawing: "
          + ", ".join(f"{k} {v}" for k, v in sorted(missing.items())))
    print(f"descriptions per entity: min {min(n_desc)}, mean {n_rows / len(ents):.2f}, max {max(n_desc)}; "
          f"{len(owners)} distinct, {sum(1 for n in owners.values() if n > 1)} of them belong to more than one "
          f"entity; {shared_rows} of {n_rows} (entity, description) rows ({100 * shared_rows / n_rows:.1f}%) "
          f"carry such a shared one; most shared: "
          + ", ".join(f"{d!r} {n}" for d, n in owners.most_common(5)))
    sizes = Counter(Counter(e["family"] for e in ents).values())
    print(f"families: {sum(sizes.values())}; " + ", ".join(f"{n} of {k}" for k, n in sorted(sizes.items()))
          + " entities; a family is on one side of the split")
    train_sets = [set(e["descriptions"]) for e in train]
    half_shared = sum(any(2 * len(set(e["descriptions"]) & t) >= len(set(e["descriptions"]) | t) for t in train_sets)
                      for e in held)
    print(f"held-out entities sharing at least half of the pooled descriptions (Jaccard >= 0.5) with one train "
          f"entity: {half_shared} of {len(held)}")
    print(f"held-out descriptions also in train: {sum(d in train_desc for d in held_desc)} of {len(held_desc)}; "
          f"class names that are train descriptions: {sum(CLASSNAMES[c] in train_desc for c in classes)} of "
          f"{len(classes)}")
    print(f"pairs: {len(pair_rows(train)) - 1} train rows, {len(pair_rows(held)) - 1} held-out rows")
    print(f"zero-shot: {len(classes)} classes; held-out {zs['heldout']} images ({len(TRAIN_ARTISTS)} artists) + "
          f"{len(class_rows(held, [HELD_OUT_ARTIST], classes)) - 1} {HELD_OUT_ARTIST}; validation {zs['val']} + "
          f"{len(class_rows(val, [HELD_OUT_ARTIST], classes)) - 1}; majority class "
          f"{max(counts[c] for c in classes) / sum(counts[c] for c in classes):.3f}")
    print(f"sotalign: {len(paired)} paired entities, {len(images)} unpaired images, "
          f"{sum(len(e['descriptions']) for e in texts)} unpaired texts")
    print(f"size: {size / 2 ** 20:.1f} MiB in {n_files} files (README.md excluded)")


if __name__ == "__main__":
    main()
