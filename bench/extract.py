"""Benchmark (not a test): frozen-feature extraction, the user's main cost, against honest baselines, in one run.

1. Encoder only, one batch already in memory, the same model: plain timm eager in bf16 (autocast, and the weights
   cast to bf16; the faster is the baseline) vs ours (`Encoder.encode`: no_grad, bf16 autocast on CUDA, fp32 on
   CPU). TF32 is left as torch sets it (off), for every line.
2. Data pipeline alone (decode + transforms, no encoder), one worker, one thread, on a photo-size JPEG corpus: the old
   per-view path (a faithful copy below: the file decoded again for every view) vs sma.py's `Views` (decoded once for
   its K views), and the eval view alone (sotalign / evaluate) with and without Pillow's draft on a large-JPEG corpus.
3. End to end from the JPEG files with K views (sma.py's `Views` + `encode_all`, DataLoader workers) vs encoder only.

The corpora come from bench/make_photo_corpus.py (scikit-learn's two sample photos, cropped, flipped, rescaled;
scikit-learn is needed by the corpus script only). Random encoder weights: speed does not depend on them.

  python bench/make_photo_corpus.py && python bench/make_photo_corpus.py --n 200 --size 1920x1440 \\
      --out datasets/photo_corpus_large
  python bench/extract.py --out bench/extract_gpu.md                      # a GPU: DINOv2-L/14 at 224 px, the issue's sizes
  python bench/extract.py --device cpu --image-encoder timm-random:vit_small_patch14_dinov2.lvd142m@224 \\
      --batch 16 --n-encode 64 --n-pipeline 200 --out bench/extract_cpu.md   # this CPU: a smaller model, fewer images
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sma  # noqa: E402
import sotalign  # noqa: E402


class OldRgbFirst:
    """rgb_first before the JPEG draft (commit 8601136): convert to RGB, then the transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, im):
        return self.transform(im.convert("RGB"))


def old_augmentations(enc, K):
    """sma.augmentations before decode-once (commit 8601136), verbatim (rgb_first as it was then)."""
    import torchvision.transforms as T
    aug = T.Compose([T.RandomResizedCrop(enc.image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(),
                     T.Normalize(enc.mean, enc.std)])
    return [OldRgbFirst(enc.transform.transform)] + [OldRgbFirst(aug)] * (K - 1)


class OldViews(Dataset):
    """sma.py's Views before decode-once (commit 8601136), verbatim: item i = view i % K of image i // K, so the file
    is opened and decoded again for each of its K views."""

    def __init__(self, images, transforms, aug_seed, index):
        self.images, self.transforms, self.aug_seed, self.index = images, transforms, aug_seed, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        i, K = self.index[j], len(self.transforms)
        with torch.random.fork_rng(devices=[]), Image.open(self.images[i // K]) as im:
            torch.manual_seed(self.aug_seed * 1_000_003 + i)  # torchvision's random transforms draw from torch's RNG
            return self.transforms[i % K](im)


class FullDecode:
    """An eval transform with the JPEG draft switched off: the image is decoded at full size first."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, im):
        im.load()
        return self.transform(im)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats, warmup, device):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def encoder_rows(a, device):
    """Encoder only: img/s of plain timm eager bf16 (autocast; bf16 weights) and of ours, same model and batch."""
    import timm
    enc = sma.load_encoder(a.image_encoder, "image", device)
    name, _, px = a.image_encoder.split(":", 1)[1].partition("@")
    x = torch.randn(a.batch, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": int(px)} if px else {}))
    plain = plain.eval().to(device)
    plain16 = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": int(px)} if px else {}))
    plain16 = plain16.eval().to(device, torch.bfloat16)
    dev = "cuda" if device.startswith("cuda") else "cpu"

    @torch.no_grad()
    def autocast():
        with torch.autocast(dev, dtype=torch.bfloat16):
            return plain.forward_features(x)

    @torch.no_grad()
    def weights16():
        return plain16.forward_features(x.to(torch.bfloat16))
    rates = {}
    for label, fn in (("plain timm eager, bf16 autocast, no_grad", autocast),
                      ("plain timm eager, bf16 weights, no_grad", weights16),
                      ("ours: Encoder.encode (no_grad; bf16 autocast on CUDA, fp32 on CPU)", lambda: enc.encode(x))):
        t = timed(fn, a.repeats, a.warmup, device)
        rates[label] = a.batch / statistics.median(t)
    ours = rates["ours: Encoder.encode (no_grad; bf16 autocast on CUDA, fp32 on CPU)"]
    best = max(v for k, v in rates.items() if k.startswith("plain"))
    del plain, plain16
    return enc, rates, ours / best


def pipeline_rate(dataset, n_images):
    """Images (files) per second through `dataset` in this process, one thread: decode + transforms only."""
    t = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return n_images / (time.perf_counter() - t)


def pipeline_rows(a, enc):
    """Data pipeline alone, per core: old per-view decode vs decode-once (K views); the eval view with and without
    the JPEG draft on large files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = sorted(str(p) for p in Path(a.corpus).glob("*.jpg"))[:a.n_pipeline]
    K, rows = a.views, {}
    for _ in range(2):
        rows["JPEG decode alone (Image.open + convert RGB), no transform"] = pipeline_rate(
            sotalign.ImageFiles(images, FullDecode(lambda im: im.convert("RGB"))), len(images))
    for _ in range(2):  # warm the page cache and the allocator; the second pass is the one reported
        rows[f"old per-view path (K={K}: each file decoded {K}x)"] = pipeline_rate(
            OldViews(images, old_augmentations(enc, K), 0, range(K * len(images))), len(images))
        rows[f"sma.py Views (K={K}: each file decoded once)"] = pipeline_rate(
            sma.Views(images, enc, K, 0, range(len(images))), len(images))
    large = sorted(str(p) for p in Path(a.large_corpus).glob("*.jpg"))[:a.n_pipeline]
    if large:
        w, h = Image.open(large[0]).size
        for _ in range(2):
            rows[f"eval view only, {w}x{h} JPEGs, full decode"] = pipeline_rate(
                sotalign.ImageFiles(large, FullDecode(enc.transform)), len(large))
            rows[f"eval view only, {w}x{h} JPEGs, Image.draft (sotalign ImageFiles, evaluate)"] = pipeline_rate(
                sotalign.ImageFiles(large, enc.transform), len(large))
    torch.set_num_threads(threads)
    return images, rows


def end_to_end(a, enc, images, device):
    """sma.py's extraction path from the files: Views (K views per decode) -> DataLoader workers -> encode_all."""
    views = sma.Views(images, enc, a.views, 0, range(min(a.n_encode, len(images))))
    per_batch = max(1, a.batch // a.views)
    for _ in DataLoader(views, per_batch, num_workers=a.workers):  # warm the page cache and the workers
        break
    t = time.perf_counter()
    X = sma.encode_all(enc, views, Path("/nonexistent/never-saved.pt"), per_batch, a.workers, "images",
                       save_every_s=1e9)
    sync(device)
    return len(X) * a.views / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-encoder", default="timm-random:vit_large_patch14_dinov2.lvd142m@224")
    p.add_argument("--batch", type=int, default=128, help="images per encoder call")
    p.add_argument("--views", type=int, default=2, help="K")
    p.add_argument("--repeats", type=int, default=50, help="timed encoder calls (after --warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--n-encode", type=int, default=2000, help="corpus images for the end-to-end pass")
    p.add_argument("--n-pipeline", type=int, default=500, help="corpus images for the per-core pipeline pass")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers end to end (-1: sma.py's default)")
    p.add_argument("--corpus", default=str(ROOT / "datasets" / "photo_corpus"))
    p.add_argument("--large-corpus", default=str(ROOT / "datasets" / "photo_corpus_large"))
    p.add_argument("--out", default="", help="write the markdown table here")
    a = p.parse_args()
    if a.workers < 0:
        a.workers = min(8, os.cpu_count() or 1) if a.device.startswith("cuda") else 0
    if not list(Path(a.corpus).glob("*.jpg")):
        sys.exit(f"no JPEGs in {a.corpus}: run python bench/make_photo_corpus.py first")
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else None
    cpu = platform.processor() or platform.machine()
    enc, rates, ratio = encoder_rows(a, a.device)
    images, pipe = pipeline_rows(a, enc)
    e2e = end_to_end(a, enc, images, a.device)
    ours = rates["ours: Encoder.encode (no_grad; bf16 autocast on CUDA, fp32 on CPU)"]
    lines = [f"# Extraction benchmark: `python {' '.join(sys.argv)}`", "",
             f"device: {gpu or f'CPU ({cpu}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'}; "
             f"torch {torch.__version__}; timm {__import__('timm').__version__}; Pillow {Image.__version__}; "
             f"python {platform.python_version()}", "",
             f"### Encoder only: {a.image_encoder}, batch {a.batch} in memory, n = {a.repeats} timed calls after "
             f"{a.warmup} warm-up", "", "| path | img/s (median) |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rates.items()]
    lines += ["", f"ours / the faster plain bf16 baseline: {ratio:.2f}x", "",
              f"### Data pipeline alone (decode + transforms, no encoder): 1 process, 1 thread, "
              f"{len(images)} files of {a.corpus.split('/')[-1]}", "", "| path | images/s per core | views/s per core |",
              "| --- | --- | --- |"]
    for k, v in pipe.items():
        lines.append(f"| {k} | {v:.1f} | {f'{v * a.views:.1f}' if 'K=' in k else '-'} |")
    lines += ["", f"### End to end from the JPEG files: K = {a.views}, {min(a.n_encode, len(images))} files, "
              f"{a.workers} DataLoader workers, batch {a.batch} views", "",
              "| path | views/s | vs encoder only |", "| --- | --- | --- |",
              f"| sma.py Views + encode_all (decode once, {a.views} views, encode) | {e2e:.1f} | {e2e / ours:.2f}x |",
              f"| encoder only (ours, above) | {ours:.1f} | 1.00x |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
