"""Zero-shot classification and retrieval for every aligner sma.py and sotalign.py export (the CLIP-benchmark protocol).

Both papers report "zero-shot classification and retrieval tasks from the CLIP benchmark" (LAION CLIP_benchmark,
PyPI clip-benchmark 1.6.2): SMA (arXiv 2605.12872) and SOTAlign (arXiv 2602.23353). This file re-implements that
protocol (its code was read, not copied; our choices: docs/EVALUATION.md) for frozen-encoder aligners and plain
open_clip models:

    python evaluate.py --aligner runs/sma/aligner.pt --tasks emoji
    python evaluate.py --model ViT-B-32 --pretrained openai --tasks imagenet1k,mscoco --dataset-root DATA
    python evaluate.py --aligner runs/sma/aligner.pt --tasks folder:my_images,csv:my_pairs.csv

Tasks: the 14 of `clip14` (12 classification sets + Flickr30k 1k test + MSCOCO 5k Karpathy test), extra torchvision
classification sets, the shipped example splits (`emoji`), `folder:<path>` and `csv:<path>` (a pairs file).
Each dataset is read from --dataset-root/<name>/ (or --dataset-root with `{dataset}` in it). Every task runs inside
one guard (run_task): whatever is wrong with its data (missing, half-extracted, a damaged file, a class or image count
that differs from the split's; a listed file that is not a regular file; an empty caption, template file or class
name) skips it with one line naming the path, the problem and the fix, never a 0, a hang or a silent score; an
unexpected error (a bug) costs only its task too, with its type and message on the line. The run goes on, the JSON
is rewritten after every task, and --strict makes a skip exit status 2. --output must end in .json; an earlier
results file there is kept as a backup (removed again if this run reproduced it), anything else there is refused
before any compute.
From Python (section "use from Python"): aligner = evaluate.load_aligner("runs/sma/aligner.pt"), then
aligner.encode_image(paths or PIL images) and aligner.encode_text(texts) give L2-normalised (n, d) embeddings.
Writes: one JSON file (--output) {"format": "evaluate/1", "model", "identity" (the aligner's sha256), "complete",
"results": [{"dataset", "task", "model", "metrics" or "skipped"}], "mean", "earlier" (the backup of the file it
replaced, or null)}, and
prints a table and one summary line. Image and text features of the frozen encoders are computed once per
(dataset, encoder spec) and cached under --cache-dir; heads are applied on the cache.
Metrics: acc1, acc5, mean_per_class_recall; i2t_R@1/5/10, t2i_R@1/5/10; modality_gap, matched_cosine.
Measured on: CPU (tests); bench/evaluate_clip_benchmark.py times it against CLIP_benchmark's loop on a GPU.
Needs: plumbing.py beside it (readers, encoders, heads, atomic writes) and data/clip_benchmark/ (class names and
templates, read on first use).
"""
import argparse
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# The readers, encoders, heads and atomic writes evaluate.py shares with the training scripts (plumbing.py).
from plumbing import (LEAK_TASKS, NEAR_COPY_COSINE, DataError, Encoder, arg, atomic_save, check_folder,
                      encoder_identity, head_from_state, keep_freed_memory, load_encoder, loader_workers,
                      near_copies, one_line, parse_dataclass, read_cache, read_pairs, refuse_bad_entries, refuse_leak)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "clip_benchmark"  # CLIP_benchmark's English class names and templates (MIT, see LICENSE)


@cache
def read_clip_benchmark(kind) -> dict:
    """CLIP_benchmark's en_<kind>.json, {task: list}. Read on first use, not at import, so that `import evaluate`
    works wherever the file is copied."""
    path = DATA / f"en_{kind}.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; the CLIP-benchmark tasks need the data/clip_benchmark/ folder beside "
                        "evaluate.py (copy it with evaluate.py)")
    return json.loads(path.read_text())


def cb_classnames() -> dict:
    return read_clip_benchmark("classnames")


def cb_templates() -> dict:
    return read_clip_benchmark("zeroshot_classification_templates")


DEFAULT_TEMPLATES = ["a photo of a {}."]  # folder: tasks without templates.txt


# ---------------------------------------------------------------------------- args
@dataclass
class Args:
    aligner: str = arg("", "aligner checkpoint written by sma.py / sotalign.py (format aligner/1)")
    model: str = arg("", "open_clip model name (e.g. ViT-B-32): evaluate plain CLIP; needs --pretrained")
    pretrained: str = arg("", "open_clip pretrained tag (openai, laion2b_s34b_b79k, ...), a checkpoint path, or "
                              "none (random weights)")
    tasks: str = arg("clip14", "comma list of tasks and aliases: clip14 (the 14), emoji (the example set's held-out "
                               "tasks; emoji_openmoji: the unseen artist; emoji_all: both; emoji_val: validation), "
                               "names such as imagenet1k or mscoco, folder:<path>, csv:<path>")
    dataset_root: str = arg("datasets", "each dataset lives in <root>/<task>/; a root containing {dataset} is "
                                        "formatted instead (CLIP_benchmark's convention)")
    download: bool = arg(False, "let torchvision download the sets it can")
    image_key: str = arg("", "csv: tasks: image column ('' = `filepath` or `image`, whichever the header has)")
    caption_key: str = arg("", "csv: tasks: caption column ('' = `title` or `caption`, whichever the header has)")
    sep: str = arg("", "csv: tasks: column separator ('' = sniffed from the header)")
    skip_bad_rows: bool = arg(False, "csv: tasks, Flickr30k and MSCOCO captions: skip and count bad rows (an empty "
                                     "caption, a row without an image) instead of skipping the task")
    cache_dir: str = arg(".cache", "features are cached in <cache_dir>/eval/ (delete it to recompute)")
    batch_size: int = arg(256, "images (and texts) per encoder call", ge=1)
    workers: int = arg(-1, "DataLoader workers for image decoding (-1: 0 on CPU, min(8, cores) on CUDA)", ge=-1)
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device: cpu | cuda | cuda:N")
    output: str = arg("", "results JSON, a name ending in .json (default <aligner folder>/eval.json; with --model, "
                          "results/eval_<model>_<pretrained>.json under the current folder). It holds this run only: "
                          "an earlier results file there is kept as a backup, <name>.<its date>.json (named in the "
                          "JSON's `earlier`; removed again when this run's rows equal it), never merged (its rows "
                          "came from other args, data or weights). A path holding anything else is refused")
    templates: str = arg("", "templates for folder: tasks: a text file (one template with {} per line, the class "
                             "name's slot) or a CLIP_benchmark key such as imagenet1k (its 80 templates)")
    strict: bool = arg(False, "exit with status 2 (after writing the JSON) if any task was skipped, for scripts that "
                              "must not go on with missing numbers")
    partial: bool = arg(False, "score a set whose image count differs from its split's known size (a subset, a "
                               "half-extracted copy) instead of skipping it: its result is marked `partial` and left "
                               "out of the means")


def parse_args(argv=None) -> Args:
    a, p = parse_dataclass(Args, __doc__.split("\n\n")[0], argv)
    if bool(a.aligner) == bool(a.model):
        p.error("name one model: --aligner PATH, or --model NAME --pretrained TAG")
    if a.model and not a.pretrained:
        p.error("--model needs --pretrained (a tag such as openai, a checkpoint path, or none)")
    return a


# ---------------------------------------------------------------------------- datasets
@dataclass
class Data:
    """What a reader returns."""
    images: object  # a dataset of (PIL image, class index), or a list of image paths (retrieval)
    files: list  # (N,) the image files in order, or the files a binary set is read from (cache key: path, size, mtime)
    classnames: list = None  # (C,) classification
    templates: list = None  # (T,) prompt templates with {} or {c}
    captions: list = None  # (I,) list of captions per image, retrieval
    labels: list = None  # (N,) class index per image, where the reader knows it without decoding (cache key, checks)
    n_found: int = 0  # classes the data itself defines (class folders, label files); 0 = it defines none
    partial: str = ""  # why the result is partial (check_counts with --partial); "" = the whole split
    stats: list = None  # (N,) (size, mtime_ns, ctime_ns) of each of `files`, from check_files (cache key)


class Transformed(torch.utils.data.Dataset):
    """The encoder's clean eval view of `images`: a dataset of (PIL image, label), or a list of image paths
    (label = position). Readers build datasets without a transform, so a cached run loads no encoder."""

    def __init__(self, images, transform, files=()):
        self.images, self.transform = images, transform
        self.files = files if len(files) == len(images) else ()  # (N,) the image paths, to name a bad one

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            item = self.images[i]  # a torchvision dataset opens and decodes its file here
            if isinstance(item, str):
                with Image.open(item) as im:
                    return self.transform(im), i  # the encoder's transform converts to RGB first
            image, label = item
            return self.transform(image), label
        except Exception as e:  # missing, cut short, not an image: any error decoding the data skips its task
            where = self.files[i] if self.files else f"image {i} of {len(self)}"
            raise DataError(f"{where}: cannot read the image ({type(e).__name__}: {one_line(e)}); replace the file "
                            "or extract the set again") from None


def brief(e) -> str:
    """An error's first sentence, on one line, at most 300 characters: a library's advice after it is not ours."""
    return one_line(e)[:300].split(". ")[0]


def listed_items(ds, root) -> tuple:
    """(files, labels) of a torchvision dataset from the lists it keeps, without decoding an image: ImageFolder's
    `samples`, the file-based sets' image paths and `_labels`. A binary set (CIFAR, STL-10, MNIST, PCam) keeps no
    paths: its files are every file under `root`. labels: None where the dataset keeps none (PCam)."""
    pairs = getattr(ds, "samples", None) or getattr(ds, "_samples", None)  # [(path, label)]
    if pairs:
        return [str(p) for p, _ in pairs], [int(y) for _, y in pairs]
    files = next((v for v in (getattr(ds, a, None) for a in ("_image_files", "_images")) if v is not None), [])
    labels = next((v for v in (getattr(ds, a, None) for a in ("_labels", "targets", "labels")) if v is not None), None)
    if len(files) != len(ds):
        files = sorted(str(p) for p in Path(root).rglob("*") if p.is_file())
    if labels is not None and len(labels) == len(ds):
        labels = [int(y) for y in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    else:
        labels = None
    return [str(f) for f in files], labels


def not_regular(path) -> str:
    """"" if `path` is a regular file (or a symlink to one), else what it is instead. A FIFO or a device named .jpg
    would block the first read forever; a dangling symlink fails in os.stat."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"a dangling symlink ({e.strerror})" if os.path.islink(path) else f"missing ({e.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kind = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
            stat.S_IFBLK: "a device"}.get(stat.S_IFMT(mode), "not a regular file")
    return f"{kind}, not a regular file"


def special_file(folder):
    """The first FIFO, socket or device below `folder` (a symlink to one too), or None: a reader that opens one (an
    image, a split or label file, torchvision's md5 check) blocks forever. Names and types only (scandir's d_type;
    a stat for symlinks alone). Symlinked folders are not entered: the files listed from them get check_files."""
    folders = [folder]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.path)
                elif not e.is_file() and (not e.is_symlink() or os.path.exists(e.path)):  # dangling: check_files
                    return e.path
    return None


def check_files(paths, fix) -> list:
    """One stat per listed file, before any is read: DataError naming the first that is not a regular file (missing,
    a dangling symlink, a FIFO, a folder) and how many are not. -> [(size, mtime_ns, ctime_ns)] per file, for the
    cache key."""
    stats, bad = [], []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            if stat.S_ISREG(st.st_mode):
                continue
        except OSError:
            pass
        bad.append(p)
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} listed images cannot be read, e.g. {bad[0]}: {not_regular(bad[0])}"
                        f"; {fix}")
    return stats


def read_text(path) -> str:
    """A small text file the readers parse, checked to be a regular file first (a FIFO would block read_text)."""
    if problem := not_regular(path):
        raise DataError(f"{path}: {problem}, where a text file belongs; put the file itself there")
    return Path(path).read_text(encoding="utf-8")


def skipped_rows(path, bad):
    """--skip-bad-rows: the one line that says what was dropped."""
    if bad:
        print(f"{path}: skipped {len(bad)} bad rows (--skip-bad-rows): {'; '.join(bad[:5])}")


def check_class_folders(folder: Path, expected: list, fix: str):
    """The class folders of `folder` (ImageFolder's classes: its sorted sub-folders, hidden ones too) against the
    names the labels must follow, in order: a folder missing or a stray one would shift every later label."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if found == expected:
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    fixes = ", and ".join(([f"remove {', '.join(str(folder / e) for e in extra[:3])} (not a class folder"
                            + ("; a hidden folder, e.g. Jupyter's" if all(e.startswith(".") for e in extra) else "")
                            + ")"] if extra else []) + ([fix] if missing else []))
    raise DataError(f"{folder}: {len(found)} class folders for the {len(expected)} expected (missing "
                    f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}); labels would shift. "
                    + fixes[0].upper() + fixes[1:])


def check_not_hidden(files, root):
    """ImageFolder lists every image file below a class folder, hidden ones too: macOS's ._x.jpg (not an image) and
    Jupyter's .ipynb_checkpoints/ copies (one image counted twice). Refused, naming the first."""
    for f in files:
        if os.sep + "." in f[len(str(root)):]:
            raise DataError(f"{f}: a hidden file, or in a hidden folder (macOS's ._ files, Jupyter's "
                            ".ipynb_checkpoints), not part of the set; remove it")


def read_templates(path, fix) -> list:
    """Prompt templates, one per line, each with the class name's slot {} (or CLIP_benchmark's {c}). DataError on an
    empty file, or a line without the slot (every class would get the same prompt), naming the file and line."""
    out = []
    for row, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip() and "{}" not in line and "{c}" not in line:
            raise DataError(f"{path}, line {row}: template {line.strip()!r} has no {{}} for the class name, so every "
                            "class would get the same prompt; write it as e.g. 'a photo of a {}.'")
        out += [line.strip()] if line.strip() else []
    if not out:
        raise DataError(f"{path}: no templates (an empty file); write one template with {{}} per line, e.g. "
                        f"'a photo of a {{}}.', {fix}")
    return out


def check_names(names, sources, where):
    """Class names a user wrote (folder names, classnames.txt, classes.csv): non-empty and distinct. Two classes
    with one name get one class vector, and the tie rule gives every image of both to the first."""
    seen = {}
    for i, n in enumerate(names):
        if not n.strip():
            raise DataError(f"{where}: {sources[i]} has an empty class name; name it")
        if n in seen:
            raise DataError(f"{where}: {sources[seen[n]]} and {sources[i]} are both named {n!r}, so the second could "
                            "never be predicted; rename one")
        seen[n] = i


def torchvision_set(name, download=True, cb_names=False, fix=None, **kwargs):
    """A torchvision dataset read as CLIP_benchmark reads it: its class names from CLIP_benchmark's table where
    CLIP_benchmark overrides them (cb_names), else torchvision's `.classes` (through `fix`). download: torchvision
    can download it (StanfordCars cannot: its download() raises even when the files are there)."""
    def read(root, args, task):
        import torchvision.datasets as tvd
        ds = getattr(tvd, name)(str(root), download=args.download and download, **kwargs)
        names = cb_classnames()[task] if cb_names else [fix(c) if fix else c for c in ds.classes]
        files, labels = listed_items(ds, root)
        return Data(ds, files, names, cb_templates()[task], labels=labels, n_found=len(getattr(ds, "classes", ())))
    return read


def read_imagenet(root, args, task):
    import torchvision.datasets as tvd
    # parses the devkit once into meta.bin (no download exists); allow_empty: an empty class folder stays a class
    failed = None
    try:
        ds = tvd.ImageNet(str(root), split="val", allow_empty=True)
    except Exception as e:  # a stray folder in val/ (.ipynb_checkpoints) is a KeyError in torchvision: named below
        failed = e
    # torchvision's labels are positions among the class folders found in val/: one folder missing would shift
    # every later label. The devkit's wnids, sorted, are the 1,000 positions OpenAI's class names follow.
    if (root / "meta.bin").is_file() and (root / "val").is_dir():
        check_class_folders(root / "val", sorted(tvd.imagenet.load_meta_file(str(root))[0]),
                            "delete val/ and keep ILSVRC2012_img_val.tar beside the devkit: torchvision sorts it again")
    if failed:
        raise failed
    files, labels = listed_items(ds, root)
    check_not_hidden(files, root)
    return Data(ds, files, cb_classnames()["imagenet1k"], cb_templates()["imagenet1k"], labels=labels,
                n_found=len(ds.wnids))


def read_caltech101(root, args, task):
    # CLIP_benchmark keeps the BACKGROUND_Google class (102 classes, its own names); torchvision's Caltech101
    # drops it, so we only use torchvision to download and read the folders with ImageFolder (*.jpg, as it does).
    import torchvision.datasets as tvd
    if args.download:
        tvd.Caltech101(str(root), download=True)
    # allow_empty: an empty class folder stays a class, so that the image count (not a shifted label) says so.
    # Labels are positions among the folders found: they must be the 102 CLIP_benchmark's names follow, in order.
    folder = root / "caltech101" / "101_ObjectCategories"
    if folder.is_dir():
        check_class_folders(folder, CALTECH101_FOLDERS, "put back the missing folders (extract "
                            "101_ObjectCategories.tar.gz again, or delete caltech101/ and pass --download)")
    ds = tvd.ImageFolder(str(folder), is_valid_file=lambda p: p.endswith(".jpg"), allow_empty=True)
    files, labels = listed_items(ds, root)
    check_not_hidden(files, root)
    return Data(ds, files, cb_classnames()["caltech101"], cb_templates()["caltech101"], labels=labels,
                n_found=len(ds.classes))


# The 102 folders of caltech101/101_ObjectCategories in ImageFolder's (sorted) order: CLIP_benchmark's names follow it.
CALTECH101_FOLDERS = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", *"""
    accordion airplanes anchor ant barrel bass beaver binocular bonsai brain brontosaurus buddha butterfly camera
    cannon car_side ceiling_fan cellphone chair chandelier cougar_body cougar_face crab crayfish crocodile
    crocodile_head cup dalmatian dollar_bill dolphin dragonfly electric_guitar elephant emu euphonium ewer ferry
    flamingo flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone hedgehog helicopter ibis
    inline_skate joshua_tree kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly menorah metronome
    minaret nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid revolver rhino rooster saxophone
    schooner scissors scorpion sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry
    sunflower tick trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench yin_yang""".split()]


def read_flickr30k(root, args, task):
    # Karpathy test split as CLIP_benchmark ships it: header line, then `<image>.jpg,<caption>` (captions hold commas)
    path, captions, bad = root / "flickr30k_test_karpathy.txt", {}, []
    for row, line in enumerate(read_text(path).splitlines()[1:], start=2):
        image, sep, caption = line.strip().partition(".jpg,")
        if line.strip() and not (sep and caption.strip()):  # an empty caption would be scored as a caption
            bad.append(f"row {row}: " + ("empty caption" if sep else "not `<image>.jpg,<caption>`"))
        elif sep:
            captions.setdefault(image + ".jpg", []).append(caption)
    refuse_bad_entries(bad, args.skip_bad_rows, f"{path}, ", "Fix the row (or download the file again)", "bad rows",
                       more="more bad rows")
    skipped_rows(path, bad)
    paths = [str(root / image) for image in captions]
    return Data(paths, paths, captions=list(captions.values()))


def read_mscoco(root, args, task):
    # Karpathy 5k test in COCO annotation format; images in order of id (as torchvision's CocoCaptions), and all
    # captions kept (some images have 6-7), as CLIP_benchmark. deviation: parsed with json, no pycocotools needed.
    path = root / "coco_test_karpathy.json"
    ann = json.loads(read_text(path))
    if isinstance(ann, dict) and "annotations" not in ann and ann.get("dataset") == "coco":
        raise DataError(f"{path}: this is Karpathy's dataset_coco.json (all splits, 5 captions per image, its own "
                        "format), not CLIP_benchmark's Karpathy test file (COCO format, 25,010 captions); download "
                        "coco_test_karpathy.json from github.com/mehdidc/retrieval_annotations/releases/tag/1.0.0")
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    captions, bad = {i: [] for i in sorted(files)}, []
    for k, a in enumerate(ann["annotations"]):
        c = a.get("caption") if isinstance(a, dict) else None
        where = f"annotation {k}" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict) or a.get("image_id") not in captions:
            bad.append(f"{where}: image_id {a.get('image_id') if isinstance(a, dict) else None!r} is not in `images`")
        elif not isinstance(c, str) or not c.strip():  # null, a number, "": never a caption to score
            bad.append(f"{where}: caption {c!r}, not a non-empty string")
        else:
            captions[a["image_id"]].append(c)
    refuse_bad_entries(bad, args.skip_bad_rows, f"{path}, ", "Fix it (or download the file again)", "bad rows",
                       more="more bad rows")
    skipped_rows(path, bad)
    if args.skip_bad_rows:  # an image whose every caption was dropped would be scored as a miss: dropped too
        captions = {i: c for i, c in captions.items() if c}
    paths = [str(root / "val2014" / files[i]) for i in captions]
    return Data(paths, paths, captions=list(captions.values()))


def read_lines(path):
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_folder(root, args, task):
    """An image-folder classification set: <root>/<class>/<image>; optional classnames.txt (one name per line, in
    sorted folder order) and templates.txt (one template with {} per line). --templates overrides templates.txt."""
    import torchvision.datasets as tvd
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {root}")
    hidden = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name.startswith("."))
    if hidden:  # ImageFolder would make .ipynb_checkpoints a class, with copies of images in it
        raise DataError(f"{root / hidden[0]}: a hidden folder, not a class; remove it (or move the images out of it)")
    ds = tvd.ImageFolder(str(root), allow_empty=True)  # a class folder with no images stays a class
    names, sources = [c.replace("_", " ") for c in ds.classes], [f"class folder {c!r}" for c in ds.classes]
    if (root / "classnames.txt").exists():
        names = read_lines(root / "classnames.txt")
        sources = [f"classnames.txt line {i + 1} ({c!r})" for i, c in enumerate(ds.classes)]
        if len(names) != len(ds.classes):
            raise DataError(f"{root / 'classnames.txt'}: {len(names)} names for {len(ds.classes)} class folders")
    check_names(names, sources, root)
    templates = DEFAULT_TEMPLATES
    if args.templates:
        if args.templates not in cb_templates() and not os.path.isfile(args.templates):
            raise DataError(f"--templates {args.templates}: neither a file nor a CLIP_benchmark key "
                            f"({', '.join(cb_templates())})")
        templates = (cb_templates()[args.templates] if args.templates in cb_templates() else
                     read_templates(args.templates, "or pass --templates imagenet1k"))
    elif (root / "templates.txt").exists():
        templates = read_templates(root / "templates.txt", f"or delete it to use {DEFAULT_TEMPLATES[0]!r}")
    files, labels = listed_items(ds, root)
    check_not_hidden(files, root)
    return Data(ds, files, names, templates, labels=labels, n_found=len(ds.classes))


def read_csv(root, args, task):
    """A retrieval set in the pairs format (read_pairs: rows sharing an image form one entity)."""
    pairs = read_pairs(root, args.image_key or None, args.caption_key or None, args.sep or None, args.skip_bad_rows)
    skipped_rows(root, pairs.skipped)
    return Data(pairs.images, pairs.images, captions=pairs.captions)


class Labelled(torch.utils.data.Dataset):
    """(PIL image, class index) per row of an image,class list; `.classes` the class keys in label order."""

    def __init__(self, paths, labels, classes):
        self.paths, self.labels, self.classes = paths, labels, classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), self.labels[i]


def read_classes_csv(root, args, task):
    """A classification set as a list: <root> a CSV `image,class` (paths relative to its folder), with classes.csv
    (`class,name`: every class key and the name its prompts use, in label order) and templates.txt beside it. The
    shipped emoji tasks use it: one image may be drawn by several artists, and no image is copied into folders."""
    folder = root.parent
    classes = [(r["class"], r["name"]) for r in csv.DictReader(io.StringIO(read_text(folder / "classes.csv")))]
    check_names([n or "" for _, n in classes], [f"class {c!r}" for c, _ in classes], folder / "classes.csv")
    index = {c: i for i, (c, _) in enumerate(classes)}
    paths, labels = [], []
    for row, r in enumerate(csv.DictReader(io.StringIO(read_text(root))), start=2):
        if r.get("class") not in index:
            raise DataError(f"{root}: row {row}: class {r.get('class')!r} is not in {folder / 'classes.csv'}; "
                            "add it there or fix the row")
        paths.append(str(folder / r["image"]))
        labels.append(index[r["class"]])
    ds = Labelled(paths, labels, [c for c, _ in classes])
    return Data(ds, paths, [n for _, n in classes], read_templates(folder / "templates.txt", "or make the set again"))


# ---------------------------------------------------------------------------- task table
@dataclass
class Task:
    kind: str  # "zeroshot_classification" | "zeroshot_retrieval"
    read: Callable  # (root: Path, args, task name) -> Data
    layout: str  # what the task's folder must hold (printed when it is missing)
    split: str  # which images are scored
    path: str = ""  # fixed location (example and user tasks); else <dataset-root>/<name>
    download: bool = False  # torchvision can download it (--download)
    n_images: int = 0  # the split's known size (check_counts); 0 = any (example and user tasks)
    n_classes: int = 0  # the number of class names it is scored with; 0 = any
    n_texts: int = 0  # retrieval: the split's caption count; 0 = any


CLS, RET = "zeroshot_classification", "zeroshot_retrieval"


def tv(name, layout, scored, n_images, n_classes, download=True, cb_names=False, fix=None, **kwargs) -> Task:
    """A torchvision classification set (see torchvision_set) of a known size; kwargs go to the torchvision class."""
    return Task(CLS, torchvision_set(name, download, cb_names, fix, **kwargs), layout, scored, download=download,
                n_images=n_images, n_classes=n_classes)


FILE_READERS = (read_csv, read_classes_csv)  # readers whose task root is a file, not a folder


def emoji_tasks() -> dict:
    """The 8 tasks of examples/emoji: zero-shot by subgroup and retrieval, on the held-out (`emoji_*`) and the
    validation (`emoji_val_*`) entities, by the training artists or by OpenMoji (`*_openmoji`)."""
    root, made, out = HERE / "examples" / "emoji", "examples/make_emoji.py's output", {}
    for split, prefix in (("heldout", "emoji"), ("val", "emoji_val")):
        for artist, suffix, whose in (("", "", "noto, twemoji, fluent"), ("_openmoji", "_openmoji", "openmoji")):
            out[f"{prefix}_zeroshot{suffix}"] = Task(
                CLS, read_classes_csv, made, f"zeroshot/{split}{artist}.csv, every depiction by {whose}",
                path=str(root / "zeroshot" / f"{split}{artist}.csv"))
            out[f"{prefix}_retrieval{suffix}"] = Task(
                RET, read_csv, made,
                f"{split}{artist}.csv, one depiction per entity (by one of {whose}), its descriptions",
                path=str(root / f"{split}{artist}.csv"))
    return out


def no_sep(c):  # food101: class folder names with underscores
    return c.replace("_", " ")


TASKS = {
    "imagenet1k": Task(CLS, read_imagenet, "ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_val.tar (from "
                       "image-net.org; torchvision unpacks them on first use; needs scipy)", "val, 50,000",
                       n_images=50_000, n_classes=1000),
    "cifar10": tv("CIFAR10", "cifar-10-batches-py/", "test, 10,000", 10_000, 10, train=False),
    "cifar100": tv("CIFAR100", "cifar-100-python/", "test, 10,000", 10_000, 100, train=False),
    "stl10": tv("STL10", "stl10_binary/", "test, 8,000", 8_000, 10, split="test"),
    "food101": tv("Food101", "food-101/ (images/, meta/)", "test, 25,250", 25_250, 101, fix=no_sep, split="test"),
    "caltech101": Task(CLS, read_caltech101, "caltech101/101_ObjectCategories/<class>/*.jpg",
                       "whole dataset incl. BACKGROUND_Google, 9,144 (no split, as CLIP_benchmark)", download=True,
                       n_images=9_144, n_classes=102),
    "pets": tv("OxfordIIITPet", "oxford-iiit-pet/ (images/, annotations/)", "test, 3,669", 3_669, 37, split="test"),
    "flowers": tv("Flowers102", "flowers-102/ (jpg/, imagelabels.mat, setid.mat; needs scipy)", "test, 6,149", 6_149,
                  102, cb_names=True, split="test"),
    # torchvision's DTD reads <its root>/dtd/dtd/: the tarball dtd-r1.0.1.tar.gz unpacks to one dtd/ folder, so it is
    # extracted into <dataset-root>/dtd/dtd/, giving <dataset-root>/dtd/dtd/dtd/images
    "dtd": tv("DTD", "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/test1.txt (extract dtd-r1.0.1.tar.gz into "
              "the dtd/ folder inside it)", "test (partition 1), 1,880", 1_880, 47, split="test"),
    "fgvc_aircraft": tv("FGVCAircraft", "fgvc-aircraft-2013b/data/", "test, 3,333, 100 variants", 3_333, 100,
                        split="test", annotation_level="variant"),
    "cars": tv("StanfordCars", "stanford_cars/ with devkit/, cars_test/, cars_test_annos_withlabels.mat (needs "
               "scipy; torchvision's download link is dead)", "test, 8,041", 8_041, 196, download=False,
               split="test"),
    "sun397": tv("SUN397", "SUN397/ (ClassName.txt, <letter>/<class>/sun_*.jpg)",
                 "whole dataset, 108,754 (no split, as CLIP_benchmark)", 108_754, 397,
                 fix=lambda c: c.replace("_", " ").replace("/", " ")),
    "flickr30k": Task(RET, read_flickr30k, "the Flickr30k images (*.jpg) and flickr30k_test_karpathy.txt (from "
                      "github.com/mehdidc/retrieval_annotations/releases/tag/1.0.0)",
                      "Karpathy test, 1,000 images, 5,000 captions", n_images=1_000, n_texts=5_000),
    "mscoco_captions": Task(RET, read_mscoco, "val2014/*.jpg (images.cocodataset.org/zips/val2014.zip) and "
                            "coco_test_karpathy.json (github.com/mehdidc/retrieval_annotations/releases/tag/1.0.0)",
                            "Karpathy test, 5,000 images, all 25,010 captions", n_images=5_000, n_texts=25_010),
    # more CLIP_benchmark classification sets that torchvision reads
    "eurosat": tv("EuroSAT", "eurosat/2750/", "whole dataset, 27,000 (no split, as CLIP_benchmark)", 27_000, 10,
                  cb_names=True),
    "gtsrb": tv("GTSRB", "gtsrb/", "test, 12,630", 12_630, 43, cb_names=True, split="test"),
    "country211": tv("Country211", "country211/", "test, 21,100", 21_100, 211, cb_names=True, split="test"),
    "pcam": tv("PCAM", "pcam/*.h5 (needs h5py)", "test, 32,768", 32_768, 2, cb_names=True, split="test"),
    "mnist": tv("MNIST", "MNIST/raw/", "test, 10,000", 10_000, 10, cb_names=True, train=False),
    "renderedsst2": tv("RenderedSST2", "rendered-sst2/", "test, 1,821", 1_821, 2, split="test"),
    # the shipped example set (examples/emoji, see its README): held-out entities drawn by the training artists,
    # the same entities drawn by OpenMoji (an artist in no training file), and both again on the validation entities
    **emoji_tasks(),
}
CLIP14 = ["imagenet1k", "cifar10", "cifar100", "stl10", "food101", "caltech101", "pets", "flowers", "dtd",
          "fgvc_aircraft", "cars", "sun397", "flickr30k", "mscoco_captions"]
ALIASES = {"clip14": CLIP14, "emoji": ["emoji_zeroshot", "emoji_retrieval"],
           "emoji_openmoji": ["emoji_zeroshot_openmoji", "emoji_retrieval_openmoji"],
           "emoji_all": ["emoji_zeroshot", "emoji_retrieval", "emoji_zeroshot_openmoji", "emoji_retrieval_openmoji"],
           "emoji_val": ["emoji_val_zeroshot", "emoji_val_retrieval", "emoji_val_zeroshot_openmoji",
                         "emoji_val_retrieval_openmoji"], "mscoco": ["mscoco_captions"],
           "coco": ["mscoco_captions"], "flickr": ["flickr30k"], "flowers102": ["flowers"],
           "aircraft": ["fgvc_aircraft"], "imagenet": ["imagenet1k"]}


def resolve_tasks(spec: str) -> dict:
    """--tasks -> {name: Task}, aliases expanded, order kept, duplicates dropped."""
    out = {}
    for name in (t.strip() for t in spec.split(",")):
        if name in ALIASES:
            out.update({n: TASKS[n] for n in ALIASES[name]})
        elif name in TASKS:
            out[name] = TASKS[name]
        elif name.startswith("folder:"):
            out[name] = Task(CLS, read_folder, "<class>/<image> folders (+ optional classnames.txt, templates.txt)",
                             "all images", path=name[len("folder:"):])
        elif name.startswith("csv:") or name.endswith((".csv", ".tsv")):
            out[name] = Task(RET, read_csv, "a pairs file (image,caption)", "all entities",
                             path=name[4:] if name.startswith("csv:") else name)
        elif name:
            raise DataError(f"--tasks: unknown task {name!r}; known: {', '.join([*ALIASES, *TASKS])}, folder:<path>, "
                            "csv:<path>")
    return out


def task_root(name, task, args) -> Path:
    if task.path:
        return Path(task.path)
    root = args.dataset_root
    return Path(root.format(dataset=name) if "{dataset}" in root else os.path.join(root, name))


def open_task(name, task, args) -> Data:
    """The task's data, read and checked (check_counts). Every problem with it is a DataError that names the path,
    what is wrong and the fix: missing, a file where a folder belongs, or any exception the reader raises (torchvision
    raises RuntimeError, ValueError, OSError, KeyError, ...; a failed --download too, whose empty folders are
    removed). A FIFO, socket or device in the task's folder is refused before the reader runs (it would block).
    Then check_data, the one boundary every task's data passes before it is used. Image files are decoded later, in
    Transformed, which turns their errors into DataError as well."""
    root = task_root(name, task, args)
    download = args.download and task.download
    fix = f"put {task.layout} in {root}" + (", or pass --download" if task.download and not args.download else "")
    if not root.exists() and not download:
        found = next(p for p in root.absolute().parents if p.exists())
        where = f" ({found} is a file)" if found.is_file() else ""
        raise DataError(f"{root} does not exist{where}; {fix}")
    if root.is_file() and task.read not in FILE_READERS:
        raise DataError(f"{root} is a file, not a folder; {fix}")
    new = [p for p in (root.absolute(), *root.absolute().parents) if not p.exists()]  # what a download creates
    try:
        if root.is_dir() and (odd := special_file(root)):  # before any reader opens a file
            raise DataError(f"{odd}: {not_regular(odd)}, inside the set: reading it would block; remove it")
        data = task.read(root, args, name)
    except DataError:
        raise
    except Exception as e:  # the reader's error, whatever its type, is about this task's data
        for folder in new:  # --download without a network leaves empty folders: remove those, never a file
            remove_empty_folders(folder)
        what = "the download failed" if download else "cannot read it"
        if (hidden := hidden_folder(root)) and hidden.name in str(e):  # SUN397 reads .ipynb_checkpoints/: a KeyError
            fix = f"remove {hidden} (a hidden folder, e.g. Jupyter's, not part of the set)"
        raise DataError(f"{root}: {what} ({type(e).__name__}: {one_line(e)}); {fix}") from None
    check_data(task, data, root, fix)
    data.partial = check_counts(name, task, data, root, args.partial)
    return data


def check_data(task, data: Data, root, fix):
    """What every reader's output must be before it is used: images to score (also with --partial), each listed
    file a regular file (check_files: one stat each, kept for the cache key), templates with their slot, and for
    retrieval a non-empty caption list of non-empty strings per image. Each failure is a DataError naming the
    task's path, the item and the fix."""
    if not len(data.images):
        raise DataError(f"{root}: no images found (every class folder or list is empty); {fix}")
    data.stats = check_files(data.files, "replace it, or remove it from the set's folders or lists")
    if task.kind == CLS:
        bad = [t for t in data.templates if not isinstance(t, str) or ("{}" not in t and "{c}" not in t)]
        if not data.templates or bad:
            raise DataError(f"{root}: template {bad[0]!r} has no {{}} slot for the class name" if bad else
                            f"{root}: no templates; write one template with {{}} per line in templates.txt")
    else:
        for i, caps in enumerate(data.captions):
            if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise DataError(f"{root}: image {data.files[i]} has " + (
                    f"an empty caption ({caps!r})" if caps else "no caption") + "; fix its rows")


def hidden_folder(root: Path):
    """The first hidden folder below `root`, or None. Looked for only after a reader failed (a walk of the set), and
    named only when the reader's error names it."""
    for sub, dirs, _ in os.walk(root):
        if hidden := next((d for d in sorted(dirs) if d.startswith(".")), None):
            return Path(sub) / hidden
    return None


def remove_empty_folders(folder: Path):
    """Remove `folder` if it holds nothing but empty folders."""
    if folder.is_dir():
        for sub, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):  # deepest first
            if not os.listdir(sub):
                os.rmdir(sub)


def check_counts(name, task, data: Data, root, partial=False) -> str:
    """What was read against what the task should be. A class count that differs from the names it is scored with
    (labels would pair images with the wrong names) is a DataError. An image or caption count that differs from
    the split's known size is a DataError too, or with --partial the reason the result is marked partial."""
    if task.kind == CLS:
        C = len(data.classnames)
        if task.n_classes and C != task.n_classes:  # names from the data (CLIP_benchmark's lists have the count)
            raise DataError(f"{root}: the data defines {C} classes, {name} has {task.n_classes} (a class folder, or "
                            "lines of a split or label file, missing), so labels would point at the wrong names; "
                            f"put back the complete set ({task.layout})")
        if data.n_found and data.n_found != C:
            raise DataError(f"{root}: the data defines {data.n_found} classes (class folders or label files), "
                            f"scored with {C} names, so labels would point at the wrong names; put back the "
                            f"missing classes ({task.layout})")
        if data.labels and not 0 <= min(data.labels) <= max(data.labels) < C:
            raise DataError(f"{root}: labels range over [{min(data.labels)}, {max(data.labels)}], outside the {C} "
                            f"classes; {task.layout} is damaged")
    n = len(data.images)
    found = [f"{n:,} images" if task.n_images and n != task.n_images else ""]
    if task.kind == RET:
        n_texts = sum(map(len, data.captions))
        found.append(f"{n_texts:,} captions" if task.n_texts and n_texts != task.n_texts else "")
    found = " and ".join(filter(None, found))
    if not found:
        return ""
    reason = f"read {found}, the split ({task.split}) has {task.n_images:,} images"
    if task.kind == RET and task.n_texts:
        reason += f" and {task.n_texts:,} captions"
    if partial:
        return reason
    raise DataError(f"{root}: {reason}; complete the set ({task.layout}), or pass --partial to score what is there "
                    "(marked partial, left out of the means)")


def read_task(name, task, args):
    """(Data, None), or (None, the one-line reason it cannot be evaluated): open_task for callers that go on."""
    try:
        return open_task(name, task, args), None
    except DataError as e:
        return None, f"{name}: {one_line(e)}"


def check_training_images(spec, dataset_root, images, texts=()):
    """Before a training run with --eval `spec`: DataError on an unknown task, or when the training `images` hold
    images of a requested evaluation split, or the training `texts` (sotalign's --unpaired-texts) its captions
    (plumbing.refuse_leak; a partial copy of a split leaks too). A split that is not there is not checked:
    evaluate.py will skip it."""
    tasks = resolve_tasks(spec)
    where = Args(dataset_root=dataset_root, partial=True)
    for name in LEAK_TASKS.keys() & tasks.keys():
        data, _ = read_task(name, tasks[name], where)
        if data is not None:
            refuse_leak(images, name, data.files, task_root(name, tasks[name], where) / LEAK_TASKS[name], texts,
                        [c for caps in data.captions or () for c in caps])


def check_near_copies(spec, dataset_root, cache_dir, image_encoder, training, device="cpu",
                      threshold=NEAR_COPY_COSINE):
    """After a training run's extraction, before its training, with --eval `spec`: DataError when a training image's
    frozen features lie within `threshold` cosine of a requested evaluation split's image (plumbing.near_copies): a
    copy re-encoded or resized, whose bytes check_training_images cannot match. The split's features are this
    module's, cached (the --eval run after training reads them back). training: [(features, images)], one pair per
    training set, the features' rows those images'; each split is read once for all of them."""
    tasks = resolve_tasks(spec)
    args = Args(dataset_root=dataset_root, partial=True, cache_dir=cache_dir, device=str(device))
    model = Model("near-copy check", {"image": image_encoder, "text": ""}, {}, str(device))
    splits = []
    for name in sorted(LEAK_TASKS.keys() & tasks.keys()):
        data, _ = read_task(name, tasks[name], args)
        if data is not None:
            splits.append((name, data, image_features(model, name, tasks[name], data, args)["features"]))
    for train_features, train_images in training:
        for name, data, test_features in splits:
            found = near_copies(train_features, test_features, threshold)
            if found:
                row, test, cos = max(found, key=lambda f: f[2])
                raise DataError(f"{len(found)} of the {len(train_images)} training images are near copies of "
                                f"{name} test images (frozen-feature cosine >= {threshold}; e.g. "
                                f"{train_images[row]} ~ {data.files[test]}, {cos:.3f}): re-encoded or resized, the "
                                "evaluation would score images the heads were trained on. Remove them from the "
                                "training data (or --exclude them by their file names); if they are distinct "
                                "pictures, raise --near-copy-cosine")


# ---------------------------------------------------------------------------- embedding and caching
@dataclass
class Model:
    """What is evaluated: an encoder spec and a head per modality (identity heads for a plain open_clip model).
    Encoders load on first use, so a run whose features are all cached loads none."""
    name: str
    specs: dict  # {"image": spec, "text": spec}
    heads: dict  # {"image": nn.Module, "text": nn.Module}
    device: str
    info: dict = field(default_factory=dict)  # the aligner checkpoint less its heads (method, args, metrics), "dim"
    encoders: dict = field(default_factory=dict)
    identity: str = ""  # what the results are of (in the JSON): the aligner file's sha256, or the open_clip spec
    failed: dict = field(default_factory=dict)  # {spec: why it cannot be loaded}: later tasks skip without retrying

    def encoder(self, modality) -> Encoder:
        """The frozen encoder, loaded on first use. One that cannot be loaded (weights neither here nor downloadable,
        an unknown model) is a DataError: the task that needs it skips with one line, as for a missing dataset."""
        spec = self.specs[modality]
        if modality not in self.encoders and spec not in self.failed:
            logging.disable(logging.ERROR)  # open_clip logs a failed download before raising it: said once, below
            try:
                self.encoders[modality] = load_encoder(spec, modality, self.device)
            except Exception as e:  # open_clip, timm and the hub raise many types, chained: one line here
                cause = e.__cause__ or e
                self.failed[spec] = (one_line(e) if isinstance(e, DataError) else
                                     f"cannot load the {modality} encoder {spec!r} ({type(cause).__name__}: "
                                     f"{brief(cause)}); " + (
                                         "its weights are not on this machine and cannot be downloaded from here: "
                                         "run once where the Hugging Face hub is reachable (they are cached), or pass "
                                         "--pretrained a checkpoint file" if spec.startswith("openclip:") else
                                         "check the encoder spec and that its weights can be read or downloaded"))
            finally:
                logging.disable(logging.NOTSET)
        if spec in self.failed:
            raise DataError(self.failed[spec])
        return self.encoders[modality]


def load_model(args) -> Model:
    if args.model:
        pretrained = "" if args.pretrained.lower() == "none" else args.pretrained  # "" = random weights
        spec = f"openclip:{args.model}:{pretrained}"
        return Model(f"{args.model}/{args.pretrained}", {"image": spec, "text": spec},
                     {"image": nn.Identity(), "text": nn.Identity()}, args.device, {"method": "open_clip"},
                     identity=spec)
    try:
        if problem := not_regular(args.aligner):
            raise OSError(problem)
        raw = Path(args.aligner).read_bytes()
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, cut short, or not a torch file
        raise DataError(f"--aligner {args.aligner}: cannot read it ({type(e).__name__}: {brief(e)}); pass the "
                        "aligner.pt that sma.py / sotalign.py export") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "aligner/1":
        raise DataError(f"--aligner {args.aligner}: not an aligner checkpoint (format aligner/1); pass the aligner.pt "
                        "that sma.py / sotalign.py export, not checkpoint.pt")
    try:
        heads = {m: head_from_state(ckpt[f"{m}_head"]).to(args.device) for m in ("image", "text")}
        info = {k: v for k, v in ckpt.items() if not k.endswith("_head")} | {"dim": ckpt["image_head"]["out_dim"]}
        specs = {m: str(ckpt[f"{m}_encoder"]) for m in ("image", "text")}
    except Exception as e:  # a damaged or hand-edited export
        raise DataError(f"--aligner {args.aligner}: an incomplete aligner checkpoint ({type(e).__name__}: "
                        f"{brief(e)}); export it again with sma.py / sotalign.py") from None
    return Model(f"{ckpt.get('method', 'aligner')}:{args.aligner}", specs, heads, args.device, info,
                 identity="sha256:" + hashlib.sha256(raw).hexdigest()[:16])


def slug(text):
    return re.sub(r"[^\w.-]+", "_", text)[-60:]


def fingerprint(parts, files=(), stats=None) -> str:
    """Cache key: the JSON of `parts`, plus path, size, mtime and ctime of every file (a regenerated image misses, and
    so does a same-size replacement that kept its mtime: the ctime, as plumbing.file_identity). stats: (size,
    mtime_ns, ctime_ns) per file where the caller has them (check_files), else each file is stat'ed here."""
    h = hashlib.sha1(json.dumps(parts).encode())
    for f, st in zip(files, stats or map(file_stat, files)):
        h.update(f"{f}|{st[0]}|{st[1]}|{st[2]}".encode())
    return h.hexdigest()[:16]


def file_stat(path) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:  # a dangling symlink, a file removed since it was listed
        raise DataError(f"{path}: cannot stat it ({e.strerror}); replace it, or remove it from the set") from None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def write_failure(e):
    """The OSError behind a failed atomic_save, or None: plumbing turns a full disk into a DataError whose fix names
    the training scripts' flags (--out, --resume), which evaluate.py does not have; its own words are used instead."""
    cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
    return cause if isinstance(cause, OSError) else None


def save(obj, path, kept):
    """atomic_save; a failed write is a DataError in evaluate.py's words. kept: what is still there after it."""
    try:
        atomic_save(obj, path, kept)
    except (DataError, OSError) as e:
        if (cause := write_failure(e)) is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        raise DataError(f"{path}: cannot write it ({cause.strerror or type(cause).__name__}); kept: {kept}. "
                        + ("Free space (or raise the quota) there, or point" if full else "Point")
                        + " --output / --cache-dir at a writable folder, then rerun the same command (features "
                        "already computed are cached, and not computed again)") from None


def cached(path: Path, compute):
    """compute(), saved at `path`; read back from there by later runs (recomputed, with a warning, if unreadable).
    A cache that cannot be written (a full disk, a folder in the way) is a warning: the numbers do not need it."""
    if (value := read_cache(path)) is not None:
        return value
    value = compute()
    try:
        atomic_save(value, path)
    except (DataError, OSError) as e:
        if (cause := write_failure(e)) is None:
            raise
        print(f"warning: {path}: features not cached ({cause.strerror or type(cause).__name__}); this run goes on "
              "without, the next computes them again", file=sys.stderr)
    return value


def encode_images(encoder: Encoder, images, args, desc, files=()) -> dict:
    """{"features": (N, D) raw encoder features, "labels": (N,)}, in dataset order. files: (N,) the image paths, named
    by the DataError a bad image raises."""
    loader = torch.utils.data.DataLoader(Transformed(images, encoder.transform, files), batch_size=args.batch_size,
                                         num_workers=loader_workers(args.workers, args.device),
                                         pin_memory=args.device.startswith("cuda"))
    feats, labels = [], []
    batches = iter(loader)  # any workers start here, before malloc keeps freed memory for the encoder
    with keep_freed_memory(not args.device.startswith("cuda")):  # 2.6x faster on a CPU (plumbing)
        bar = tqdm(batches, total=len(loader), desc=desc, unit="batch", disable=desc is None)  # None: load_aligner
        for x, y in bar:
            feats.append(encoder.encode(x).cpu())
            labels.append(torch.as_tensor(y))
    return {"features": torch.cat(feats), "labels": torch.cat(labels)}


def encode_texts(encoder: Encoder, texts, args, desc) -> torch.Tensor:
    """(len(texts), D) raw encoder features."""
    batches = range(0, len(texts), args.batch_size)
    return torch.cat([encoder.encode(texts[i:i + args.batch_size]).cpu()
                      for i in tqdm(batches, desc=desc, disable=desc is None)])


def embed(model: Model, modality, raw) -> torch.Tensor:
    """normalize(head(raw)) in fp32 on the device, in slices to bound memory: (N, D_raw) -> (N, D)."""
    with torch.no_grad():
        out = [model.heads[modality](x.to(model.device).float()) for x in raw.split(65536)]
    return F.normalize(torch.cat(out), dim=-1)


def fill(template, name):
    return template.replace("{c}", name).replace("{}", name)  # CLIP_benchmark writes {c}, open_clip and ours {}


# ---------------------------------------------------------------------------- use from Python
class Aligner:
    """A trained aligner, or a plain open_clip model, as two embedding functions into the shared space.

    encode_image / encode_text run exactly evaluate.py's path: the frozen encoder on the clean eval view under
    no_grad (bf16 autocast on CUDA; Encoder.encode), then the head, then L2 normalisation (embed). Both return
    (n, dim) float32 unit vectors on `device`; score(image_emb, text_emb) is what evaluate.py ranks by (the cosine
    `image_emb @ text_emb.T`, but CSA's rho-weighted product for a csa export).
    Metadata: method ("sma", "sotalign", "sotalign-teacher", "csa", "siglip-pairs", or "open_clip"), specs (the
    encoder spec per modality), dim, device, info (the checkpoint's args and final metrics).
    """

    def __init__(self, model: Model, batch_size=256):
        self.model, self.info, self.specs, self.device = model, model.info, model.specs, model.device
        self.method = model.info.get("method")
        self.run = argparse.Namespace(batch_size=batch_size, workers=0, device=model.device)  # read by encode_*s

    @property
    def dim(self) -> int:
        return self.info.get("dim") or self.model.encoder("image").dim  # an open_clip model has identity heads

    @property
    def transform(self):
        """PIL image -> (3, H, W) tensor: the image encoder's clean eval view (stack them for encode_image)."""
        return self.model.encoder("image").transform

    def encode_image(self, images) -> torch.Tensor:
        """images: a list of PIL images and/or image paths, or a (B, 3, H, W) batch made with `transform`.
        Returns (n, dim) float32, L2-normalised."""
        encoder = self.model.encoder("image")
        if torch.is_tensor(images):
            raw = torch.cat([encoder.encode(x).cpu() for x in images.split(self.run.batch_size)])
        else:  # Transformed reads a path, or a (PIL image, label) pair
            images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else images
            items = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else (x, i) for i, x in enumerate(images)]
            raw = encode_images(encoder, items, self.run, desc=None)["features"]
        return embed(self.model, "image", raw)

    def encode_text(self, texts) -> torch.Tensor:
        """texts: a list of strings (or one string). Returns (n, dim) float32, L2-normalised."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return embed(self.model, "text", encode_texts(self.model.encoder("text"), texts, self.run, desc=None))

    def score(self, image_emb, text_emb) -> torch.Tensor:
        """(n, m) the score evaluate.py ranks by, of encode_image's (n, dim) and encode_text's (m, dim) outputs: the
        cosine for every method but a CSA teacher, whose score is sum_i rho_i xh_i yh_i (weighted_by)."""
        return weighted_by(image_emb, self.info.get("score_weights")) @ text_emb.T


def load_aligner(path, device=None, batch_size=256) -> Aligner:
    """An aligner.pt exported by sma.py / sotalign.py (any method), or "openclip:<model>:<pretrained>" for a plain
    open_clip model (pretrained: a tag such as openai, a checkpoint path, or empty for random weights).
    device: default cuda when available, else cpu. Encoders load on first use."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind, _, name = str(path).partition(":")
    if kind == "openclip":
        model_name, _, pretrained = name.partition(":")
        args = Args(model=model_name, pretrained=pretrained or "none", device=device)
    else:
        args = Args(aligner=os.fspath(path), device=device)
    return Aligner(load_model(args), batch_size)


# ---------------------------------------------------------------------------- metrics (pure functions)
def weighted_by(image_emb, weights=None) -> torch.Tensor:
    """The image embeddings an aligner's score is the dot product of: CSA's exports carry weights rho, for its score
    s(x, y) = sum_i rho_i xh_i yh_i of unit xh, yh (Li et al. 2025, weighted_corr_sim); the others none (the cosine).
    image_emb: (N, D) unit rows; weights: (D,) or None. The modality gap is measured on the unweighted rows."""
    return image_emb if weights is None else image_emb * weights.to(image_emb)


def zeroshot_classifier(prompt_emb: torch.Tensor) -> torch.Tensor:
    """Class vectors from prompt embeddings, as CLIP: w_c = normalize(mean_t normalize(e_ct)).

    prompt_emb: (C, T, D), the embedding of template t filled with class c's name. Returns W: (C, D).
    """
    return F.normalize(F.normalize(prompt_emb, dim=-1).mean(dim=1), dim=-1)


def first_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's first positive key when the row is sorted by descending score.

    scores: (Q, K); positive: (Q, K) bool, at least one True per row. Tie rule: a stable sort, i.e. among equal
    scores the lower key index comes first (torch.argmax's rule; CLIP_benchmark's torch.topk leaves tie order
    unspecified). rank = #{keys scoring above the best positive} + #{keys tied with it at a lower index than the
    first positive with that score}. Recall@k of a query = rank < k. Cost O(Q K), no sort, no per-query loop.
    """
    idx = torch.arange(scores.shape[1], device=scores.device)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    tied = scores == best  # (Q, K)
    first = torch.where(positive & tied, idx, scores.shape[1]).amin(dim=1, keepdim=True)  # (Q, 1)
    return (scores > best).sum(1) + (tied & (idx < first)).sum(1)


def query_ranks(queries, keys, query_id, key_id) -> torch.Tensor:
    """Rank (first_positive_rank) of each query's first matching key under cosine scores.

    queries: (Q, D), keys: (K, D), both L2-normalised; query_id: (Q,), key_id: (K,): a key matches a query when
    their ids are equal. Scores are computed in row slices of ~16M entries to bound memory.
    """
    step = max(1, 2 ** 24 // len(keys))
    return torch.cat([first_positive_rank(queries[i:i + step] @ keys.T, query_id[i:i + step, None] == key_id[None])
                      for i in range(0, len(queries), step)])


def classification_metrics(image_emb, class_emb, labels) -> dict:
    """acc1, acc5 and mean per-class recall of zero-shot classification (CLIP_benchmark's definitions).

    image_emb: (N, D), class_emb: (C, D), both L2-normalised; labels: (N,) in [0, C). logits = image_emb @ W^T.
    acc5 is NaN when C < 5 (as CLIP_benchmark). mean_per_class_recall = mean over the classes that have samples
    of the fraction of their images predicted correctly (sklearn's balanced_accuracy_score); a class with no
    samples is left out, not counted as 0.
    """
    C = len(class_emb)
    rank = query_ranks(image_emb, class_emb, labels, torch.arange(C, device=labels.device))
    hit = (rank == 0).double()
    count = torch.bincount(labels, minlength=C)
    recall = torch.bincount(labels, weights=hit, minlength=C)[count > 0] / count[count > 0]
    return {"acc1": hit.mean().item(), "acc5": (rank < 5).double().mean().item() if C >= 5 else float("nan"),
            "mean_per_class_recall": recall.mean().item()}


def retrieval_metrics(image_emb, text_emb, text_image, ks=(1, 5, 10)) -> dict:
    """Image->text and text->image Recall@k with several captions per image.

    image_emb: (I, D), text_emb: (T, D), both L2-normalised; text_image: (T,) the image index of each caption.
    t2i_R@k: fraction of captions whose image is in their top k. i2t_R@k: fraction of images with at least one
    of their captions in their top k (CLIP papers' definition; CLIP_benchmark names these
    image_retrieval_recall@k and text_retrieval_recall@k respectively).
    """
    images = torch.arange(len(image_emb), device=text_image.device)
    t2i = query_ranks(text_emb, image_emb, text_image, images)
    i2t = query_ranks(image_emb, text_emb, images, text_image)
    return {**{f"i2t_R@{k}": (i2t < k).double().mean().item() for k in ks},
            **{f"t2i_R@{k}": (t2i < k).double().mean().item() for k in ks}}


def modality_gap(image_emb, text_emb, pair_image, pair_text) -> dict:
    """The modality gap (Liang et al. 2022) over matched pairs, in float64.

    image_emb: (I, D), text_emb: (T, D), L2-normalised; pairs p = (pair_image[p], pair_text[p]), P of them:
    each image with its class vector (classification), each caption with its image (retrieval).
    modality_gap = || mean_p image_emb[pair_image[p]] - mean_p text_emb[pair_text[p]] ||_2;
    matched_cosine = mean_p <image_emb[pair_image[p]], text_emb[pair_text[p]]>.
    """
    x, y = image_emb[pair_image].double(), text_emb[pair_text].double()  # (P, D)
    return {"modality_gap": (x.mean(0) - y.mean(0)).norm().item(), "matched_cosine": (x * y).sum(1).mean().item()}


# ---------------------------------------------------------------------------- evaluation
def image_features(model: Model, name, task, data: Data, args) -> dict:
    """encode_images of the task's images, cached. The key covers everything the cached features and labels depend
    on: the image encoder's spec and identity (plumbing.encoder_identity: a local model's files, a py: module's
    source, the package versions), the ordered image files (path, size, mtime, ctime; a binary set's files), the
    labels the reader took from its split and label files, the split and the root. Editing a split file changes the
    images listed or their labels, so it misses the cache; so does a replaced image or encoder."""
    root = str(task_root(name, task, args).resolve())
    # "v3": v2 (large JPEGs decoded at reduced size, Image.draft in rgb_first) + labels and every set's files
    key = fingerprint(["v3", name, root, task.split, len(data.images), encoder_identity(model.specs["image"]),
                       data.labels], data.files, data.stats)
    return cached(Path(args.cache_dir) / "eval" / f"{slug(name)}-image-{key}.pt",
                  lambda: encode_images(model.encoder("image"), data.images, args, f"{name} images", data.files))


def evaluate_task(model: Model, name, task, data: Data, args) -> dict:
    cache = Path(args.cache_dir) / "eval"
    raw = image_features(model, name, task, data, args)
    image_emb, labels = embed(model, "image", raw["features"]), raw["labels"].to(args.device)
    if task.kind == CLS and data.labels is None and len(labels):  # a reader that lists no labels: check them now
        low, high = labels.min().item(), labels.max().item()
        if not 0 <= low <= high < len(data.classnames):
            raise DataError(f"{task_root(name, task, args)}: labels range over [{low}, {high}], outside the "
                            f"{len(data.classnames)} classes; {task.layout} is damaged")
    scored = weighted_by(image_emb, model.info.get("score_weights"))  # what the ranking uses (CSA: rho-weighted)
    if task.kind == CLS:
        texts = [fill(t, c) for c in data.classnames for t in data.templates]  # (C*T,) class-major
    else:
        texts = [c for caps in data.captions for c in caps]
    key = fingerprint([texts, encoder_identity(model.specs["text"])])
    text_raw = cached(cache / f"text-{key}.pt", lambda: encode_texts(model.encoder("text"), texts, args,
                                                                     f"{name} texts"))
    text_emb = embed(model, "text", text_raw)
    if task.kind == CLS:
        class_emb = zeroshot_classifier(text_emb.view(len(data.classnames), len(data.templates), -1))  # (C, D)
        metrics = classification_metrics(scored, class_emb, labels)
        metrics.update(modality_gap(image_emb, class_emb, torch.arange(len(labels), device=args.device), labels))
        info = {"n_images": len(labels), "n_classes": len(data.classnames), "n_templates": len(data.templates)}
    else:
        text_image = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps], device=args.device)
        metrics = retrieval_metrics(scored, text_emb, text_image)
        captions = torch.arange(len(text_image), device=args.device)
        metrics.update(modality_gap(image_emb, text_emb, text_image, captions))
        info = {"n_images": len(image_emb), "n_texts": len(text_image)}
    return {"split": task.split, **info, **({"partial": data.partial} if data.partial else {}), "metrics": metrics}


def main_metric(result):
    """The one number per task that the mean uses: acc1, or the mean of i2t_R@1 and t2i_R@1."""
    m = result["metrics"]
    return m["acc1"] if result["task"] == CLS else (m["i2t_R@1"] + m["t2i_R@1"]) / 2


def no_nan(metrics):
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}  # JSON has no NaN


def print_table(results):
    cols = ["acc1", "acc5", "mean_per_class_recall", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
            "t2i_R@10", "modality_gap", "matched_cosine"]
    short = ["acc1", "acc5", "mpcr", "i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "gap", "cos"]
    width = max([len(r["dataset"]) for r in results] + [7])
    print(f"\n{'dataset':<{width}} {'n_img':>7} " + " ".join(f"{c:>6}" for c in short)
          + "   (% except gap, cos)")
    for r in results:
        if "skipped" in r:
            print(f"{r['dataset']:<{width}} skipped: {r['skipped']}")
            continue
        m = r["metrics"]
        cells = ["" if m.get(c) is None else f"{m[c]:.3f}" if c in cols[-2:] else f"{100 * m[c]:.2f}" for c in cols]
        note = f"   partial: {r['partial']}" if r.get("partial") else ""
        print(f"{r['dataset']:<{width}} {r['n_images']:>7} " + " ".join(f"{c:>6}" for c in cells) + note)


def run_task(model: Model, name, task, args) -> dict:
    """One task inside the guard every task runs in, whole: listing, stat, decoding, encoding (and loading the
    encoder), scoring, and a row the JSON can hold. -> its JSON row, with "metrics", or "skipped" and one line: the
    reason when anything is wrong with its data (DataError, from open_task, Transformed, Model.encoder), or the type
    and message of an unexpected error (a bug: it costs this task, never another or the JSON). The caller goes on
    with the next task either way; KeyboardInterrupt is not caught."""
    base = {"dataset": name, "task": task.kind, "model": model.name, "language": "en"}
    t0 = time.perf_counter()
    try:
        row = {**base, **evaluate_task(model, name, task, open_task(name, task, args), args)}
        row["metrics"] = no_nan(row["metrics"])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        json.dumps(row, allow_nan=False)  # the row is JSON: writing the results cannot fail on it
        return row
    except DataError as e:
        reason = f"{name}: {one_line(e)}"
    except Exception as e:  # a bug (here or in a library): this task only, visible, with its type and message
        reason = (f"{name}: unexpected {type(e).__name__}: {one_line(e)[:500]} (a bug, not your data: please report "
                  "this line)")
    print(f"[evaluate] skipped {reason}", file=sys.stderr, flush=True)
    return {**base, "skipped": reason}


def output_path(args) -> Path:
    return Path(args.output or (Path(args.aligner).parent / "eval.json" if args.aligner else
                                Path("results") / f"eval_{slug(f'{args.model}/{args.pretrained}')}.json"))


def earlier_results(output: Path):
    """Before any compute: what --output holds. None (nothing there), or the earlier results file's JSON. DataError
    when the name does not end in .json (aligner.pt, a cache file, x.txt), or the path holds anything else: a folder,
    a FIFO, a file that is not evaluate.py's results (any other JSON, text, a torch file, an empty file)."""
    if output.suffix != ".json":
        raise DataError(f"--output {output}: not a .json name; evaluate.py writes its results as JSON (e.g. --output "
                        f"{output.with_suffix('.json')})")
    if not os.path.lexists(output):
        return None
    if problem := not_regular(output):
        raise DataError(f"--output {output}: {problem}; pass a new file name ending in .json")
    try:
        old = json.loads(output.read_bytes())
    except ValueError:  # not JSON, not UTF-8 (a torch file, text, an empty file)
        old = None
    if not (isinstance(old, dict) and {"model", "results", "mean"} <= old.keys() and isinstance(old["results"], list)
            and all(isinstance(r, dict) and {"dataset", "task"} <= r.keys() for r in old["results"])):
        raise DataError(f"--output {output}: holds something other than evaluate.py's results, left as it is; pass "
                        "another file name ending in .json")
    return old


def back_up(output: Path) -> Path:
    """Move an earlier results file aside, to <name>.<its date>.json (a rename: atomic, nothing copied)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(output.stat().st_mtime))
    backup = next(b for k in range(1000) if not (b := output.with_name(
        f"{output.stem}.{stamp}{f'-{k}' if k else ''}.json")).exists())
    os.replace(output, backup)
    return backup


def same_rows(a, b) -> bool:
    """Two results lists hold the same rows, timings aside: a rerun that reproduced the earlier file."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b]


def report(model: Model, args, results, complete) -> dict:
    """The JSON of a run: its rows and the means over the full (not skipped, not partial) results."""
    done = [r for r in results if "metrics" in r and not r.get("partial")]
    scores = {r["dataset"]: main_metric(r) for r in done}
    mean = {"main_metric": "acc1 (classification), mean of i2t_R@1 and t2i_R@1 (retrieval)",
            "tasks": len(scores), "mean": sum(scores.values()) / len(scores) if scores else None,
            "clip14": sum(scores[n] for n in CLIP14) / 14 if set(CLIP14) <= set(scores) else None}
    return {"format": "evaluate/1", "model": model.name, "identity": model.identity,
            "image_encoder": model.specs["image"], "text_encoder": model.specs["text"],
            "device": args.device, "torch": torch.__version__, "args": asdict(args), "complete": complete,
            "results": results, "mean": mean}


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_folder(args.cache_dir, "--cache-dir")  # before any work: where the features and the results go
    output = output_path(args)
    check_folder(output.parent, "--output")
    old = earlier_results(output)  # refused now, before any compute, unless it is evaluate.py's own
    tasks = resolve_tasks(args.tasks)
    if not tasks:
        raise DataError(f"--tasks {args.tasks!r} names no task; e.g. --tasks clip14 or --tasks emoji")
    # TF32 stays off on purpose: the frozen encoders already run under bf16 autocast (shared block), and the
    # cosine scores that decide ranks are kept in full fp32 so TF32 rounding cannot reorder near-ties.
    model = load_model(args)
    results, backup = [], None
    for name, task in tasks.items():
        results.append(run_task(model, name, task, args))
        out = report(model, args, results, complete=len(results) == len(tasks))
        if old is not None and backup is None:  # the earlier file is moved aside at the first write, not before
            backup = back_up(output)
        out["earlier"] = str(backup) if backup else None
        # after every task: an interrupted run keeps the tasks it finished; a failed write (a full disk) ends the
        # run with one line, the file as it was after the task before (before this run, for the first write)
        first = len(results) == 1
        try:
            save(out, output, (f"{output} as it was before this run" if first else
                               f"{output} as it was after the task before" + (f", the earlier one as {backup}"
                                                                              if backup else ""))
                 + ", and the features of every finished task (cached)")
        except DataError:
            if first and backup:
                os.replace(backup, output)  # the earlier file back under its name
            raise
    if backup and same_rows(old["results"], results):  # nothing the rerun does not hold again: no backup left
        backup.unlink()
        backup = out["earlier"] = None
        save(out, output, f"{output} as it was after the last task")
    print_table(results)
    done = [r for r in results if "metrics" in r]
    parts = [f"{r['dataset']} acc1 {100 * r['metrics']['acc1']:.2f}" if r["task"] == CLS else
             f"{r['dataset']} i2t_R@1 {100 * r['metrics']['i2t_R@1']:.2f} t2i_R@1 {100 * r['metrics']['t2i_R@1']:.2f}"
             for r in done]
    parts = [p + (" (partial)" if r.get("partial") else "") for p, r in zip(parts, done)]
    mean, skipped, partial = out["mean"], len(results) - len(done), sum(bool(r.get("partial")) for r in done)
    means = [f"mean {100 * mean['mean']:.2f} over {mean['tasks']} tasks"] if mean["tasks"] else []
    summary = " | ".join(parts + means
                         + ([f"clip14 mean {100 * mean['clip14']:.2f}"] if mean["clip14"] is not None else [])
                         + ([f"{partial} partial"] if partial else []) + ([f"{skipped} skipped"] if skipped else []))
    print(f"eval ({model.name}) | {summary} | -> {output}" + (f" (the earlier results: {backup})" if backup else ""))
    if args.strict and skipped:
        raise DataError(f"--strict: {skipped} of {len(results)} tasks skipped "
                        f"({', '.join(r['dataset'] for r in results if 'skipped' in r)}; reasons above and in "
                        f"{output}, which holds the others)")
    return {**out, "summary": summary}  # the one line sma.py / sotalign.py --eval end their run with


def cli(argv=None) -> int:
    """The command line: main(), and its exit status. A user error (DataError: a bad flag or file, or a skip under
    --strict) is one line on stderr and status 2; any other exception is a bug: its traceback."""
    try:
        main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
