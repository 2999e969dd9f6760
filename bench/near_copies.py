"""How far apart a re-encoded or resized copy of an evaluation image and a distinct image are, in the frozen image
features the training scripts extract (issue 25, item 6: the near-copy check of plumbing.near_copies).

Evaluation images: the held-out entities' Noto drawings (examples/emoji, 399). Copies: each of them re-encoded as
JPEG (quality 95, as img2dataset writes, and 75), resized (to 256 px on the shorter side, as img2dataset's
keep_ratio mode; to 32 px and back) and centre-cropped to 90%. Distinct images: every training entity's drawings
(945 x 3), scored by their nearest evaluation image; siblings of a held-out emoji sit on the held-out side
(make_emoji.families). Prints the cosine of each copy to its original, the nearest-evaluation-image cosine of the
distinct images, and the share of each side of NEAR_COPY_COSINE, plus the cost of the check at COCO's size (a matrix
product, timed here).

Then the same copies of real photos: the 19 photographs scikit-image ships (skimage.data: astronaut, coffee, rocket,
a cat, coins, a microscope slide ...; one is the left view of its stereo pair) and scikit-learn's two (china.jpg,
flower.jpg), against every other photo of the set (all pairs), and the stereo pair itself (two views of one
motorbike: distinct files of one scene). Both packages are dependencies of this benchmark only; without them that
part is left out.

    python bench/near_copies.py [--encoder offline:efficientnet-lite0] > bench/near_copies_cpu.md
"""
import argparse
import contextlib
import csv
import io
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402

EMOJI = ROOT / "examples" / "emoji"
ARTISTS = ("noto", "twemoji", "fluent")


def entities(csv_name):
    with open(EMOJI / csv_name, encoding="utf-8", newline="") as f:
        return sorted({Path(r["image"]).stem for r in csv.DictReader(f)})


def jpeg(im, quality):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def shorter_side(im, side):
    """Resized to `side` px on its shorter side, the aspect kept (img2dataset's keep_ratio mode)."""
    w, h = im.size
    return im.resize((round(w * side / min(w, h)), round(h * side / min(w, h))), Image.BICUBIC)


def centre_crop(im, share):
    w, h = im.size
    dw, dh = round(w * (1 - share) / 2), round(h * (1 - share) / 2)
    return im.crop((dw, dh, w - dw, h - dh))


COPIES = {  # name -> how a copy is made from the original
    "jpeg q95": lambda im: jpeg(im, 95),
    "jpeg q75": lambda im: jpeg(im, 75),
    "resize 256 + jpeg q95": lambda im: jpeg(shorter_side(im.convert("RGB"), 256), 95),
    "resize 32 and back": lambda im: im.convert("RGB").resize((32, 32), Image.BICUBIC).resize(im.size, Image.BICUBIC),
    "centre crop 90%": lambda im: centre_crop(im.convert("RGB"), 0.9),
}


def embed(encoder, images, batch=64):
    out = []
    for i in range(0, len(images), batch):
        out.append(encoder.encode(torch.stack([encoder.transform(im) for im in images[i:i + batch]])))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text")


def photos():
    """{name: PIL image} of the real photographs scikit-image and scikit-learn install (no download), or {}."""
    try:
        import numpy as np
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError:
        return {}
    out = {name: Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB") for name in PHOTOS}
    sample = load_sample_images()
    out.update({Path(f).stem: Image.fromarray(im) for f, im in zip(sample.filenames, sample.images)})
    left, right, _ = skimage.data.stereo_motorcycle()
    out["motorcycle_left"], out["motorcycle_right"] = Image.fromarray(left), Image.fromarray(right)
    return out


def quantiles(x):
    q = torch.quantile(x, torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0]))
    return " / ".join(f"{v:.3f}" for v in q.tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="offline:efficientnet-lite0")
    a = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # the loader's own "Loaded pretrained weights" line
        encoder = plumbing.load_encoder(a.encoder, "image")
    held, train = entities("heldout.csv"), entities("train.csv")
    originals = [Image.open(EMOJI / "images" / "noto" / f"{e}.png") for e in held]
    distinct = [Image.open(EMOJI / "images" / art / f"{e}.png") for e in train for art in ARTISTS]
    t0 = time.time()
    Z_eval = embed(encoder, originals)
    nearest, nearest_eval = (embed(encoder, distinct) @ Z_eval.T).max(1)
    copies = {name: (embed(encoder, [make(im) for im in originals]) * Z_eval).sum(1) for name, make in COPIES.items()}
    t_embed = time.time() - t0
    threshold = plumbing.NEAR_COPY_COSINE
    print(f"# Near copies in frozen features ({a.encoder})\n")
    print(f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{len(originals)} evaluation images (the 399 held-out entities, Noto), {len(distinct)} distinct training "
          f"images; embedding took {t_embed:.0f} s. Cosine of L2-normalised features; quantiles min / 1% / median / "
          f"99% / max.\n")
    print("## Emoji (examples/emoji)\n")
    print(f"| pair | n | cosine quantiles | share >= {threshold} |\n|---|---|---|---|")
    for name, cos in copies.items():
        print(f"| copy: {name} | {len(cos)} | {quantiles(cos)} | {(cos >= threshold).float().mean():.1%} |")
    print(f"| distinct: a training image and its nearest evaluation image | {len(nearest)} | {quantiles(nearest)} | "
          f"{(nearest >= threshold).float().mean():.1%} |")
    cuts = (0.9, 0.95, 0.97, 0.98, 0.99)
    print("\nShare at or above each cosine (copies caught; distinct training images that would be refused):\n")
    print("| | " + " | ".join(f">= {c}" for c in cuts) + " |\n|---|" + "---|" * len(cuts))
    for name, cos in [*copies.items(), ("distinct", nearest)]:
        print(f"| {name} | " + " | ".join(f"{(cos >= c).float().mean():.1%}" for c in cuts) + " |")
    names = [f"{art}/{e}" for e in train for art in ARTISTS]
    closest = nearest.argsort(descending=True)[:8]
    print("\nThe distinct training images closest to an evaluation image: " + "; ".join(
        f"{names[i]} ~ noto/{held[int(nearest_eval[i])]} {nearest[i]:.3f}" for i in closest.tolist()))
    photo = photos()
    if photo:
        stereo = photo.pop("motorcycle_right")
        names_p, originals_p = list(photo), list(photo.values())
        Z = embed(encoder, originals_p)
        off = ~torch.eye(len(Z), dtype=torch.bool)
        pairs_p = (Z @ Z.T)[off.triu()]
        print(f"\n## Real photos ({len(Z)}: scikit-image's {len(PHOTOS) + 1} and scikit-learn's 2)\n")
        print(f"| pair | n | cosine quantiles | share >= {threshold} |\n|---|---|---|---|")
        for name, make in COPIES.items():
            cos = (embed(encoder, [make(im) for im in originals_p]) * Z).sum(1)
            print(f"| copy: {name} | {len(cos)} | {quantiles(cos)} | {(cos >= threshold).float().mean():.1%} |")
        print(f"| distinct: two different photos (all pairs) | {len(pairs_p)} | {quantiles(pairs_p)} | "
              f"{(pairs_p >= threshold).float().mean():.1%} |")
        left = Z[names_p.index("motorcycle_left")]
        print(f"| distinct: the stereo pair (one scene, two viewpoints) | 1 | "
              f"{float(embed(encoder, [stereo])[0] @ left):.3f} | |")
        i, j = divmod(int(torch.where(off.triu(), Z @ Z.T, -2).argmax()), len(Z))
        print(f"\nThe closest two different photos: {names_p[i]} ~ {names_p[j]} {float(Z[i] @ Z[j]):.3f}.")
    # The check's cost at COCO's size: 118k training x 5k test features, chunked as plumbing.near_copies does
    n_train, n_eval, dim = 118_287, 5_000, encoder.dim
    X, Y = torch.randn(n_train, dim), torch.randn(n_eval, dim)
    t0 = time.time()
    plumbing.near_copies(X, Y)
    t_check = time.time() - t0
    print(f"\nCost at COCO's size (118,287 training x 5,000 test images, {dim}-d features, on this CPU): "
          f"{t_check:.1f} s for the matrix products; the features themselves are the ones training extracts anyway "
          "(training images) and the ones `--eval` embeds anyway (test images, evaluate.py's cache).")


if __name__ == "__main__":
    main()
