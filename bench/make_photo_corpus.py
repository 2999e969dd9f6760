"""Make a photo-size JPEG corpus for bench/extract.py (not a test; the JPEGs are never committed).

2,000 JPEGs of 640 x 480 px at quality 90 (a COCO-like size), cut from the two real photos that scikit-learn installs
offline (`sklearn.datasets.load_sample_images`: china.jpg and flower.jpg, 640 x 427 each): for each file a random
4:3 box covering 55-100% of the photo's height, a random horizontal flip, and a bicubic rescale to 640 x 480 (--size:
another size; beyond the photos' own 640 x 427 the files are upscaled, smoother than real photos). Nothing is
downloaded. scikit-learn is a dependency of this benchmark only (not of sma.py, sotalign.py or evaluate.py).

  python bench/make_photo_corpus.py                 # -> datasets/photo_corpus/ (ignored by git) + pairs.csv
  python bench/make_photo_corpus.py --n 200 --out /tmp/photos
  python bench/make_photo_corpus.py --n 200 --size 1920x1440 --out datasets/photo_corpus_large   # for Image.draft

Also writes <out>/pairs.csv (`image,caption`, one caption per file) so that sma.py / sotalign.py can read the corpus.
The files are a deterministic function of --seed.
"""
import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make(out: Path, n=2000, size=(640, 480), quality=90, seed=0) -> list:
    from sklearn.datasets import load_sample_images  # bench-only dependency
    sample = load_sample_images()
    photos = [Image.fromarray(a) for a in sample.images]  # (427, 640, 3) uint8 each
    names = [Path(f).stem for f in sample.filenames]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = int(rng.integers(len(photos)))
        photo = photos[k]
        h = int(photo.height * rng.uniform(0.55, 1.0))  # a 4:3 box, rescaled to `size` below
        w = min(photo.width, round(h * size[0] / size[1]))
        x0, y0 = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
        im = photo.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = out / f"{i:05d}.jpg"
        im.resize(size, Image.Resampling.BICUBIC).save(path, quality=quality)
        rows.append((path.name, f"a crop of the {names[k]} photo, number {i}"))
    with open(out / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return [out / r[0] for r in rows]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "datasets" / "photo_corpus"), help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of JPEG files")
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of every file (larger ones are upscaled photos)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and flips")
    a = p.parse_args()
    size = tuple(int(x) for x in a.size.split("x"))
    files = make(Path(a.out), a.n, size, seed=a.seed)
    print(f"{len(files)} JPEGs ({a.size}, quality 90) -> {a.out}")
