"""Build the shipped emoji image-caption example dataset (examples/emoji/).

Renders each single-code-point emoji of Noto Color Emoji as a small PNG on white with captions
from its Unicode name and the CLDR English annotations, and writes train / held-out (retrieval)
pairs, a zero-shot split (emoji-test.txt subgroups; subgroups.csv: those of the train entities),
SOTAlign semi-supervised inputs and the licences; examples/emoji/README.md quotes the counts it
prints. Same bytes on every run.

    python examples/make_emoji.py [--out DIR]      # default: examples/emoji

Needs Pillow, numpy and the Debian packages fonts-noto-color-emoji, unicode-cldr-core, unicode-data.
"""
import argparse, csv, hashlib, random, re, shutil, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SRC = {  # name -> (source file, Debian package that ships it)
    "font": ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "fonts-noto-color-emoji"),
    "font_copyright": ("/usr/share/doc/fonts-noto-color-emoji/copyright", "fonts-noto-color-emoji"),
    "cldr": ("/usr/share/unicode/cldr/common/annotations/en.xml", "unicode-cldr-core"),
    "cldr_copyright": ("/usr/share/doc/unicode-cldr-core/copyright", "unicode-cldr-core"),
    "emoji_test": ("/usr/share/unicode/emoji/emoji-test.txt", "unicode-data"),
    "ucd": ("/usr/share/unicode/UnicodeData.txt", "unicode-data"),
}
RANGES = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF),
          (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF), (0x2600, 0x27BF)]
SIZE = 96            # images are SIZE x SIZE, stored as 256-colour palette PNGs
GREY_TOL = 32        # a pixel is "coloured" if max(R,G,B) - min(R,G,B) > GREY_TOL
MIN_COLOURED = 0.05  # keep an emoji only if more than 5% of its pixels are coloured
MAX_CAPTIONS = 6     # unicode name, CLDR tts name, CLDR keywords; de-duplicated, then capped
TRAIN_PCT = 70       # entity-level split on sha1(hex code point)
MIN_CLASS = 4        # zero-shot classes need at least this many held-out images
PAIRED_FRAC = 0.05   # SOTAlign: fraction of train entities kept as true pairs
TEMPLATES = ["an emoji of a {}.", "a {} emoji.", "an icon of a {}.", "a cartoon {}."]
CLASSNAMES = {  # emoji-test.txt subgroup -> class name for zero-shot prompts
    "face-smiling": "smiling face", "face-affection": "affectionate face",
    "face-tongue": "face with tongue", "face-hand": "face with hand",
    "face-neutral-skeptical": "neutral face", "face-sleepy": "sleepy face",
    "face-unwell": "sick face", "face-hat": "face with hat", "face-glasses": "face with glasses",
    "face-concerned": "worried face", "face-negative": "angry face",
    "face-costume": "costume character", "cat-face": "cat face", "monkey-face": "monkey face",
    "heart": "heart", "emotion": "comic symbol", "hand-fingers-open": "open hand",
    "hand-fingers-partial": "hand gesture", "hand-single-finger": "pointing finger",
    "hand-fingers-closed": "fist", "hands": "pair of hands", "hand-prop": "hand holding something",
    "body-parts": "body part", "person": "person", "person-gesture": "person gesturing",
    "person-role": "worker", "person-fantasy": "fantasy character",
    "person-activity": "person doing an activity", "person-sport": "athlete",
    "person-resting": "resting person", "family": "family", "person-symbol": "silhouette",
    "animal-mammal": "mammal", "animal-bird": "bird", "animal-amphibian": "amphibian",
    "animal-reptile": "reptile", "animal-marine": "sea animal", "animal-bug": "insect",
    "plant-flower": "flower", "plant-other": "plant", "food-fruit": "fruit",
    "food-vegetable": "vegetable", "food-prepared": "meal", "food-asian": "asian dish",
    "food-marine": "seafood dish", "food-sweet": "dessert", "drink": "drink",
    "dishware": "kitchen utensil", "place-map": "map", "place-geographic": "landscape",
    "place-building": "building", "place-religious": "place of worship",
    "place-other": "outdoor scene", "transport-ground": "land vehicle", "transport-water": "boat",
    "transport-air": "aircraft", "hotel": "luggage", "time": "clock",
    "sky & weather": "weather symbol", "event": "celebration", "award-medal": "award",
    "sport": "sports equipment", "game": "game", "arts & crafts": "art supply",
    "clothing": "piece of clothing", "sound": "loudspeaker", "music": "music symbol",
    "musical-instrument": "musical instrument", "phone": "phone", "computer": "computer",
    "light & video": "camera or light", "book-paper": "book", "money": "money item",
    "mail": "mail item", "writing": "writing tool", "office": "office supply", "lock": "lock",
    "tool": "tool", "science": "science equipment", "medical": "medical item",
    "household": "household item", "other-object": "object", "transport-sign": "transport sign",
    "warning": "warning sign", "arrow": "arrow", "religion": "religious symbol",
    "zodiac": "zodiac sign", "av-symbol": "media button", "gender": "gender symbol",
    "math": "math symbol", "punctuation": "punctuation mark", "currency": "currency symbol",
    "other-symbol": "symbol", "keycap": "keycap", "alphanum": "text button",
    "geometric": "geometric shape", "flag": "flag",
}


def src(key):
    path, pkg = SRC[key]
    if not Path(path).is_file():
        sys.exit(f"error: {path} is missing; install the Debian package {pkg}")
    return path


def load_names():
    """Unicode names from UnicodeData.txt (`unicodedata` varies with the Python version)."""
    names = {}
    for line in open(src("ucd"), encoding="utf-8"):
        cp, name = line.split(";")[:2]
        if not name.startswith("<"):
            names[int(cp, 16)] = name
    return names


def load_cldr():
    """code point -> (tts short name, [keywords]) from CLDR en.xml."""
    tts, kws = {}, {}
    for a in ET.parse(src("cldr")).getroot().iter("annotation"):
        cp = a.get("cp").replace("\ufe0f", "")
        if len(cp) == 1 and a.get("type") == "tts":
            tts[ord(cp)] = a.text
        elif len(cp) == 1:
            kws[ord(cp)] = a.text.split("|")
    return tts, kws


def load_subgroups():
    """single code point -> (group, subgroup) from emoji-test.txt."""
    out, group, sub = {}, None, None
    for line in open(src("emoji_test"), encoding="utf-8"):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            sub = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            cps = [c for c in line.split(";")[0].split() if c != "FE0F"]
            if len(cps) == 1:
                out.setdefault(int(cps[0], 16), (group, sub))
    return out


def render(font, cp):
    """SIZE x SIZE RGB image of the emoji centred on white, or None if the font lacks it."""
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), chr(cp), font=font, embedded_color=True)
    box = canvas.getbbox()  # bbox of the non-transparent pixels
    if box is None:
        return None
    assert min(box) > 0 and max(box) < 160, f"glyph U+{cp:X} touches the canvas edge"
    glyph = Image.alpha_composite(Image.new("RGBA", canvas.size, "white"), canvas)
    glyph = glyph.convert("RGB").crop(box)
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((SIZE, SIZE), Image.LANCZOS)


def coloured_fraction(img):
    rgb = np.asarray(img, dtype=np.int16)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > GREY_TOL).mean())


def captions(cp, names, tts, kws):
    out = []
    for c in [names.get(cp), tts.get(cp), *kws.get(cp, [])]:
        c = (c or "").strip().lower()
        if c and c not in out:
            out.append(c)
    return out[:MAX_CAPTIONS]


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def pair_rows(ents):
    return [["image", "caption"]] + [[e["image"], c] for e in ents for c in e["captions"]]


def deb_license(key, name, what):
    """Licence `name` (body and copyright holders) from a Debian copyright file."""
    text = open(src(key), encoding="utf-8").read()
    holders = re.search(r"Copyright: +(.*(?:\n +\S.*)*)\nLicense: +" + re.escape(name), text)
    body = re.search(r"^License: +" + re.escape(name) + r"\n((?: .*\n?)+)", text, re.M)
    lines = ["" if line.strip() == "." else line[1:] for line in body[1].rstrip().splitlines()]
    return f"{what}\nCopyright: {holders[1]}\nSource: {SRC[key][0]}\n\n" + "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "emoji")
    out = ap.parse_args().out
    font = ImageFont.truetype(src("font"), 109)  # 109 px is the font's only bitmap size
    names, (tts, kws), subgroups = load_names(), load_cldr(), load_subgroups()
    lic = [deb_license("font_copyright", "SIL-1.1", "Noto Color Emoji font"),
           deb_license("cldr_copyright", "Unicode-DFS-2016",
                       "Unicode CLDR annotations, emoji-test.txt and UnicodeData.txt")]
    for d in ("images", "zeroshot", "LICENSES"):  # only the folders this script owns
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "images").mkdir(parents=True)

    ents, n_grey, n_component = [], 0, 0
    for cp in (cp for lo, hi in RANGES for cp in range(lo, hi + 1)):
        img = render(font, cp)
        if img is None:
            continue
        group, sub = subgroups.get(cp, (None, None))
        if group == "Component":  # skin-tone swatches and hair-style stubs
            n_component += 1
        elif coloured_fraction(img) <= MIN_COLOURED:
            n_grey += 1
        else:
            hx = f"{cp:x}"
            caps = captions(cp, names, tts, kws)
            assert caps, f"U+{cp:X} has no caption"
            img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
                out / "images" / f"{hx}.png", optimize=True)
            train = int(hashlib.sha1(hx.encode()).hexdigest(), 16) % 100 < TRAIN_PCT
            ents.append(dict(cp=cp, hex=hx, image=f"images/{hx}.png", captions=caps,
                             subgroup=sub, train=train))
    train, held = [e for e in ents if e["train"]], [e for e in ents if not e["train"]]
    write_csv(out / "train.csv", pair_rows(train))
    write_csv(out / "heldout.csv", pair_rows(held))

    # Zero-shot classification: held-out entities, one folder per emoji-test.txt subgroup.
    by_sub = {}
    for e in held:
        by_sub.setdefault(e["subgroup"], []).append(e)
    classes = sorted((re.sub(r"[^a-z0-9]+", "-", s), s) for s in by_sub
                     if s and len(by_sub[s]) >= MIN_CLASS)
    for folder, sub in classes:
        (out / "zeroshot" / folder).mkdir(parents=True)
        for e in by_sub[sub]:
            shutil.copyfile(out / e["image"], out / "zeroshot" / folder / f"{e['hex']}.png")
    write_lines(out / "zeroshot" / "classnames.txt", [CLASSNAMES[s] for _, s in classes])
    write_lines(out / "zeroshot" / "templates.txt", TEMPLATES)
    # The subgroup of each train entity, spelled as the zeroshot/ folders: sweep.py's validation zero-shot task.
    write_csv(out / "subgroups.csv", [["image", "subgroup"]] + [[e["image"], re.sub(r"[^a-z0-9]+", "-", e["subgroup"])]
                                                              for e in train if e["subgroup"]])
    zs_sizes = [len(by_sub[s]) for _, s in classes]

    # SOTAlign: a few true pairs; the images and the captions of two disjoint halves.
    order = list(train)
    random.Random(0).shuffle(order)
    n_pair = round(PAIRED_FRAC * len(order))
    half = n_pair + (len(order) - n_pair) // 2
    by_cp = lambda es: sorted(es, key=lambda e: e["cp"])
    paired, images, texts = by_cp(order[:n_pair]), by_cp(order[n_pair:half]), by_cp(order[half:])
    write_csv(out / "sotalign_pairs.csv", pair_rows(paired))
    write_csv(out / "unpaired_images.csv", [["image"]] + [[e["image"]] for e in images])
    lines = [c for e in texts for c in e["captions"]]
    write_lines(out / "unpaired_texts.txt", lines)

    (out / "LICENSES").mkdir()
    for fname, text in zip(("OFL-1.1.txt", "Unicode-DFS-2016.txt"), lic):
        (out / "LICENSES" / fname).write_text(text, encoding="utf-8")
    ncap, n_pairs = [len(e["captions"]) for e in ents], lambda es: len(pair_rows(es)) - 1
    print(f"entities: {len(ents)} ({len(train)} train, {len(held)} held-out); "
          f"dropped {n_grey} grey, {n_component} component")
    print(f"pairs: {n_pairs(train)} train, {n_pairs(held)} held-out; captions per entity "
          f"min {min(ncap)}, mean {sum(ncap) / len(ncap):.2f}, max {max(ncap)}")
    print(f"zero-shot: {len(classes)} classes, {sum(zs_sizes)} images, "
          f"majority class {max(zs_sizes) / sum(zs_sizes):.3f}")
    print(f"sotalign: {len(paired)} paired entities ({n_pairs(paired)} pairs), "
          f"{len(images)} unpaired images, {len(lines)} unpaired texts")


if __name__ == "__main__":
    main()
