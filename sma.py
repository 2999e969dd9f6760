"""SMA — Submodular Modality Aligner (Pham, Majee, Iyer, 2026; arXiv 2605.12872): a reference implementation.

A FROZEN image encoder and a FROZEN text encoder are aligned by two small trainable heads. Each entity of the data is
a pair of sets: K images of it (its pictures, --depictions, then augmented views) and its M captions. The loss is a
set-level contrastive objective over Submodular Mutual Information (SMI) between an entity's image set and every
caption set of the batch (default FLQMI).
Only the abstract could be read: docs/SMA.md separates what the paper states from what we reconstruct, and
every choice of ours is tagged below (`# not specified in the paper; we use ...`, `# deviation: ...`).

Paper -> code (docs/SMA.md, sections 2-4):
  an entity = an image set A (K views) and a caption set T (M captions)   image_sets, Views, batch_plan
  frozen encoders, features cached                                       features (plumbing.extract, load_encoder)
  light heads g_v, g_t to a shared, L2-normalised space                  Heads
  s(a, t) = <g_v(a), g_t(t)> / tau; a smooth max over a set              smax
  the set-level contrastive objective over the batch's N x N set scores  contrastive
  SMI scores: FLQMI (default), FLVMI, graph-cut MI, log-det MI           flqmi, flvmi (cover), gcmi, logdetmi
  "reducing cross-modal divergence" (submodular variation of info.)      divergence (--lambda-div)
  baselines: InfoNCE, multi-positive InfoNCE, SigLIP                     infonce, multipos, siglip
  the loss of a step, the optimiser, the loop                            sma_loss, train (AdamW, warm-up + cosine)

Commands:
  python sma.py --data pairs.csv                       # DINOv2 ViT-L/14 + GTE-large-1.5 (Hugging Face hub)
  python sma.py --data examples/emoji/train.csv --depictions examples/emoji/depictions.csv --views 3 \
      --image-encoder offline:efficientnet-lite0 --text-encoder offline:all-minilm-l6-v2 --eval emoji --dim 512 \
      --hidden 1024 --batch-size 256 --epochs 30 --lr 3e-4   # offline demo, real encoders, each image set 3 artists'
      # drawings: 1 min 22 s, 1.7 GB peak RSS on 2 idle CPU cores (cold cache); emoji acc1 39.0, i2t R@1 9.0
  python sma.py ... --resume                           # continue <out>/checkpoint.pt (same result as no stop)
  python sma.py ... --nproc-per-node N                 # N ranks (or torchrun): extraction sharded, heads under DDP
Writes: <cache-dir>/sma-image-<hash>/, sma-text-<hash>/ (float16 feature stores of K views, of all captions,
  reused by later runs; docs/SCALE.md),
  <out>/checkpoint.pt (complete training state, atomic), <out>/manifest.json (args, versions, device, metrics),
  <out>/aligner.pt (the export evaluate.py loads; format: docs/USAGE.md section 6), <out>/eval.json (with --eval).
Measured on: 2 CPU cores (bench/sweep_artists.md, torch 2.14.1; bench/sma_step_cpu.md, torch 2.15.0); one H100
  (bench/sma_step_gpu.md, an earlier version of this file).
Needs: plumbing.py beside it (readers, encoders, heads, checkpoints, the feature store); evaluate.py for --eval only
  (refused in one line, before any compute, when it is not there).
"""
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

# What this file shares with sotalign.py and evaluate.py lives once in plumbing.py (readers, frozen encoders,
# heads, atomic writes, flags, torchrun setup, checkpoints): this file holds the method. evaluate.py is
# imported only for --eval.
from plumbing import (NEAR_COPY_COSINE, DataError, Encoder, Gather, Pairs, arg, atomic_save, check_image, check_out,
                      encoder_identity, extract, generator, head_state, import_evaluate, leave, load_checkpoint,
                      load_encoder, loader_workers, make_head, on_device, open_image, parse_dataclass, read_exclude,
                      read_pairs, run_eval, save_checkpoint, schedule, setup, stop, store_key, undecodable, without,
                      write_manifest)


# ---------------------------------------------------------------------------- args
LOSSES = ("flqmi", "flvmi", "gcmi", "logdetmi", "infonce", "multipos", "siglip")


@dataclass
class Args:
    data: str = arg("", "pairs CSV or open_clip TSV, a row per (image, caption); an image's rows: an entity; or "
                        "coco:<annotations/captions_<split>.json>, or webdataset tar shards (a/{00000..00099}.tar)",
                 required=True)
    exclude: str = arg("", "drop the images named in this file (COCO captions json, or one image per line), by file "
                           "name: e.g. the Karpathy test split before --eval mscoco")
    near_copy_cosine: float = arg(NEAR_COPY_COSINE, "with --eval mscoco / flickr30k: refuse training images this "
                                                    "close to a test image in the frozen features (re-encoded or "
                                                    "resized copies); 1 turns it off", gt=0)
    image_key: str = arg("", "image column ('' = `filepath` or `image`, whichever the header has)")
    caption_key: str = arg("", "caption column ('' = `title` or `caption`, whichever the header has)")
    sep: str = arg("", "column separator ('' = sniffed from the header)")
    image_root: str = arg("", "coco: data: the image folder ('' = COCO's layout, <split>/ beside annotations/)")
    subset: int = arg(0, "coco: data: keep this many images, a fixed-seed nested subset (0 = all)", ge=0)
    skip_bad_rows: bool = arg(False, "skip and count bad rows instead of stopping at the first one")
    image_encoder: str = arg("timm:vit_large_patch14_dinov2.lvd142m@224", "frozen image encoder spec (docs/USAGE.md 2)")
    text_encoder: str = arg("hf:Alibaba-NLP/gte-large-en-v1.5", "frozen text encoder spec (docs/USAGE.md 2)")
    views: int = arg(2, "K: image views per entity (view 0 the clean eval view, the rest augmented)", ge=1)
    depictions: str = arg("", "CSV image,depiction: more images of the entity whose --data image is `image`; views "
                              "0..n-1 are its n images (clean), the rest augmentations of them in turn ('' = none)")
    captions: int = arg(5, "M: captions per entity per step (more: M drawn each step; fewer: padded)", ge=1)
    aug_seed: int = arg(0, "seed of the augmented views (part of the feature-cache key)")
    loss: str = arg("flqmi", "SMI losses flqmi, flvmi, gcmi, logdetmi; baselines infonce, multipos, siglip",
                    choices=LOSSES)
    eta: float = arg(1.0, "eta: weight inside the SMI score (FLQMI's second term, FLVMI's query weight, ...)", gt=0)
    lambda_div: float = arg(0.0, "weight of the divergence term (submodular variation of information)", ge=0)
    tau: float = arg(0.0, "initial temperature tau = 1 / logit scale (0: CLIP's 0.07; SigLIP: 0.05, i.e. scale 20)",
                     ge=0)
    fixed_tau: bool = arg(False, "keep tau at its initial value instead of learning it")
    dim: int = arg(1024, "d: output dimension of the heads", ge=1)
    hidden: int = arg(1024, "hidden width of the heads' MLP", ge=1)
    # not specified in the paper; we use the optimisation defaults of docs/SMA.md
    epochs: int = arg(50, "epochs over the entities", ge=1)
    batch_size: int = arg(1024, "N: entities per global batch (all ranks together; one has no negatives)", ge=2)
    lr: float = arg(1e-4, "AdamW peak learning rate", gt=0)
    wd: float = arg(1e-4, "AdamW weight decay (weights only; not biases, norms, temperature)", ge=0)
    warmup: float = arg(0.05, "fraction of the steps with linear warm-up, then cosine decay", ge=0)
    seed: int = arg(0, "seed of the head initialisation and the data order")
    out: str = arg("runs/sma", "output folder")
    overwrite: bool = arg(False, "replace a finished or started run in --out (refused without it)")
    cache_dir: str = arg(".cache", "feature cache folder")
    verify_cache: bool = arg(False, "re-read every cached feature shard against its CRC-32 (a cache hit otherwise "
                                    "checks each shard's header and size only)")
    resume: bool = arg(False, "continue the run in <out>/checkpoint.pt")
    eval: str = arg("", "evaluate.py tasks to run on the export at the end, e.g. `emoji` or `clip14` ('' = none; "
                        "needs evaluate.py beside this file)")
    dataset_root: str = arg("datasets", "--eval: evaluate.py's --dataset-root (a dataset in <root>/<task>/)")
    device: str = arg("", "cpu | cuda | cuda:N ('' = cuda if available)")
    nproc_per_node: int = arg(1, "N > 1: run as N ranks on this machine (torchrun --standalone's launcher, in this "
                                 "process: a rank's error is its one line, without torchrun's traceback)", ge=1)
    workers: int = arg(-1, "DataLoader workers for image decoding (-1: 0 on CPU, min(8, cores) on CUDA)", ge=-1)
    extract_batch_size: int = arg(64, "images or captions per encoder call during extraction", ge=1)
    log_every: int = arg(10, "log a line every this many steps", ge=1)
    ckpt_every: int = arg(100, "write <out>/checkpoint.pt every this many steps (and at the end)", ge=1)
    stop_after_steps: int = arg(0, "stop after this global step as if killed, without export (tests resume)", ge=0)


# Args that do not change what is trained: --resume may differ in these and nothing else.
RUN_ONLY = {"out", "overwrite", "cache_dir", "verify_cache", "resume", "eval", "dataset_root", "device", "workers",
            "extract_batch_size", "log_every", "ckpt_every", "stop_after_steps"}


def parse_args(argv=None) -> Args:
    return parse_dataclass(Args, __doc__.split("\n")[0], argv)[0]


# ---------------------------------------------------------------------------- data / features
CACHE_VERSION = 2  # 2: a partial file holds one row per image (its K views concatenated), not one per view


def image_sets(pairs: Pairs, path: str) -> list:
    """(E,) each entity's images: its --data image, then the depictions the CSV `path` (image,depiction; relative
    paths from its folder) lists for it, in file order; [[image] per entity] without a file. DataError on a row
    whose image is no entity's or whose depiction is not a readable image."""
    sets = {p: [p] for p in pairs.images}
    if not path:
        return list(sets.values())
    import csv
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--depictions {path}: file not found; give the image,depiction CSV")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, r in enumerate(rows, start=2):
        image, depiction = (str((path.parent / (r.get(k) or "")).resolve()) for k in ("image", "depiction"))
        if image not in sets:
            raise DataError(f"{path}: row {row}: image {r.get('image')!r} is no entity's image in --data; the first "
                            "column names an image of the pairs file, the second another picture of that entity")
        if problem := check_image(depiction):
            raise DataError(f"{path}: row {row}: {problem}")
        sets[image].append(depiction)
    return list(sets.values())


class Views(Dataset):
    """Item j = the K views (K, 3, H, W) of entity e = index[j] (this rank's shard), each image decoded once: views
    0..n-1 the clean eval views of its n images (image_sets), n..K-1 augmentations of them in turn (image k % n);
    view k is seeded by (aug_seed, e * K + k), whatever the worker, ranks or resume. One image: view 0 clean, the
    rest augmented."""

    def __init__(self, images, enc: Encoder, K, aug_seed, index):
        import torchvision.transforms as T
        # not specified in the paper; we use RandomResizedCrop(scale 0.5-1), horizontal flip, light colour jitter
        aug = T.Compose([
            T.RandomResizedCrop(enc.image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(enc.mean, enc.std)])
        self.clean, self.aug, self.K = enc.transform, aug, K  # aug sees RGB: __getitem__ converts first
        # images: (E,) an entity's paths (image_sets), or one path each (as before --depictions)
        self.images, self.aug_seed, self.index = [[p] if isinstance(p, str) else p for p in images], aug_seed, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        e, K = self.index[j], self.K
        ims = []
        for ref in self.images[e][:K]:  # decoded here, once, at full size: the random crops need its pixels
            try:
                with open_image(ref) as im:  # a file, or a tar member
                    ims.append(im.convert("RGB"))
            except Exception as error:  # checked when read, but cut or damaged inside: one line naming it
                raise undecodable(ref, error) from None
        views = []
        with torch.random.fork_rng(devices=[]):
            for k in range(K):
                torch.manual_seed(self.aug_seed * 1_000_003 + e * K + k)  # torchvision's transforms draw from it
                views.append((self.clean if k < len(ims) else self.aug)(ims[k % len(ims)]))
        return torch.stack(views)


def cache_key(pairs: Pairs, args: Args, modality, sets=None) -> str:
    """Hash of all the features of `modality` depend on: the images (paths, sizes and mtimes; with --depictions
    every entity's images and how many it has), the image encoder, K and the augmentation seed; or the captions and
    the text encoder. Any change gives another store; nothing stale is ever read. One streamed pass over the items
    (plumbing.store_key). sets: image_sets(pairs, args.depictions) when the caller has them already."""
    if modality == "image" and args.depictions:
        sets = sets or image_sets(pairs, args.depictions)
        identity = encoder_identity(args.image_encoder)
        config = [CACHE_VERSION, identity, args.views, args.aug_seed, [len(ps) for ps in sets]]
        return store_key(config, "image", (p for ps in sets for p in ps))
    if modality == "image":
        return store_key([CACHE_VERSION, encoder_identity(args.image_encoder), args.views, args.aug_seed], "image",
                         pairs.images)
    return store_key([CACHE_VERSION, encoder_identity(args.text_encoder)], "text",
                     (c for caps in pairs.captions for c in caps))


def features(pairs: Pairs, args: Args, rank=0, world=1, device="cpu", sets=None) -> dict:
    """Frozen features of every entity's K views and all its captions, in two float16 feature stores
    (plumbing.extract): read where complete, else extracted in shards, resumably, each rank writing its own.

    Returns {"image": (E, K, Di) Store, "text": (C, Dt) Store of all captions in entity order, "counts": (E,)
    captions per entity, "image_per_s": extraction speed (views/s) or None when read}. sets: each entity's images
    (image_sets), when the caller has read them already.
    """
    E, K = len(pairs.images), args.views
    texts = [c for caps in pairs.captions for c in caps]
    workers = loader_workers(args.workers, device)
    out = {"counts": torch.tensor([len(c) for c in pairs.captions]), "image_per_s": None}
    sets = sets or image_sets(pairs, args.depictions)  # each entity's images, once: for the key and the views
    for modality, spec in (("image", args.image_encoder), ("text", args.text_encoder)):
        folder = Path(args.cache_dir) / f"sma-{modality}-{cache_key(pairs, args, modality, sets)}"
        image = modality == "image"

        def load():  # only when a shard is missing
            enc = load_encoder(spec, modality, device)

            def encode_views(x):  # (B, K, 3, H, W): the views of B images, one encoder call -> (B, K, Di)
                return enc.encode(x.flatten(0, 1)).view(len(x), K, -1)
            if image:
                return Views(sets, enc, K, args.aug_seed, range(E)), encode_views
            return texts, enc.encode
        batch = max(1, args.extract_batch_size // (K if image else 1))
        store = extract(folder, E if image else len(texts), load, batch, workers if image else 0, rank, world,
                        f"{modality}s {spec}", "cuda" in device, args.verify_cache)  # pinned: the GPU copy is async
        out[modality] = store
        rate = store.encoded * world * (K if image else 1) / max(store.seconds, 1e-9)  # all ranks together
        if rank == 0 and store.encoded:
            print(f"features: {len(store) * (K if image else 1)} {modality}s at {rate:.1f}/s -> {folder}")
        elif rank == 0:
            print(f"features: reusing {folder}")
        if image and store.encoded:
            out["image_per_s"] = rate
    return out


def batch_plan(step, seed, E, B, M, K, mask):
    """The global batch of step `step`, a pure function of (seed, step): a resumed run continues the same stream
    and every rank draws the same plan.

    Returns ent (B,) entity ids; slots (B, min(M, Cmax)) caption slots (the entity's real captions first, at most M
    of them drawn without replacement; padding after); pick_v, pick_t (B,) one random view and one random real
    caption slot (column of `slots`) per entity, used by the single-pair baselines.
    """
    steps_per_epoch = max(E // B, 1)
    epoch, i = divmod(step, steps_per_epoch)
    # not specified in the paper; we drop the E mod B entities left over by each epoch's permutation (as open_clip)
    ent = torch.randperm(E, generator=generator(seed, 0, epoch))[i * B:(i + 1) * B]
    g = generator(seed, 1, step)
    keys = torch.rand(len(ent), mask.shape[1], generator=g).masked_fill(~mask[ent], 2.0)  # padding sorts last
    # not specified in the paper; we draw a fresh uniformly random M-subset of the real captions each step
    slots = keys.argsort(1)[:, :M]  # (B, M'): real captions first, never truncated for good
    n_real = mask[ent].sum(1).clamp(max=slots.shape[1])  # (B,)
    pick_v = torch.randint(K, (len(ent),), generator=g)
    pick_t = (torch.rand(len(ent), generator=g) * n_real).long()
    return ent, slots, pick_v, pick_t


# ---------------------------------------------------------------------------- model / heads
class Heads(nn.Module):
    """SMA's trainable part, fp32: g_v, g_t = LayerNorm -> Linear -> GELU -> Linear (d), the logit scale 1/tau and
    (SigLIP only) a logit bias."""

    def __init__(self, di, dt, args: Args):
        super().__init__()
        # not specified in the paper; we use a 2-layer MLP head per modality (docs/SMA.md defaults)
        self.image_head = make_head("mlp", di, args.dim, args.hidden, n_layers=2)
        self.text_head = make_head("mlp", dt, args.dim, args.hidden, n_layers=2)
        # not specified in the paper; we use CLIP's tau = 0.07 (Radford et al. 2021); SigLIP: 1/20, bias -10 (SAIL)
        tau = args.tau or (1 / 20 if args.loss == "siglip" else 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau)), requires_grad=not args.fixed_tau)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if args.loss == "siglip" else None

    def forward(self, xi, xt):
        """xi: (b, K, Di), xt: (b, M, Dt) frozen features -> L2-normalised (b, K, d), (b, M, d), 1/tau, bias."""
        zi = F.normalize(self.image_head(xi), dim=-1)
        zt = F.normalize(self.text_head(xt), dim=-1)
        return zi, zt, self.logit_scale.exp(), self.logit_bias


# ---------------------------------------------------------------------------- losses
# Shared symbols. A batch holds N entities. zi: (N, K, d) L2-normalised image-view embeddings, the image set of
# entity k is A_k = {zi[k, a]}. zt: (N, M, d) caption embeddings, the caption set T_l = {zt[l, t] : mask[l, t]};
# mask: (N, M) bool, True for a real caption (every entity has >= 1), False for padding. scale = 1/tau (0-dim
# tensor); s(x, y) = scale * <x, y>. eta: the SMI weight. PRISM = Kothawade et al. 2022 (SMI definitions);
# SCoRe / SMILe = the authors' earlier losses (ICML 2024, ECCV 2024); SMILe's code smooths max by a plain logsumexp
# (amajee11us/SMILe-FSOD@09e6604, fsdet/modeling/contrastive_loss.py, FacilityLocation.forward), smax below is ours.

def smax(x, mask=None, dim=-1):
    """Smooth max of a set along `dim`: smax(x) = log( (1/n) sum_j exp x_j ) = logsumexp(x) - log n, n = |set|.

    mask (same shape as x, bool): True for the set's members. max - log n <= smax <= max, and smax(c x) / c -> max
    as c -> inf (the temperature 1/scale is the smoothing). Replaces max in FL scores, as SMILe's logsumexp does.
    Paste with: import math, torch.
    """
    # not specified in the paper; we use logsumexp - log n for max. deviation: SMILe's code has no - log n (plain
    # logsumexp; docs/FAITHFULNESS.md): the same with equal set sizes, shifted by log n per set otherwise
    if mask is None:
        return torch.logsumexp(x, dim) - math.log(x.shape[dim])
    return torch.logsumexp(x.masked_fill(~mask, -torch.inf), dim) - mask.sum(dim).to(x.dtype).log()


def contrastive(logits):
    """L = 1/2 [ CE(l, diag) + CE(l^T, diag) ] over an (N, N) score matrix l[k, l] (CLIP's symmetric loss):
    entity k's image set must score highest with its own caption set among the batch's, and vice versa.
    Paste with: import torch, torch.nn.functional as F."""
    y = torch.arange(len(logits), device=logits.device)
    i2t, t2i = F.cross_entropy(logits, y), F.cross_entropy(logits.T, y)
    return (i2t + t2i) / 2, {"i2t": i2t, "t2i": t2i}


def flqmi(zi, zt, mask, scale, eta=1.0):
    """SMA's default: set-level contrastive loss over FLQMI scores (docs/SMA.md, section 4).

    l[k, l] = [(1/M_l) sum_{t in T_l} smax_{a in A_k} s(a, t) + eta (1/K) sum_{a in A_k} smax_{t in T_l} s(a, t)]
              / (1 + eta),   L = contrastive(l)                                 (shapes: see "Shared symbols")
    FLQMI (PRISM): I(A; Q) = sum_{i in Q} max_{j in A} s_ij + eta sum_{i in A} max_{j in Q} s_ij: each caption
    is covered by its best view and each view by its best caption. With K = M = 1, l = s: InfoNCE at the same tau.
    Paste with: contrastive, smax; import math, torch, torch.nn.functional as F.
    """
    N, K, d = zi.shape
    M = zt.shape[1]
    # one (NK x d) @ (d x NM) matmul, read as [k, a, l, t] without a permute copy (~1.5x faster than einsum on CPU)
    S = ((scale * zi).reshape(N * K, d) @ zt.reshape(N * M, d).T).view(N, K, N, M)  # s(a, t), a in A_k, t in T_l
    # not specified in the paper; we use means over the sets (1/M_l, 1/K) so set sizes do not weigh entities
    text_term = (smax(S, dim=1) * mask).sum(-1) / mask.sum(-1)  # (N, N): mean_t smax_a; padded t weigh 0
    image_term = smax(S, mask[None, None].expand_as(S), dim=3).mean(1)  # (N, N): mean_a smax over the real t
    # not specified in the paper; we divide by 1 + eta so that K = M = 1 is InfoNCE at the same tau (README)
    return contrastive((text_term + eta * image_term) / (1 + eta))


def cover(zi, zt, mask, scale):
    """Facility-location coverage of the batch ground set V (all N K views, then all N M caption slots):
    mA[i, k] = smax_{a in A_k} s(v_i, a), mT[i, l] = smax_{t in T_l} s(v_i, t) -> (V, N), (V, N); and
    v: (V,) bool, True for the real members of V (padded caption slots are not in V).
    Paste with: smax; import math, torch."""
    N, K, d = zi.shape
    M = zt.shape[1]
    Z = torch.cat([zi.reshape(N * K, d), zt.reshape(N * M, d)])  # (V, d) with padding, V = N K + N M
    v = torch.cat([mask.new_ones(N * K), mask.reshape(-1)])  # (V,)
    mA = smax((scale * Z @ zi.reshape(N * K, d).T).view(-1, N, K), dim=2)  # (V, N)
    GT = (scale * Z @ zt.reshape(N * M, d).T).view(-1, N, M)  # (V, N, M)
    mT = smax(GT, mask[None].expand_as(GT), dim=2)  # (V, N)
    return mA, mT, v


def flvmi(zi, zt, mask, scale, eta=1.0):
    """Set-level contrastive loss over FLVMI scores, the ground set being the whole batch (docs/SMA.md option).

    l[k, l] = (1/|V|) sum_{i in V} smin( smax_{j in A_k} s_ij, eta smax_{j in T_l} s_ij ),  L = contrastive(l)
    V: every view and real caption of the batch; s_ij = scale <z_i, z_j> within and across modalities;
    smin(x, y) = -smax(-x, -y) = log 2 - log(e^-x + e^-y). FLVMI (PRISM): I(A; Q) = sum_{i in V} min(max_{j in A}
    s_ij, eta max_{j in Q} s_ij). O(|V| N^2) memory: an ablation. K = M = 1: not InfoNCE (a smooth min over all V).
    Paste with: contrastive, smax, cover; import math, torch, torch.nn.functional as F.
    """
    mA, mT, v = cover(zi, zt, mask, scale)  # (V, N), (V, N), (V,)
    # not specified in the paper; we use the mean over V (not the sum) and the smooth min matching smax
    smin = math.log(2) - torch.logaddexp(-mA[:, :, None], -eta * mT[:, None, :])  # (V, N, N): [i, k, l]
    return contrastive((smin * v[:, None, None]).sum(0) / v.sum())


def gcmi(zi, zt, mask, scale, eta=1.0):
    """Set-level contrastive loss over graph-cut MI (PRISM): I(A; Q) = 2 lambda sum_{i in A} sum_{j in Q} s_ij.

    l[k, l] = eta (1/(K M_l)) sum_{a in A_k} sum_{t in T_l} s(a, t) = eta s(mean_a zi[k, a], mean_t zt[l, t]),
    L = contrastive(l). Modular (no diminishing returns): an ablation. K = M = 1: InfoNCE at tau / eta (eta = 1: tau).
    Paste with: contrastive; import torch, torch.nn.functional as F.
    """
    # not specified in the paper; we use lambda = eta / 2 and means instead of sums
    ui = zi.mean(1)  # (N, d)
    ut = (zt * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, d)
    return contrastive(eta * scale * ui @ ut.T)


def logdetmi(zi, zt, mask, scale, eta=1.0, ridge=0.1):
    """Set-level contrastive loss over log-determinant MI (PRISM), scaled by 1/tau.

    l[k, l] = scale [ log det S_A - log det(S_A - eta^2 S_AQ S_Q^-1 S_AQ^T) ],  A = A_k, Q = T_l,  L = contrastive(l)
    S_A = Z_A Z_A^T + ridge I (K x K), S_Q = Z_Q Z_Q^T + ridge I (M_l x M_l), S_AQ = Z_A Z_Q^T: cosine kernels.
    Padded captions enter S_Q as identity rows/columns with zero cross terms (value unchanged). eta <= 1 keeps the
    Schur complement PD (ridge r > 0). K = M = 1: l = -scale log(1 - (eta <a, t> / (1 + r))^2): not InfoNCE.
    Paste with: contrastive; import torch, torch.nn.functional as F.
    """
    N, K, d = zi.shape
    M = zt.shape[1]
    # not specified in the paper; we use cosine kernels with ridge 0.1 and scale the MI by 1/tau as logits
    SA = zi @ zi.transpose(1, 2) + ridge * torch.eye(K, dtype=zi.dtype, device=zi.device)  # (N, K, K)
    m2 = mask[:, :, None] & mask[:, None, :]  # (N, M, M)
    SQ = torch.where(m2, zt @ zt.transpose(1, 2) + ridge * torch.eye(M, dtype=zt.dtype, device=zt.device),
                     torch.diag_embed((~mask).to(zt.dtype)))  # (N, M, M)
    SAQ = torch.einsum("kad,ltd->klat", zi, zt * mask[..., None])  # (N, N, K, M): [k, l] = S_{A_k T_l}
    LQ = torch.linalg.cholesky(SQ)  # (N, M, M)
    W = torch.linalg.solve_triangular(LQ[None], SAQ.transpose(-1, -2), upper=False)  # (N, N, M, K): LQ^-1 S_QA
    schur = SA[:, None] - eta ** 2 * W.transpose(-1, -2) @ W  # (N, N, K, K)
    return contrastive(scale * (torch.logdet(SA)[:, None] - torch.logdet(schur)))


def multipos(zi, zt, mask, scale, eta=1.0):
    """Multi-positive InfoNCE baseline (StableRep, Tian et al. 2023, Eq. 3): targets spread uniformly over positives.

    i2t: for each view a of entity k, p = softmax over all real captions of the batch of s(a, .), target uniform over
    T_k: loss -(1/M_k) sum_{t in T_k} log p_t. t2i likewise over all views, target uniform over A_k.
    L = 1/2 (mean over views of i2t + mean over real captions of t2i). eta is unused.
    Paste with: import torch.
    """
    N, K, d = zi.shape
    M = zt.shape[1]
    S = scale * zi.reshape(N * K, d) @ zt.reshape(N * M, d).T  # (NK, NM)
    v = mask.reshape(-1)  # (NM,) real captions
    ent = torch.arange(N, device=zi.device)
    pos = (ent.repeat_interleave(K)[:, None] == ent.repeat_interleave(M)[None]) & v  # (NK, NM)
    i2t = -(torch.where(pos, S.masked_fill(~v, -torch.inf).log_softmax(1), 0).sum(1) / pos.sum(1)).mean()
    t2i = -(torch.where(pos, S.log_softmax(0), 0).sum(0)[v] / K).mean()
    return (i2t + t2i) / 2, {"i2t": i2t, "t2i": t2i}


def infonce(x, y, scale):
    """CLIP / SAIL InfoNCE on single pairs: L = contrastive(scale x y^T); x, y: (N, d) normalised embeddings.
    Paste with: contrastive; import torch, torch.nn.functional as F."""
    return contrastive(scale * x @ y.T)


def siglip(x, y, scale, bias):
    """SigLIP (Zhai et al. 2023, Eq. 1): L = -(1/N) sum_{k,l} log sigmoid(z_kl (scale <x_k, y_l> + bias)),
    z_kl = 1 if k = l else -1; x, y: (N, d) normalised embeddings. Zhai's sum / N, not the mean over the N^2 logits
    of SAIL's code and sotalign.siglip: N times theirs in value and gradient (docs/FAITHFULNESS.md).
    Paste with: import torch, torch.nn.functional as F."""
    logits = scale * x @ y.T + bias  # (N, N)
    z = 2 * torch.eye(len(x), dtype=x.dtype, device=x.device) - 1
    loss = -F.logsigmoid(z * logits).sum() / len(x)
    return loss, {"sig": loss}


def divergence(zi, zt, mask, scale):
    """Submodular variation of information between each entity's image set and caption set (SMA's "reducing
    cross-modal divergence"), facility location over the batch ground set V:

    D_k = f(A_k | T_k) + f(T_k | A_k),  f(A | T) = (1/|V|) sum_{i in V} relu(smax_{a in A} c_ia - smax_{t in T} c_it)
        = (1/|V|) sum_{i in V} |mA[i, k] - mT[i, k]|  (the two relus sum to |.|);  returns mean_k D_k.
    c: cosine similarity; the smooth max uses the current temperature (see cover), result divided back by 1/tau.
    Paste with: smax, cover; import math, torch.
    """
    # not specified in the paper; we use cosine units with tau detached, so the term cannot shrink by lowering 1/tau
    s = scale.detach()
    mA, mT, v = cover(zi, zt, mask, s)  # (V, N), (V, N), (V,)
    return (((mA - mT).abs() * v[:, None]).sum(0) / v.sum()).mean() / s


SET_LOSSES = {"flqmi": flqmi, "flvmi": flvmi, "gcmi": gcmi, "logdetmi": logdetmi, "multipos": multipos}


def sma_loss(name, zi, zt, mask, scale, bias, pick_v, pick_t, eta=1.0, lambda_div=0.0):
    """The training loss `name` (LOSSES) on a global batch -> (scalar, dict of parts). Set losses see every view and
    caption; the single-pair baselines see view pick_v[k] and caption pick_t[k] of entity k (both (N,))."""
    if name in SET_LOSSES:
        loss, parts = SET_LOSSES[name](zi, zt, mask, scale, eta)
    else:  # not specified in the paper; we give the baselines one random view and one random caption per step (SAIL)
        ar = torch.arange(len(zi), device=zi.device)
        x, y = zi[ar, pick_v], zt[ar, pick_t]
        loss, parts = infonce(x, y, scale) if name == "infonce" else siglip(x, y, scale, bias)
    if lambda_div:
        parts["div"] = divergence(zi, zt, mask, scale)
        loss = loss + lambda_div * parts["div"]
    return loss, parts


# ---------------------------------------------------------------------------- train
CKPT_FORMAT = "sma-checkpoint/1"


def train(args: Args, feats: dict, rank, world, device, log):
    """Train the heads on cached features -> (heads, metrics), or (None, None) when --stop-after-steps hit."""
    # features stay float16 in their stores (or, on a GPU they fit, whole in float16: plumbing.on_device); each
    # batch is gathered from them and cast to float32
    XI, XT = on_device(feats["image"], device), on_device(feats["text"], device)  # (E, K, Di), (C, Dt)
    counts = feats["counts"]
    first = (counts.cumsum(0) - counts).to(device)  # (E,) row in XT of each entity's first caption
    TM_host = torch.arange(int(counts.max())) < counts[:, None]  # (E, Cmax) real caption slots; plan drawn on the host
    TM = TM_host.to(device)
    E, K = XI.shape[:2]
    B = min(args.batch_size, E)  # a multiple of world (check_run)
    total = args.epochs * max(E // B, 1)
    torch.manual_seed(args.seed)  # head init; identical on every rank (DDP also broadcasts rank 0's weights)
    model = Heads(XI.shape[-1], XT.shape[-1], args).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # CLIP: no weight decay on gains, biases, temperature
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, max(1, round(args.warmup * total))))
    ckpt, step, metrics = Path(args.out) / "checkpoint.pt", 0, {}
    if args.resume and ckpt.is_file():
        step, metrics = load_checkpoint(ckpt, CKPT_FORMAT, RUN_ONLY, args, model, opt, sched, world)
        log(f"resumed {ckpt} at step {step}/{total}")
    elif args.resume:
        log(f"--resume: no checkpoint at {ckpt}; starting at step 0")
    ddp = DDP(model) if world > 1 else model
    mine = slice(rank * B // world, (rank + 1) * B // world)  # this rank's part of each global batch
    log(f"training {args.loss}: {E} entities, K={K}, M<={args.captions}, N={B} x {world} rank(s) -> {total} steps")
    tick, since = time.time(), step
    while step < total:
        plan = batch_plan(step, args.seed, E, B, args.captions, K, TM_host)  # CPU tensors
        ent, slots, pick_v, pick_t = (t.to(device) for t in plan)
        mask = TM[ent[:, None], slots]  # (N, M) global
        rows = (first[ent[mine], None] + slots[mine]).clamp(max=len(XT) - 1)  # (b, M) rows of XT; padding: any row
        xt = XT[rows.flatten()].to(device, torch.float32).view(*rows.shape, -1) * mask[mine, :, None]  # padding: 0
        zi, zt, scale, bias = ddp(XI[ent[mine]].to(device, torch.float32), xt)  # (b, K, d), (b, M, d)
        if world > 1:  # the set-level loss needs the whole batch; gradients flow back to each rank's slice
            zi, zt = Gather.apply(zi), Gather.apply(zt)  # (N, K, d), (N, M, d)
        loss, parts = sma_loss(args.loss, zi, zt, mask, scale, bias, pick_v, pick_t, args.eta, args.lambda_div)
        if not torch.isfinite(loss):  # one sync per step, cheap next to the step; stops before the bad update
            stop(f"non-finite loss {loss.item()} ({args.loss}: { {k: v.item() for k, v in parts.items()} })", step,
                 ckpt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not args.fixed_tau:  # CLIP clamps a learned 1/tau at 100 (Radford et al. 2021, Sec. 2.5)
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(100))
        step += 1
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == total:
            metrics = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if step % args.log_every == 0 or step == total:
            dt = (time.time() - tick) / (step - since)
            log(f"step {step}/{total} | loss {metrics['loss']:.4f} (" +
                " ".join(f"{k} {metrics[k]:.4f}" for k in parts) + f") | lr {sched.get_last_lr()[0]:.2e}"
                f" | tau {1 / scale.item():.4f} | {1000 * dt:.1f} ms/step | {B / dt:.0f} entities/s")
            tick, since = time.time(), step
        if rank == 0 and (step % args.ckpt_every == 0 or step == total):
            save_checkpoint(ckpt, CKPT_FORMAT, model, opt, sched, step, args, metrics, world)
        if step == args.stop_after_steps:
            log(f"stopping after step {step} (--stop-after-steps); continue with --resume")
            return None, None
    return model, metrics


# ---------------------------------------------------------------------------- export
def export(model: Heads, args: Args, metrics, path):
    """The aligner export evaluate.py loads (format: docs/USAGE.md section 6), written atomically."""
    atomic_save({"format": "aligner/1", "method": "sma", "image_encoder": args.image_encoder,
                 "text_encoder": args.text_encoder,
                 "image_head": head_state(model.image_head, "mlp", model.image_head[0].normalized_shape[0],
                                          args.dim, args.hidden, 2),
                 "text_head": head_state(model.text_head, "mlp", model.text_head[0].normalized_shape[0],
                                         args.dim, args.hidden, 2),
                 "logit_scale": model.logit_scale.exp().item(),
                 "logit_bias": None if model.logit_bias is None else model.logit_bias.item(),
                 "args": asdict(args), "metrics": metrics}, path)


# ---------------------------------------------------------------------------- main
def check_run(args: Args, entities, world, images: list):
    """Everything checkable before extraction and before anything is written into --out; DataError if not.
    images: every training image, which no requested evaluation may score."""
    check_out(args, CKPT_FORMAT, RUN_ONLY, world)
    if entities < 2:
        raise DataError(f"{args.data}: {entities} entity; a contrastive loss needs at least 2 (add images)")
    if min(args.batch_size, entities) % world:
        raise DataError(f"--batch-size {min(args.batch_size, entities)}: not a multiple of the {world} processes")
    if args.eval:  # no evaluate.py beside this file, an unknown task, or a train/test leak: refused now
        import_evaluate(__file__).check_training_images(args.eval, args.dataset_root, images)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args.device, args.nproc_per_node, argv)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    pairs = read_pairs(args.data, args.image_key or None, args.caption_key or None, args.sep or None,
                       args.skip_bad_rows, image_root=args.image_root or None, subset=args.subset,
                       cache_dir=args.cache_dir)
    if pairs.skipped:
        log(f"{args.data}: skipped {len(pairs.skipped)} bad rows (--skip-bad-rows): {'; '.join(pairs.skipped[:5])}")
    if args.exclude:  # e.g. the Karpathy test images, before --eval mscoco (check_run refuses a leak)
        kept = without(pairs, read_exclude(args.exclude))
        log(f"--exclude {args.exclude}: dropped {len(pairs.images) - len(kept.images)} entities")
        pairs = kept
    log(f"{args.data}: {len(pairs.images)} entities, {sum(map(len, pairs.captions))} captions")
    sets = image_sets(pairs, args.depictions)  # a bad --depictions file stops here, before any compute
    check_run(args, len(pairs.images), world, pairs.images)
    feats = features(pairs, args, rank, world, device, sets)
    if args.eval and args.near_copy_cosine < 1:  # a re-encoded or resized test image: other bytes, caught here
        import_evaluate(__file__).check_near_copies(args.eval, args.dataset_root, args.cache_dir, args.image_encoder,
                                                    [(feats["image"], pairs.images)], device, args.near_copy_cosine)
    model, metrics = train(args, feats, rank, world, device, log)
    results = {}
    if model is not None and rank == 0:  # the run's results are written only now, each atomically
        export(model, args, metrics, out / "aligner.pt")
        log(f"exported {out / 'aligner.pt'}")
        (out / "eval.json").unlink(missing_ok=True)  # an --overwrite run: no earlier scores beside the new aligner
        if args.eval:  # evaluate.py on the export -> its results, with its one-line "summary"
            results = run_eval(__file__, args, out / "aligner.pt", out / "eval.json", device)
        write_manifest(out / "manifest.json", args, device, world, entities=len(pairs.images),
                       image_per_s=feats.get("image_per_s"), metrics=metrics, eval=results.get("mean"))
    leave(world)
    if model is not None:
        log(f"sma {args.loss} | seed {args.seed} | {metrics['step']} steps | final loss {metrics['loss']:.4f}"
            + (f" | {results['summary']}" if results else ""))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a user error is one line and status 2; any other exception is a bug: its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
