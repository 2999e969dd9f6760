"""SOTAlign — semi-supervised alignment of frozen unimodal vision and language models via optimal transport
(Roschmann, Krzakala, Mazelet, Bouniot, Akata, ICML 2026; arXiv 2602.23353): a reference implementation.

A FROZEN image encoder and a FROZEN text encoder are aligned by two light heads f (image) and g (text) from a few
image-text pairs plus unpaired images and unpaired texts. Defaults are the authors' (Lion, lr 1e-4, lambda 1e-4,
eps 0.05 / 0.005, SigLIP mean-normalised from scale 20, bias -10); our readings are tagged (`# not specified in the
paper`, `# deviation:`); docs/SOTAlign.md has the method, docs/FAITHFULNESS.md each component against the authors' code.

Paper -> code (only the abstract could be read; the rest follows the authors' code, docs/SOTAlign.md):
  stage 1, a linear teacher fitted on the pairs         fit_teacher: cca (default), csa, procrustes, ridge
  the teacher similarity K* = <T_x(x), T_y(y)>          teacher_similarity (CSA: rho-weighted, score_weighted)
  the student similarity K = <f(x), g(y)>, heads f, g   Heads (LayerNorm -> Linear, Xavier init)
  entropic OT plans P = OT_eps(K), P* = OT_eps*(K*)     sinkhorn_log (log domain, symmetrised last half-step)
  KLOT(K, K*) = KL(P* || P), gradient (P - P*) / eps    klot (straight-through form)
  the supervised loss on the pairs                      siglip (or infonce); unpaired negatives: the same functions
  stage 2: L = L_pairs + lambda KLOT                    objective (+ the STRUCTURE baseline's term, structure)
  optimiser                                             Lion; schedule (warm-up, cosine); train (the loop)

Commands (without --unpaired-*: the supervised SigLIP-on-pairs baseline):
  python sotalign.py --pairs pairs.csv --unpaired-images DIR_OR_CSV --unpaired-texts TXT_OR_CSV   # DINOv2-L + GTE
  python sotalign.py --pairs examples/emoji/sotalign_pairs.csv --unpaired-images examples/emoji/unpaired_images.csv \
      --unpaired-texts examples/emoji/unpaired_texts.txt --heldout examples/emoji/heldout.csv \
      --image-encoder offline:efficientnet-lite0 --text-encoder offline:all-minilm-l6-v2 \
      --unpaired-negatives --unpaired-batch 256 --steps 200 --lr 1e-3 --eval emoji
      # offline demo, the authors' setting: 1 min 28 s, 1.2 GB peak RSS on 2 idle CPU cores, cold cache. With 47
      # pairs its heads score below their CCA teacher (emoji zero-shot acc1 15.2 vs 20.0, retrieval R@1 1-2%)
  python sotalign.py --pairs 'cc3m/00000.tar' --unpaired-from 'cc3m/{00001..00200}.tar'   # the authors' setting
  python sotalign.py --pairs coco:coco/annotations/captions_train2017.json --subset 10000 ...  # COCO pairs
  python sotalign.py ... --resume     # continue <out>/checkpoint.pt | ... --nproc-per-node N (or torchrun): N ranks
Writes: <cache-dir>/sotalign-<set>-<modality>-<hash>/ (a float16 feature store per input set, docs/SCALE.md),
  <out>/teacher.pt and aligner.pt (the exports evaluate.py loads; format: docs/USAGE.md section 6), checkpoint.pt
  (training state, atomic), manifest.json, eval.json and eval_teacher.json (with --eval).
Measured on: 2 CPU cores (bench/sweep_artists.md, torch 2.14.1; bench/sotalign_sinkhorn_cpu.md, torch 2.15.0); one
  H100 (bench/sotalign_sinkhorn_gpu.md, an earlier version of this file).
Needs: plumbing.py beside it (flags, readers, frozen encoders, heads, the feature store, checkpoints); evaluate.py
  for --eval only (refused in one line, before any compute, when it is not there).
"""
import copy
import csv
import itertools
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

# What this file shares with sma.py and evaluate.py lives once in plumbing.py (flags, readers, frozen encoders,
# heads, atomic writes, torchrun setup, the feature store, checkpoints): this file holds the method.
from plumbing import (NEAR_COPY_COSINE, AffineHead, DataError, Gather, Store, arg, atomic_save, check_image, check_out,
                      encoder_identity, extract, generator, head_state, image_identity, import_evaluate, leave,
                      load_checkpoint, load_encoder, loader_workers, make_head, on_device, open_image, parse_dataclass,
                      read_exclude, read_pairs, read_tars, refuse_bad_entries, run_eval, save_checkpoint, schedule,
                      setup, stop, store_key, undecodable, without, write_manifest)


# ---------------------------------------------------------------------------- args
TEACHERS = ("cca", "csa", "procrustes", "ridge")
PAIRED_LOSSES = ("siglip", "infonce")
OPTIMIZERS = ("lion", "adamw")


@dataclass
class Args:
    pairs: str = arg("", "pairs CSV or open_clip TSV, a row per (image, caption); an image's rows: an entity; or "
                         "coco:<annotations/captions_<split>.json>", required=True)
    unpaired_images: str = arg("", "a folder or a CSV with an `image` column ('' = none: SigLIP on the pairs only)")
    unpaired_texts: str = arg("", "a .txt (one text per line) or a CSV with a `caption` or `text` column ('' = none)")
    unpaired_from: str = arg("", "the authors' setting: unpaired images and texts from one paired source (pairs "
                                 "file, coco:, tar shards) outside --pairs, split in fixed halves: images of one, "
                                 "captions of the other")
    exclude: str = arg("", "drop the training images named in this file (COCO captions json, or one image per line), "
                           "by file name: e.g. the Karpathy test split before --eval mscoco")
    near_copy_cosine: float = arg(NEAR_COPY_COSINE, "with --eval mscoco / flickr30k: refuse training images this "
                                                    "close to a test image in the frozen features (re-encoded or "
                                                    "resized copies); 1 turns it off", gt=0)
    heldout: str = arg("", "held-out pairs file: the teacher's and the heads' retrieval R@1 on it are printed")
    image_key: str = arg("", "image column ('' = `filepath` or `image`, whichever the header has)")
    caption_key: str = arg("", "caption column ('' = `title`, `caption` or `text`, whichever the header has)")
    sep: str = arg("", "column separator ('' = sniffed from the header)")
    image_root: str = arg("", "coco: pairs: the image folder ('' = COCO's layout, <split>/ beside annotations/)")
    subset: int = arg(0, "coco: pairs: keep this many images, a fixed-seed nested subset (0 = all)", ge=0)
    skip_bad_rows: bool = arg(False, "skip and count bad rows instead of stopping at the first one")
    image_encoder: str = arg("timm:vit_large_patch14_dinov2.lvd142m@224", "frozen image encoder spec (docs/USAGE.md 2)")
    text_encoder: str = arg("hf:Alibaba-NLP/gte-large-en-v1.5", "frozen text encoder spec (docs/USAGE.md 2)")
    teacher: str = arg("cca", "stage-1 linear teacher (csa: CCA weighted by correlation, CSA)", choices=TEACHERS)
    teacher_reg: float = arg(0.1, "ridge on the covariance blocks of CCA / CSA (and of ridge regression); 0: "
                                  "unregularised, as CSA's CCA", ge=0)
    eig_floor: float = arg(1e-6, "floor on the covariance eigenvalues before C^-1/2 (the authors' eig_eps); keeps "
                                 "--teacher-reg 0 finite with fewer pairs than dimensions", gt=0)
    teacher_captions: str = arg("rows", "what the teacher is fitted on: rows (every (image, caption) row; ours) or "
                                        "mean (an image's captions normalised, averaged, normalised: the authors')",
                                choices=("rows", "mean"))
    csa_dim: int = arg(0, "--teacher csa: canonical directions kept (0 = all)", ge=0)
    paired_loss: str = arg("siglip", "loss on the pairs (siglip: the authors')", choices=PAIRED_LOSSES)
    unpaired_negatives: bool = arg(False, "use the batch's unpaired images and texts as extra negatives of the paired "
                                          "loss (the authors' runs, in which their lambda = 1e-4 was tuned)")
    lambda_structure: float = arg(0.0, "STRUCTURE baseline: weight of the neighbourhood-preservation regulariser",
                                  ge=0)
    structure_tau: float = arg(0.05, "STRUCTURE's softmax temperature (fixed)", gt=0)
    structure_levels: int = arg(1, "STRUCTURE's random-walk levels L", ge=1)
    lambda_ot: float = arg(1e-4, "lambda: weight of KLOT on the unpaired batches, against the mean-normalised paired "
                                 "loss (the authors' 1e-4; 0 = no KLOT)", ge=0)
    eps: float = arg(0.05, "eps: entropic regularisation of the student plan P", gt=0)
    eps_teacher: float = arg(0.005, "eps*: entropic regularisation of the teacher plan P*", gt=0)
    sinkhorn_iters: int = arg(100, "log-domain Sinkhorn iterations per plan (at most)", ge=1)
    sinkhorn_tol: float = arg(1e-3, "stop Sinkhorn when both marginals are met to this L1 error (0 = never)", ge=0)
    compile: bool = arg(torch.cuda.is_available(), "torch.compile the Sinkhorn kernel (on with CUDA: bench/)")
    tau: float = arg(0.0, "initial temperature tau = 1 / logit scale (0: CLIP's 0.07; SigLIP: 0.05, i.e. scale 20)",
                     ge=0)
    fixed_tau: bool = arg(False, "keep tau at its initial value instead of learning it")
    dim: int = arg(1024, "d: output dimension of the heads", ge=1)
    head_layers: int = arg(1, "1: LayerNorm -> Linear (the authors'); 2: + GELU -> Linear", choices=(1, 2))
    hidden: int = arg(1024, "hidden width of the heads when --head-layers 2", ge=1)
    paired_batch: int = arg(1024, "pairs per step (one random caption per image; one has no negatives)", ge=2)
    unpaired_batch: int = arg(1024, "unpaired images and unpaired texts per step (each)", ge=2)
    epochs: int = arg(20, "epochs over the larger unpaired set (over the pairs without unpaired data)", ge=1)
    steps: int = arg(0, "total steps (0 = from --epochs)", ge=0)
    optimizer: str = arg("lion", "lion (the authors': weight decay on every parameter) or adamw (weight decay on the "
                                 "weight matrices only)", choices=OPTIMIZERS)
    lr: float = arg(1e-4, "peak learning rate (the authors': 1e-4 with Lion)", gt=0)
    beta1: float = arg(0.9, "first beta of Lion / AdamW (the authors' 0.9)", ge=0)
    beta2: float = arg(0.99, "second beta of Lion / AdamW (the authors' 0.99)", ge=0)
    wd: float = arg(1e-5, "weight decay, decoupled (the authors' 1e-5)", ge=0)
    warmup: float = arg(0.1, "fraction of the steps with linear warm-up, then cosine decay (the authors' 0.1)", ge=0)
    seed: int = arg(0, "seed of the head initialisation and the data order")
    out: str = arg("runs/sotalign", "output folder")
    overwrite: bool = arg(False, "replace a finished or started run in --out (refused without it)")
    cache_dir: str = arg(".cache", "feature cache folder")
    verify_cache: bool = arg(False, "re-read every cached feature shard against its CRC-32 (a cache hit otherwise "
                                    "checks each shard's header and size only)")
    resume: bool = arg(False, "continue the run in <out>/checkpoint.pt")
    dataset_root: str = arg("datasets", "--eval: evaluate.py's --dataset-root (a dataset in <root>/<task>/)")
    eval: str = arg("", "evaluate.py tasks to run on the teacher and the heads at the end, e.g. `emoji` ('' = none; "
                        "needs evaluate.py beside this file)")
    device: str = arg("", "cpu | cuda | cuda:N ('' = cuda if available)")
    nproc_per_node: int = arg(1, "N > 1: run as N ranks on this machine (torchrun --standalone's launcher, in this "
                                 "process: a rank's error is its one line, without torchrun's traceback)", ge=1)
    workers: int = arg(-1, "DataLoader workers for image decoding (-1: 0 on CPU, min(8, cores) on CUDA)", ge=-1)
    extract_batch_size: int = arg(64, "images or texts per encoder call during extraction", ge=1)
    log_every: int = arg(10, "log a line every this many steps", ge=1)
    ckpt_every: int = arg(100, "write <out>/checkpoint.pt every this many steps (and at the end)", ge=1)
    stop_after_steps: int = arg(0, "stop after this global step as if killed, without export (tests resume)", ge=0)


# Args that do not change what is trained: --resume may differ in these and nothing else.
RUN_ONLY = {"heldout", "compile", "out", "overwrite", "cache_dir", "verify_cache", "resume", "eval", "dataset_root",
            "device", "workers", "extract_batch_size", "log_every", "ckpt_every", "stop_after_steps"}


def parse_args(argv=None) -> Args:
    a, p = parse_dataclass(Args, __doc__.split("\n")[0], argv)
    if a.unpaired_negatives and not (a.unpaired_images or a.unpaired_from):
        p.error("argument --unpaired-negatives: needs --unpaired-images and --unpaired-texts (or --unpaired-from)")
    if a.unpaired_from and a.unpaired_images:
        p.error("argument --unpaired-from: replaces --unpaired-images / --unpaired-texts; give one or the other")
    if bool(a.unpaired_images) != bool(a.unpaired_texts):
        p.error("give both --unpaired-images and --unpaired-texts (or neither: the supervised baseline)")
    return a


# ---------------------------------------------------------------------------- data / features
CACHE_VERSION = 2  # 2: JPEGs >= 4x the encoder's resize are decoded at reduced size (rgb_first)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_unpaired(path, modality, key="", sep="", skip_bad_rows=False, cache_dir=None) -> list:
    """Unpaired images: every image file under a folder (recursive, sorted) or the `image` column of a CSV (paths
    relative to its folder), each checked like read_pairs. Unpaired texts: a .txt file (one per line, blank lines
    ignored) or the `caption` / `text` column of a CSV. Either: webdataset tar shards (a path or brace pattern ending
    in .tar, plumbing.read_tars), their images or their captions. Bad rows raise DataError naming the file and row."""
    if str(path).endswith(".tar"):
        shards = read_tars(path, skip_bad_rows, cache_dir)
        return shards.images if modality == "image" else [c for caps in shards.captions for c in caps]
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
        if not v:
            problem = f"empty {modality}"
        elif modality == "image":
            problem = check_image(v)
        else:
            problem = None
        if problem:
            bad.append(f"{where}: {problem}")
        else:
            items.append(v)
    refuse_bad_entries(bad, skip_bad_rows, f"{path}, ", "Fix the row", "bad rows", more="more bad rows")
    if bad:
        print(f"{path}: skipped {len(bad)} bad rows (--skip-bad-rows): {'; '.join(bad[:5])}")
    if not items:
        raise DataError(f"{path}: no {modality}s found")
    return items


class ImageFiles(Dataset):
    """Item i = the clean eval view (`transform`) of images[i] (a file, or a tar member: plumbing.open_image)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            with open_image(self.images[i]) as im:
                return self.transform(im)
        except Exception as error:  # checked when read, but cut or damaged inside: one line naming it
            raise undecodable(self.images[i], error) from None


def cache_key(modality, items, spec) -> str:
    """Hash of all the features depend on (the image paths and file identities, or the texts; the encoder's spec and
    identity): never stale. One streamed pass over the items (plumbing.store_key)."""
    return store_key([CACHE_VERSION, encoder_identity(spec)], modality, items)


def features(name, modality, items, args: Args, encoders: dict, rank=0, world=1, device="cpu") -> Store:
    """(len(items), D) float16 frozen features of one input set (`name`: pairs, unpaired, heldout), in a feature
    store (plumbing.extract): read where it is complete, else extracted in shards, resumably, each rank writing its
    own. `encoders` holds the encoders loaded so far (loaded only when a shard is missing)."""
    spec, image = (args.image_encoder, True) if modality == "image" else (args.text_encoder, False)
    folder = Path(args.cache_dir) / f"sotalign-{name}-{modality}-{cache_key(modality, items, spec)}"
    workers = loader_workers(args.workers, device)

    def load():
        if modality not in encoders:
            encoders[modality] = load_encoder(spec, modality, device)
        enc = encoders[modality]
        return (ImageFiles(items, enc.transform) if image else items), enc.encode

    store = extract(folder, len(items), load, args.extract_batch_size, workers if image else 0, rank, world,
                    f"{modality}s {name}", "cuda" in device, args.verify_cache)  # pinned: the GPU copy does not block
    if rank == 0 and store.encoded:
        print(f"features: {len(items)} {name} {modality}s at {store.encoded * world / store.seconds:.1f}/s -> "
              f"{folder}")
    elif rank == 0:
        print(f"features: reusing {folder}")
    return store


def halves(source, paired_images) -> tuple:
    """--unpaired-from: unpaired images and texts from one paired source, as the authors drew CC3M's: the source's
    entities whose image is not a pair's, in a fixed-seed random order; the images of the first half and the
    captions of the second, so that no unpaired text describes an unpaired image -> (images, texts)."""
    taken = {image_identity(p) for p in paired_images}
    rest = [e for e, image in enumerate(source.images) if image_identity(image) not in taken]
    # not specified in the paper; we use seed 0 (fixed: the halves do not change with --seed)
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(0)).tolist()
    half = len(rest) // 2
    images = [source.images[rest[i]] for i in order[:half]]
    texts = [c for i in order[half:] for c in source.captions[rest[i]]]
    return images, texts


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
def recall_at_1(heads, feats: dict) -> dict:
    """Retrieval R@1 of (image, text) heads on pair features `feats` (as in main), scored as the export is (CSA: the
    rho-weighted product, score_weights): i2t, an image's best caption is one of its own; t2i, a caption's best image
    is its own. Runs where the heads are: they are not moved (nor switched to eval; they have no such layers)."""
    image_head, text_head = heads
    device = next(itertools.chain(image_head.parameters(), image_head.buffers())).device
    zi = score_weighted(image_head, F.normalize(image_head(feats["image"].to(device)), dim=-1))  # (E, d)
    zt = F.normalize(text_head(feats["text"].to(device)), dim=-1)  # (C, d)
    S = (zi @ zt.T).cpu()  # (E, C)
    owner = torch.repeat_interleave(torch.arange(len(zi)), feats["counts"])  # (C,) each caption's entity
    return {"i2t_R@1": (owner[S.argmax(1)] == torch.arange(len(zi))).float().mean().item(),
            "t2i_R@1": (S.argmax(0) == owner).float().mean().item()}


# ---------------------------------------------------------------------------- model / heads
class Heads(nn.Module):
    """Trainable, fp32: the heads f (image) and g (text) = LayerNorm -> Linear (d) (the authors'; --head-layers 2: an
    MLP), the logit scale 1/tau and (SigLIP) a logit bias."""

    def __init__(self, di, dt, args: Args):
        super().__init__()
        self.image_head = make_head("mlp", di, args.dim, args.hidden, args.head_layers)  # f
        self.text_head = make_head("mlp", dt, args.dim, args.hidden, args.head_layers)  # g
        for layer in self.modules():  # the authors' init (AlignmentLayer._initialize_weights): Xavier, zero biases
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        # SigLIP: scale 20, bias -10 as the authors' runs (scripts/ot_train.sh) and SAIL; InfoNCE: CLIP's tau = 0.07
        # (deviation: their code starts every loss at --logit_scale, default 10, i.e. tau 0.1; docs/FAITHFULNESS.md)
        tau = args.tau or (1 / 20 if args.paired_loss == "siglip" else 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau)), requires_grad=not args.fixed_tau)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if args.paired_loss == "siglip" else None

    def forward(self, xi, xt):
        """xi: (b, Di), xt: (b', Dt) frozen features -> L2-normalised f(xi) (b, d), g(xt) (b', d), scale, bias."""
        zi, zt = F.normalize(self.image_head(xi), dim=-1), F.normalize(self.text_head(xt), dim=-1)
        return zi, zt, self.logit_scale.exp(), self.logit_bias


# ---------------------------------------------------------------------------- losses
# The teachers' heads are plumbing.AffineHead, z = (x / ||x|| - mu) W, so that evaluate.py loads teacher.pt.
# Teachers: X (n, Dx), Y (n, Dy) raw paired features (a row per image-caption pair), float64 inside. Each returns
# {"mu_x", "W_x", "mu_y", "W_y"}: the image embedding is (x/||x|| - mu_x) W_x, the text one (y/||y|| - mu_y) W_y.

def _normalise_centre(X):
    X = F.normalize(X.double(), dim=-1)
    return X - X.mean(0), X.mean(0)


def cca(X, Y, reg=0.1, floor=1e-6) -> dict:
    """Regularised CCA in closed form (Hotelling 1936; ridge on both blocks as Vinod 1976), SOTAlign's teacher.

    Rows L2-normalised, then centred. Cxx = X^T X / n + reg I, Cyy = Y^T Y / n + reg I, Cxy = X^T Y / n.
    Cxx^{-1/2} Cxy Cyy^{-1/2} = U diag(rho) V^T (thin SVD); W_x = Cxx^{-1/2} U (Dx, k), W_y = Cyy^{-1/2} V (Dy, k),
    all k = min(Dx, Dy) components kept, not weighted by rho (docs/SOTAlign.md), except those with rho = 0 when n < D.
    rho (k,): the canonical correlations, descending; rho_i^2 are the eigenvalues of Cxx^{-1} Cxy Cyy^{-1} Cyx.
    C^{-1/2} from eigenvalues raised to at least `floor`, as the authors' teacher (optimal_transport/similarity.py,
    CCA.fit, eig_eps 1e-6): reg = 0 with n <= D (singular C) stays finite. They divide by n - 1, we by n (the
    same as reg * (n - 1) / n: docs/FAITHFULNESS.md). Needs normalise_centre; import torch, torch.nn.functional as F.
    Paste with: _normalise_centre; import torch, torch.nn.functional as F.
    """
    (X, mx), (Y, my), n = _normalise_centre(X), _normalise_centre(Y), len(X)

    def inv_sqrt(C):  # C symmetric positive semi-definite
        e, Q = torch.linalg.eigh(C)
        return (Q * e.clamp_min(floor).rsqrt()) @ Q.T
    Sx = inv_sqrt(X.T @ X / n + reg * torch.eye(X.shape[1], dtype=X.dtype))  # (Dx, Dx)
    Sy = inv_sqrt(Y.T @ Y / n + reg * torch.eye(Y.shape[1], dtype=Y.dtype))  # (Dy, Dy)
    U, rho, Vh = torch.linalg.svd(Sx @ (X.T @ Y / n) @ Sy, full_matrices=False)
    # not specified in the paper; we drop rho = 0 (n < D): arbitrary bases. deviation: the authors' CCA keeps all
    # min(Dx, Dy); that moves K* of unseen items at small n (bench/faithful_effects.md section 7)
    k = int((rho > 1e-9 * rho[0]).sum())
    return {"mu_x": mx, "W_x": Sx @ U[:, :k], "mu_y": my, "W_y": Sy @ Vh[:k].T, "rho": rho[:k]}


def procrustes(X, Y, reg=0.0) -> dict:
    """Orthogonal Procrustes (Schoenemann 1966): W = argmin ||X W - Y||_F over W (Dx, Dy) with orthonormal columns
    (rows if Dx < Dy), on L2-normalised, centred rows: X^T Y = U S V^T -> W = U V^T. Text side: identity. No reg.
    Paste with: _normalise_centre; import torch, torch.nn.functional as F."""
    (X, mx), (Y, my) = _normalise_centre(X), _normalise_centre(Y)
    U, _, Vh = torch.linalg.svd(X.T @ Y, full_matrices=False)
    return {"mu_x": mx, "W_x": U @ Vh, "mu_y": my, "W_y": torch.eye(Y.shape[1], dtype=Y.dtype)}


def ridge(X, Y, reg=0.1) -> dict:
    """Ridge regression from image to text features, on L2-normalised, centred rows:
    W = (X^T X / n + reg I)^{-1} X^T Y / n  (Dx, Dy), the minimiser of ||X W - Y||^2 / n + reg ||W||^2.
    Text side: the identity. Least squares, so reg = 0 with n <= D gives the minimum-norm solution, not an error.
    Paste with: _normalise_centre; import torch, torch.nn.functional as F."""
    (X, mx), (Y, my) = _normalise_centre(X), _normalise_centre(Y)
    W = torch.linalg.lstsq(X.T @ X + len(X) * reg * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y).solution
    return {"mu_x": mx, "W_x": W, "mu_y": my, "W_y": torch.eye(Y.shape[1], dtype=Y.dtype)}


def csa(X, Y, reg=0.1, dim=0, floor=1e-6) -> dict:
    """CSA (Li, Chinchali, Topcu, ICLR 2025), SMA's training-free baseline: CCA on the pairs, scored by

        s(x, y) = sum_{i <= dim} rho_i xh_i yh_i,   xh = the first `dim` canonical coordinates of x, L2-normalised
                                                    (yh likewise), rho_i the canonical correlations (see cca)

    (UTAustin-SwarmLab/Multi-modal-Data-Alignment, mmda/utils/sim_utils.py, weighted_corr_sim). Returns cca's dict cut
    to the first `dim` directions (0 = all): W_x, W_y unweighted, rho the score's weights, which fit_teacher hands to
    the export (score_weights) so that evaluate.py ranks by s itself. CSA's CCA (cca_zoo) is unregularised: reg = 0.
    # deviation: rows are L2-normalised before centring, where CSA centres the raw features (docs/FAITHFULNESS.md).
    Paste with: _normalise_centre, cca; import torch, torch.nn.functional as F.
    """
    T = cca(X, Y, reg, floor)
    k = min(dim or len(T["rho"]), len(T["rho"]))
    return {**T, "W_x": T["W_x"][:, :k], "W_y": T["W_y"][:, :k], "rho": T["rho"][:k]}


TEACHER_FITS = {"cca": cca, "csa": csa, "procrustes": procrustes, "ridge": ridge}


def fit_teacher(pairs: dict, kind="cca", reg=0.1, dim=0, floor=1e-6, captions="rows") -> tuple:
    """Stage 1: TEACHER_FITS[kind] on the pair features {"image": (E, Di), "text": (C, Dt), "counts": (E,)} ->
    (image, text) AffineHeads in float32, z = (x / ||x|| - mu) W. dim: CSA's directions kept (0 = all); floor: cca's.
    captions: rows, every (image, caption) row (ours; an image with c captions counts c times); mean, one row per image
    with its captions normalised, averaged and normalised again (the authors', roschmsi/vl-alignment-thesis@62a7c18,
    main.py). A CSA image head carries score_weights = rho: its score is sum_i rho_i xh_i yh_i (score_weighted)."""
    if captions == "mean":
        owner = torch.repeat_interleave(torch.arange(len(pairs["image"])), pairs["counts"])  # (C,) each caption's image
        summed = torch.zeros(len(pairs["image"]), pairs["text"].shape[1], dtype=torch.float64)
        summed.index_add_(0, owner, F.normalize(pairs["text"].double(), dim=-1))  # (E, Dt)
        X, Y = pairs["image"], F.normalize(summed / pairs["counts"][:, None], dim=-1)
    else:
        X, Y = pairs["image"].repeat_interleave(pairs["counts"], 0), pairs["text"]
    if kind in ("cca", "csa"):
        T = TEACHER_FITS[kind](X, Y, reg, **({"dim": dim} if kind == "csa" else {}), floor=floor)
    else:
        T = TEACHER_FITS[kind](X, Y, reg)
    heads = affine_heads(T)
    if kind == "csa":
        heads[0].score_weights = T["rho"].float()  # (k,) a plain attribute: the head's state stays evaluate.py's
    return heads


def affine_heads(T: dict) -> tuple:
    """A teacher's {"mu_x", "W_x", "mu_y", "W_y"} as (image, text) AffineHeads in float32."""
    heads = (AffineHead(*T["W_x"].shape), AffineHead(*T["W_y"].shape))
    for h, side in zip(heads, "xy"):
        h.mu.copy_(T[f"mu_{side}"])
        h.W.copy_(T[f"W_{side}"])
    return heads


def score_weighted(image_head, zi):
    """Normalised image embeddings zi (b, d) as the aligner's score sees them: times CSA's rho when the head carries
    score_weights (then zi @ zt.T = sum_i rho_i xh_i yh_i), else unchanged (the cosine). Paste with: nothing else."""
    weights = getattr(image_head, "score_weights", None)
    return zi if weights is None else zi * weights.to(zi)


@torch.no_grad()
def teacher_similarity(teacher, xi, xt):
    """K* (n, m), the teacher's similarity of n images and m texts: <T_x(x_i), T_y(y_j)> of the L2-normalised teacher
    embeddings (CSA: rho-weighted, score_weighted), exactly what its export ranks by. teacher: fit_teacher's
    (image, text) heads; xi: (n, Di), xt: (m, Dt) raw features. Computed per batch: 1M embeddings are not kept.
    Paste with: score_weighted; import torch, torch.nn.functional as F."""
    image_head, text_head = teacher
    return score_weighted(image_head, F.normalize(image_head(xi), dim=-1)) @ F.normalize(text_head(xt), dim=-1).T


def sinkhorn_log(C, eps, a=None, b=None, iters=100, tol=0.0, symmetric=True, check_every=10, compile=False):
    """Entropic optimal transport in the log domain (Cuturi 2013; Peyre & Cuturi 2019, Sec. 4.4; POT's sinkhorn_log):

        P = argmin_{P >= 0, P 1 = a, P^T 1 = b} <P, C> - eps H(P),   H(P) = -sum_ij P_ij (log P_ij - 1),
        log P_ij = alpha_i + beta_j - C_ij / eps, with the scaled dual potentials alpha (n,), beta (m,) updated in
        POT's order:  beta_j <- log b_j - logsumexp_i(alpha_i - C_ij / eps),
                      alpha_i <- log a_i - logsumexp_j(beta_j - C_ij / eps).

    C: (..., n, m) costs, leading dims a batch of independent problems; eps: float or (...,) tensor, one per problem;
    a: (..., n), b: (..., m) positive marginals summing to 1 (default uniform). symmetric: the authors' symmetrised
    last half-step (ExplainableML/SOTAlign@4a810a1, src/klot.py, sinkhorn) in our update order: the potential updated
    first in each iteration (here beta) moves half-way to its next update, beta <- (beta + beta') / 2, the other stays.
    The columns then sum to sqrt(b c) (c: their sums before), the rows to P sqrt(b / c): neither marginal is exact
    and the error of the last iteration is split between them.
    tol > 0: stop once err <= tol, checked every `check_every` iterations (one device sync each, as POT); warn if
    still above after `iters`. compile: torch.compile the kernel (fuses the add into the reduction; for CUDA).
    Returns log P (..., n, m) and err (...,) = ||P 1 - a||_1 + ||P^T 1 - b||_1. Raises FloatingPointError on NaN.
    Paste with: import math, warnings, torch.
    """
    n, m = C.shape[-2:]
    eps = torch.as_tensor(eps, dtype=C.dtype, device=C.device)
    M = -C / eps[..., None, None]  # (..., n, m)
    Mt = M.transpose(-1, -2).contiguous()  # (..., m, n): column updates become contiguous row reductions
    log_a = a.log() if a is not None else torch.full(C.shape[:-1], -math.log(n), dtype=C.dtype, device=C.device)
    log_b = b.log() if b is not None else torch.full(Mt.shape[:-1], -math.log(m), dtype=C.dtype, device=C.device)

    def row_lse(M, p):  # (..., n, m), (..., m) -> (..., n): logsumexp_j(M_ij + p_j)
        return torch.logsumexp(M + p[..., None, :], -1)
    lse = torch.compile(row_lse, dynamic=False) if compile else row_lse
    alpha, beta = torch.zeros_like(log_a), torch.zeros_like(log_b)  # the dual potentials of the rows, the columns

    def error(alpha, beta):
        P = (M + alpha[..., :, None] + beta[..., None, :]).exp()
        return (P.sum(-1) - log_a.exp()).abs().sum(-1) + (P.sum(-2) - log_b.exp()).abs().sum(-1)
    for it in range(1, iters + 1):
        beta = log_b - lse(Mt, alpha)
        alpha = log_a - lse(M, beta)
        if tol > 0 and it % check_every == 0 and it < iters and error(alpha, beta).max() <= tol:
            break
    if symmetric:
        # Theirs updates rows then columns, then averages each potential with its update computed from the other's
        # *old* value: the rows move half-way, the columns' update from the unmoved rows is the columns themselves.
        # Ours updates columns then rows, so the same step moves beta half-way and leaves alpha (its update would
        # be alpha).
        beta = (beta + log_b - lse(Mt, alpha)) / 2
    err = error(alpha, beta)
    if not torch.isfinite(err).all():
        raise FloatingPointError(f"sinkhorn_log: NaN/inf plan (eps {eps.tolist()}); the costs hold NaN/inf or eps "
                                 "is too small for the dtype")
    if tol > 0 and err.max() > tol:  # a constant message, so Python shows it once, not every step
        warnings.warn(f"sinkhorn_log: marginal error above tol={tol} after {iters} iterations; raise the iterations "
                      "or eps (the error is in the returned err)")
    return M + alpha[..., :, None] + beta[..., None, :], err


def klot(K, K_star, eps=0.05, eps_star=0.005, iters=100, tol=0.0, compile=False):
    """KLOT (SOTAlign, the authors' loss): KLOT(K, K*) = KL(P* || P) = sum_ij P*_ij (log P*_ij - log P_ij).

    P = sinkhorn_log(-K, eps), P* = sinkhorn_log(-K*, eps*): the plans of the student and teacher similarities
    (cost = -similarity), uniform marginals, solved together as one batch without autograd. The gradient with
    respect to K is (P - P*) / eps (their Theorem 5.1, an envelope argument), put in by the straight-through form
    L = (value - t).detach() + t,  t = sum_ij (P - P*)_ij K_ij / eps  with (P - P*) detached.
    K: (n, m) student similarities <f(x_i), g(y_j)> (differentiable); K_star: (n, m) teacher similarities (constant).
    Returns (L, {"ot": KL value, "ot_err": P's marginal error, "ot_err_t": P*'s}).
    Paste with: sinkhorn_log; import math, warnings, torch.
    """
    with torch.no_grad():
        C = -torch.stack([K.detach(), K_star.to(K.dtype)])  # (2, n, m)
        eps_both = torch.tensor([eps, eps_star], dtype=K.dtype)  # in K's dtype: float32 eps would perturb float64
        log_P, err = sinkhorn_log(C, eps_both, iters=iters, tol=tol, compile=compile)
        P, P_star = log_P.exp()
        value = (P_star * (log_P[1] - log_P[0])).sum()
    t = ((P - P_star) * K).sum() / eps
    return (value - t).detach() + t, {"ot": value, "ot_err": err[0], "ot_err_t": err[1]}


def siglip(x, y, scale, bias, xu=None, yu=None):
    """SigLIP (Zhai et al. 2023, Eq. 1) averaged over its logits, as the authors' code (so their lambda holds):

        pairs only:  L = -(1/N^2) sum_{k,l} log sigmoid(z_kl (scale <x_k, y_l> + bias)),  z_kl = +1 if k = l, else -1
        (loss_supervised_sail; SAIL's). With unpaired negatives xu (n, d), yu (m, d) (loss_semisupervised_sail):
        L = (L_img + L_txt) / 2,  L_img = the same mean over the N x (N + m) logits of x against [y; yu],
                                  L_txt = the same mean over the N x (N + n) logits of y against [x; xu],
        so the pair block counts in both means, each unpaired block in one; unpaired against unpaired is not used.

    x, y: (N, d) normalised pair embeddings; scale, bias: scalars. Source: roschmsi/vl-alignment-thesis@62a7c18,
    optimal_transport/matching.py (MatchingModel). Returns (L, {"sig": L}).
    Paste with: import torch, torch.nn.functional as F."""
    def side(anchors, targets):  # (N, d), (N + k, d) -> the mean of -log sigmoid over the (N, N + k) logits
        logits = scale * anchors @ targets.T + bias
        z = -torch.ones_like(logits)
        z[:, :len(anchors)] += 2 * torch.eye(len(anchors), dtype=logits.dtype, device=logits.device)
        return -F.logsigmoid(z * logits).mean()
    if xu is None:
        loss = side(x, y)
    else:
        loss = (side(x, torch.cat([y, yu])) + side(y, torch.cat([x, xu]))) / 2
    return loss, {"sig": loss}


def infonce(x, y, scale, xu=None, yu=None):
    """CLIP's InfoNCE on N pairs (Radford et al. 2021): L = 1/2 [ CE(scale x Y^T, diag) + CE(scale y X^T, diag) ],
    Y = [y; yu], X = [x; xu]: with unpaired negatives each image also competes against the unpaired texts and each
    text against the unpaired images. x, y: (N, d), xu: (n, d), yu: (m, d) normalised, or None. Each CE is a mean
    over the N anchors, as CLIP's and STRUCTURE's (which fixes scale = 1 / 0.05: --tau 0.05 --fixed-tau).
    Paste with: import torch, torch.nn.functional as F."""
    X, Y = (x, y) if xu is None else (torch.cat([x, xu]), torch.cat([y, yu]))
    target = torch.arange(len(x), device=x.device)
    i2t, t2i = F.cross_entropy(scale * x @ Y.T, target), F.cross_entropy(scale * y @ X.T, target)
    return (i2t + t2i) / 2, {"nce": (i2t + t2i) / 2}


def structure(E, A, tau=0.05, levels=1):
    """STRUCTURE (Groger, Wen, Le, Brbic, NeurIPS 2025): keep one modality's neighbourhood structure in the aligned
    space. With X = centre(normalize(E)), Z = centre(normalize(A)) (rows L2-normalised, then the batch mean removed),

        P_E = softmax_rows(X X^T / tau),  P_A = softmax_rows(Z Z^T / tau),
        R = (1/L) sum_{l=1..L} (1/n) sum_i JS(P_E^l[i] || P_A^l[i]),
        JS(p || q) = KL(p || m) / 2 + KL(q || m) / 2,  m = (p + q) / 2;  P^l: l-step random-walk neighbourhoods.

    E: (n, De) frozen features (constant), A: (n, d) head outputs. Returns R (scalar). The authors' level weights and
    margin are left out (# not specified in the paper; we use their defaults: L = 1, equal weights, no margin).
    Paste with: import math, torch, torch.nn.functional as F.
    """
    def log_neighbours(Z):
        Z = F.normalize(Z, dim=-1)
        Z = Z - Z.mean(0)
        return torch.log_softmax(Z @ Z.T / tau, dim=-1)  # (n, n)
    log_PE, log_PA = log_neighbours(E.detach()), log_neighbours(A)
    PE, PA, R = log_PE.exp(), log_PA.exp(), 0.0
    QE, QA, log_QE, log_QA = PE, PA, log_PE, log_PA
    for level in range(1, levels + 1):
        if level > 1:  # P^l = P^(l-1) P; tiny floor so log 0 cannot appear
            QE, QA = QE @ PE, QA @ PA
            log_QE, log_QA = QE.clamp_min(1e-30).log(), QA.clamp_min(1e-30).log()
        log_M = torch.logaddexp(log_QE, log_QA) - math.log(2)
        R = R + ((QE * (log_QE - log_M)).sum(-1) + (QA * (log_QA - log_M)).sum(-1)).mean() / 2
    return R / levels


def objective(args: Args, z, scale, bias, K_star=None, frozen=None):
    """SOTAlign's stage-2 loss on one global batch -> (L, parts):

        L = L_pairs(f(x), g(y)) + lambda_OT KLOT(f(x_u) g(y_u)^T, K*)     [+ lambda_S (R_img + R_txt) / 2: STRUCTURE]

    z: [f(x), g(y)] of the N pairs, (N, d) each, then [f(x_u), g(y_u)] of the unpaired batch, (n, d) and (m, d), if
    any. L_pairs: siglip (or infonce), the unpaired embeddings its extra negatives with --unpaired-negatives.
    K_star: (n, m) teacher similarities of the unpaired batch (teacher_similarity), None without KLOT. frozen: the
    frozen features in z's order, for STRUCTURE's R (per modality, the pairs and the unpaired items together)."""
    negatives = z[2:] if args.unpaired_negatives else []
    if args.paired_loss == "siglip":
        loss, parts = siglip(z[0], z[1], scale, bias, *negatives)
    else:
        loss, parts = infonce(z[0], z[1], scale, *negatives)
    if args.lambda_structure:  # each modality over the whole batch, paired + unpaired (as SOTAlign's re-run)
        r_img = structure(torch.cat(frozen[0::2]), torch.cat(z[0::2]), args.structure_tau, args.structure_levels)
        r_txt = structure(torch.cat(frozen[1::2]), torch.cat(z[1::2]), args.structure_tau, args.structure_levels)
        parts["struct"] = (r_img + r_txt) / 2
        loss = loss + args.lambda_structure * parts["struct"]
    if K_star is not None:  # K: the student's cosine similarities of the unpaired images and texts
        l_ot, p_ot = klot(z[2] @ z[3].T, K_star, args.eps, args.eps_teacher, args.sinkhorn_iters, args.sinkhorn_tol,
                          args.compile)
        loss, parts = loss + args.lambda_ot * l_ot, {**parts, **p_ot}
    return loss, parts


# ---------------------------------------------------------------------------- train
CKPT_FORMAT = "sotalign-checkpoint/1"


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), the authors' optimiser:

        c = beta1 m + (1 - beta1) g,   theta <- theta - lr (sign(c) + wd theta),   m <- beta2 m + (1 - beta2) g

    with g the gradient and m its moving average (state "exp_avg", zeros at the start); the weight decay is decoupled
    (AdamW's form) and applies to every parameter given (the authors give all). Parameters without a gradient are
    left alone. Paste with: import torch."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                if not self.state[theta]:
                    self.state[theta]["exp_avg"] = torch.zeros_like(theta)
                m = self.state[theta]["exp_avg"]
                c = beta1 * m + (1 - beta1) * theta.grad
                theta.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * c.sign())
                m.mul_(beta2).add_(theta.grad, alpha=1 - beta2)


def make_optimizer(model, args: Args):
    """Lion, the authors' (main.py: Lion(model.parameters(), ...)): weight decay on every parameter; or CLIP's AdamW:
    none on gains, biases, the scale."""
    if args.optimizer == "lion":
        return Lion(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.wd)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=args.lr, betas=(args.beta1, args.beta2))


def train(args: Args, pairs: dict, UI, UT, teacher, rank, world, device, log):
    """Stage 2 on cached features -> (heads, metrics), or (None, None) when --stop-after-steps hit. pairs: the pair
    features {"image": (E, Di), "text": (C, Dt), "counts": (E,)}; UI (U, Di), UT (V, Dt): the unpaired features or
    None (stores or tensors); teacher: fit_teacher's heads. Each batch is read from the float16 stores (or, on a GPU
    they fit, the whole stores in float16: on_device) and cast to float32."""
    pair_images, pair_texts = on_device(pairs["image"], device), on_device(pairs["text"], device)
    counts = pairs["counts"].to(device)
    first = counts.cumsum(0) - counts  # (E,) row in pair_texts of each entity's first caption
    E = len(pair_images)
    # unpaired batches are drawn only when a term uses them: KLOT, the extra negatives, STRUCTURE
    unpaired = UI is not None and (args.lambda_ot > 0 or args.unpaired_negatives or args.lambda_structure > 0)

    def whole_ranks(n):  # a batch size that every rank takes an equal slice of
        return max(n // world, 1) * world
    n_pairs = whole_ranks(min(args.paired_batch, E))
    batch_sizes = (n_pairs,)  # per step: (pairs,) or (pairs, unpaired images, unpaired texts)
    if unpaired:
        unpaired_images, unpaired_texts = on_device(UI, device), on_device(UT, device)
        batch_sizes = (n_pairs, whole_ranks(min(args.unpaired_batch, len(UI))),
                       whole_ranks(min(args.unpaired_batch, len(UT))))
    if unpaired and args.lambda_ot > 0:  # copies: the caller's teacher heads stay where they are
        teacher = tuple(copy.deepcopy(head).to(device) for head in teacher)
    # not specified in the paper; we use epoch = one pass over the larger unpaired set (over the pairs without it)
    per_epoch = math.ceil(max(len(UI), len(UT)) / args.unpaired_batch) if unpaired else math.ceil(E / n_pairs)
    total = args.steps or args.epochs * per_epoch
    torch.manual_seed(args.seed)  # head init; identical on every rank (DDP also broadcasts rank 0's weights)
    model = Heads(pair_images.shape[-1], pair_texts.shape[-1], args).to(device)
    opt = make_optimizer(model, args)
    # warm-up over ceil(warmup * total) steps, as the authors' main.py (ceil(0.1 * total)), then cosine
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, max(1, math.ceil(args.warmup * total))))
    ckpt, step, metrics = Path(args.out) / "checkpoint.pt", 0, {}
    if args.resume and ckpt.is_file():
        step, metrics = load_checkpoint(ckpt, CKPT_FORMAT, RUN_ONLY, args, model, opt, sched, world)
        log(f"resumed {ckpt} at step {step}/{total}")
    elif args.resume:
        log(f"--resume: no checkpoint at {ckpt}; starting at step 0")
    ddp = DDP(model) if world > 1 else model

    def batch(X, idx):  # rows idx of X, (len(idx), D) float32 on the device
        return X[idx].to(device, torch.float32)

    def this_rank(idx):  # this rank's slice of a global batch
        return idx.view(world, -1)[rank]
    log(f"training {method_name(args, unpaired)}: {E} pairs, batches {batch_sizes} x {world} rank(s) -> {total} steps")
    tick, since = time.time(), step
    while step < total:
        ent = draw(args.seed, 0, E, n_pairs, step).to(device)  # (N,) paired entities
        # not specified in the paper; we use one random caption per paired image per step
        pick = torch.rand(n_pairs, generator=generator(args.seed, 3, step)).to(device)
        caption = first[ent] + (pick * counts[ent]).long()
        xi, xt = [batch(pair_images, this_rank(ent))], [batch(pair_texts, this_rank(caption))]
        if unpaired:
            image_ids = draw(args.seed, 1, len(UI), batch_sizes[1], step).to(device)  # (n,) unpaired images
            text_ids = draw(args.seed, 2, len(UT), batch_sizes[2], step).to(device)  # (m,) unpaired texts
            xi.append(batch(unpaired_images, this_rank(image_ids)))
            xt.append(batch(unpaired_texts, this_rank(text_ids)))
        zi, zt, scale, bias = ddp(torch.cat(xi), torch.cat(xt))  # one forward: DDP wants one per backward
        b = n_pairs // world
        z = [zi[:b], zt[:b], zi[b:], zt[b:]] if unpaired else [zi, zt]
        frozen = [xi[0], xt[0], *xi[1:], *xt[1:]]  # the frozen features in z's order (STRUCTURE compares with them)
        if world > 1:  # the losses need whole batches; gradients flow back to each rank's slice
            z = [Gather.apply(x) for x in z]
            frozen = [Gather.apply(x) for x in frozen] if args.lambda_structure else frozen
        K_star = None
        if unpaired and args.lambda_ot > 0:
            K_star = teacher_similarity(teacher, batch(unpaired_images, image_ids), batch(unpaired_texts, text_ids))
        try:
            loss, parts = objective(args, z, scale, bias, K_star, frozen)
        except FloatingPointError as e:
            stop(e, step, ckpt, "Raise --eps / --eps-teacher, lower --lr, or check the features for NaN.")
        if not torch.isfinite(loss):  # one sync per step, cheap next to the step; stops before the bad update
            stop(f"non-finite loss {loss.item()} ({ {k: v.item() for k, v in parts.items()} })", step, ckpt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not args.fixed_tau:  # deviation: we clamp a learned scale at 100 as CLIP (Radford et al. 2021); theirs not
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(100))
        step += 1
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == total:
            metrics = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if step % args.log_every == 0 or step == total:
            dt = (time.time() - tick) / (step - since)
            log(f"step {step}/{total} | loss {metrics['loss']:.4f} (" + " ".join(f"{k} {metrics[k]:.4g}" for k in parts)
                + f") | lr {sched.get_last_lr()[0]:.2e} | scale {scale.item():.2f} | {1000 * dt:.1f} ms/step"
                f" | {sum(batch_sizes) / dt:.0f} samples/s")
            tick, since = time.time(), step
        if rank == 0 and (step % args.ckpt_every == 0 or step == total):
            save_checkpoint(ckpt, CKPT_FORMAT, model, opt, sched, step, args, metrics, world)
        if step == args.stop_after_steps:
            log(f"stopping after step {step} (--stop-after-steps); continue with --resume")
            return None, None
    return model, metrics


# ---------------------------------------------------------------------------- export
def export(path, method, heads, kind, args: Args, scale, bias, metrics):
    """An aligner export evaluate.py loads (format: docs/USAGE.md section 6), written atomically. heads: (f, g)."""
    def entry(h):
        if kind == "affine":
            return head_state(h, kind, h.W.shape[0], h.W.shape[1])
        return head_state(h, kind, h[0].normalized_shape[0], args.dim, args.hidden, args.head_layers)
    weights = getattr(heads[0], "score_weights", None)  # CSA's rho: evaluate.py scores sum_i rho_i xh_i yh_i
    atomic_save({"format": "aligner/1", "method": method, "image_encoder": args.image_encoder,
                 "text_encoder": args.text_encoder, "image_head": entry(heads[0]), "text_head": entry(heads[1]),
                 "logit_scale": scale, "logit_bias": bias, "score_weights": None if weights is None else weights.cpu(),
                 "args": asdict(args), "metrics": metrics}, path)


def method_name(args: Args, unpaired: bool) -> str:
    """What the heads are: sotalign (KLOT on), structure (the STRUCTURE baseline), else <paired loss>-neg (the
    unpaired samples as extra negatives: the authors' semi-supervised SigLIP baseline) or <paired loss>-pairs."""
    if unpaired and args.lambda_ot > 0:
        return "sotalign"
    if args.lambda_structure:
        return "structure"
    return f"{args.paired_loss}-{'neg' if unpaired and args.unpaired_negatives else 'pairs'}"


def r1(m) -> str:
    return f"i2t {m['i2t_R@1']:.3f} t2i {m['t2i_R@1']:.3f}"


# ---------------------------------------------------------------------------- main
def check_run(args: Args, sizes: list, images: list, texts=(), world=1):
    """Everything checkable before extraction and before anything is written into --out; DataError if not.
    images: every training image (pairs and unpaired), which no requested evaluation may score; texts: the unpaired
    texts, none of which may be an evaluation caption."""
    check_out(args, CKPT_FORMAT, RUN_ONLY, world)
    for flag, n in zip(("--pairs", "--unpaired-images", "--unpaired-texts"), sizes):  # the teacher needs 2 images
        if n < 2:
            raise DataError(f"{flag}: {n} {'entity' if flag == '--pairs' else 'item'}; training needs at least 2")
    if args.eval:  # no evaluate.py beside this file, an unknown task, or a train/test leak: refused now
        import_evaluate(__file__).check_training_images(args.eval, args.dataset_root, images, texts)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args.device, args.nproc_per_node, argv)
    log = print if rank == 0 else (lambda *a, **k: None)
    out, excluded = Path(args.out), read_exclude(args.exclude) if args.exclude else set()
    keys = (args.image_key or None, args.caption_key or None, args.sep or None, args.skip_bad_rows)
    pairs = read_pairs(args.pairs, *keys, image_root=args.image_root or None, subset=args.subset,
                       cache_dir=args.cache_dir)
    pairs = without(pairs, excluded)
    heldout = read_pairs(args.heldout, *keys) if args.heldout else None
    images = texts = None
    if args.unpaired_images:
        images = read_unpaired(args.unpaired_images, "image", args.image_key, args.sep, args.skip_bad_rows,
                               args.cache_dir)
        texts = read_unpaired(args.unpaired_texts, "text", args.caption_key, args.sep, args.skip_bad_rows,
                              args.cache_dir)
        images = [p for p in images if image_identity(p) not in excluded]
    if args.unpaired_from:
        source = read_pairs(args.unpaired_from, *keys, cache_dir=args.cache_dir)
        images, texts = halves(without(source, excluded), pairs.images)
    log(f"{args.pairs}: {len(pairs.images)} entities, {sum(map(len, pairs.captions))} captions"
        + (f"; unpaired: {len(images)} images, {len(texts)} texts" if images else "; no unpaired data"))
    check_run(args, [len(x) for x in (pairs.images, images, texts) if x is not None], pairs.images + (images or []),
              texts or (), world)
    encoders = {}  # the frozen encoders loaded so far (features loads one at its first missing shard)

    def pair_features(name, p):  # stores: {"image": (E, Di) clean views, "text": (C, Dt) all captions, "counts": (E,)}
        captions = [c for cs in p.captions for c in cs]
        return {"image": features(name, "image", p.images, args, encoders, rank, world, device),
                "text": features(name, "text", captions, args, encoders, rank, world, device),
                "counts": torch.tensor([len(c) for c in p.captions])}

    def dense(stores):  # stage 1 and the R@1 read the pairs whole, in float32 (the small sets)
        return {**stores, "image": stores["image"].tensor().float(), "text": stores["text"].tensor().float()}
    pair_feats = pair_features("pairs", pairs)  # stage 2 reads its batches from these stores
    heldout_feats = dense(pair_features("heldout", heldout)) if heldout else None
    UI = UT = None
    if images:
        UI = features("unpaired", "image", images, args, encoders, rank, world, device)
        UT = features("unpaired", "text", texts, args, encoders, rank, world, device)
    encoders.clear()  # frees the frozen encoders before training
    if args.eval and args.near_copy_cosine < 1:  # a re-encoded or resized test image: other bytes, caught here
        training = [(store, names) for store, names in ((pair_feats["image"], pairs.images), (UI, images))
                    if store is not None]
        import_evaluate(__file__).check_near_copies(args.eval, args.dataset_root, args.cache_dir, args.image_encoder,
                                                    training, device, args.near_copy_cosine)
    # stage 1: the teacher, closed form, fitted in float64
    pair_dense = dense(pair_feats)
    teacher = fit_teacher(pair_dense, args.teacher, args.teacher_reg, args.csa_dim, args.eig_floor,
                          args.teacher_captions)
    scores = {"train": recall_at_1(teacher, pair_dense)}
    if heldout_feats:
        scores["heldout"] = recall_at_1(teacher, heldout_feats)
    log(f"teacher {args.teacher}: " + " | ".join(f"{k} R@1 {r1(v)}" for k, v in scores.items()))
    # stage 2: the heads, SigLIP on the pairs + lambda KLOT on the unpaired batches (objective)
    model, metrics = train(args, pair_feats, UI, UT, teacher, rank, world, device, log)
    results, method = {}, method_name(args, images is not None)
    if model is not None and rank == 0:  # the run's results are written only now, each atomically
        if heldout_feats:
            metrics["heldout"] = recall_at_1((model.image_head, model.text_head), heldout_feats)
            log(f"heads: heldout R@1 {r1(metrics['heldout'])}")
        export(out / "teacher.pt", "csa" if args.teacher == "csa" else "sotalign-teacher", teacher, "affine", args,
               1.0, None, scores)
        export(out / "aligner.pt", method, (model.image_head, model.text_head), "mlp", args,
               model.logit_scale.exp().item(), None if model.logit_bias is None else model.logit_bias.item(), metrics)
        log(f"exported {out / 'aligner.pt'} ({method}) and {out / 'teacher.pt'}")
        for name in ("eval.json", "eval_teacher.json"):  # an --overwrite run: no earlier scores beside the new export
            (out / name).unlink(missing_ok=True)
        if args.eval:  # evaluate.py on both exports
            results = run_eval(__file__, args, out / "aligner.pt", out / "eval.json", device)
            teacher_results = run_eval(__file__, args, out / "teacher.pt", out / "eval_teacher.json", device)
            log(f"teacher: {teacher_results['summary']}")
        write_manifest(out / "manifest.json", args, device, world, entities=len(pairs.images),
                       metrics=metrics, eval=results.get("mean"), **{"teacher_R@1": scores})
    leave(world)
    if model is not None:
        log(f"{method} (sotalign.py) | seed {args.seed} | {metrics['step']} steps | final loss {metrics['loss']:.4f}"
            + (f" | {results['summary']}" if results else ""))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a user error is one line and status 2; any other exception is a bug: its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
