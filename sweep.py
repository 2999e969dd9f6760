"""The papers' experiment in one command: every method at every paired-data budget and seed, each fairly selected on a
validation split, scored on the held-out tasks with evaluate.py's metrics; a JSON line per run, a Markdown table of
mean +- std over seeds, a plot of score against the number of pairs, paired bootstrap intervals.

Both papers claim that with little paired data their method beats the baselines (SMA, arXiv 2605.12872; SOTAlign,
arXiv 2602.23353). This drives sma.py and sotalign.py in-process on one feature cache:

  python sweep.py --data examples/emoji/train.csv --depictions examples/emoji/depictions.csv --views 3 \
      --heldout emoji_all --val-tasks emoji_val \
      --image-encoder offline:efficientnet-lite0 --text-encoder offline:all-minilm-l6-v2 \
      --budgets 5%,25%,100% --seeds 0,1,2 --claim-seeds 0,1,2,3,4 --claim-budgets 100% --claim-views 1,3 \
      --threads 1 --methods multipos,flqmi,teacher,siglip-pairs,sotalign,infonce,siglip,csa,structure,sotalign-neg \
      --out bench/sweep_artists
  (bench/sweep_artists.md has its time on 2 CPU cores, extraction included, summed over the invocations that built it)
  (the same command again continues a cut sweep: finished runs are read back from <out>.jsonl, never redone)

Writes <out>.jsonl (one row per finished run, appended and fsynced), <out>.md (tables), <out>.png (plots). A method
is one entry of METHODS (how it trains + its grid); every method is scored by the same code (evaluate.py's metrics).
Runs call sma.train / sotalign.train directly and score their heads in memory (no aligner.pt is written).

Protocol (every choice here is ours, not the papers'):
- Features: sma.features once per (data, encoder pair, K views): every entity's K views (view 0 = the encoder's clean
  eval transform) and all its captions. SMA methods train on all K views; the SOTAlign methods (teacher, siglip-pairs,
  sotalign) see view 0 only, which is what sotalign.py itself extracts. Held-out tasks: evaluate.py's readers,
  encoders and cache (<cache-dir>/eval), so the raw features are shared with `python evaluate.py`.
- Validation: --val-tasks, evaluate.py tasks on validation entities of their own (the emoji set's emoji_val: the
  same four tasks as the held-out ones, on 206 entities in no training file), or else --val-pct % of the --data
  entities, chosen by sha1 of the image path; fixed, the same for every seed and budget, never trained on. The
  held-out tasks are never used to choose anything.
- Views: with --depictions an entity's K views are its drawings by K artists (the emoji set: Noto, Twemoji,
  Fluent), else view 0 and augmentations of it. Held-out tasks after the first of each kind are scored under a tag
  (emoji_zeroshot_openmoji -> zs_acc1:openmoji: an artist never seen in training).
- Budgets: a budget is a number (`100`) or a percentage (`5%`) of the remaining training entities. The paired set of
  a budget is a prefix of a permutation of the training entities drawn from the seed, so budgets are nested within a
  seed. For sotalign the training entities outside the budget become its unpaired data, cut into two disjoint halves
  (images of the first half, all captions of the second), so no image meets its own caption as "unpaired"; at 100%
  there is none left and sotalign is not run (it would be siglip-pairs).
- Selection: per method and budget, every config of the method's grid (METHODS) is trained on seed 0's paired set and
  scored on the validation split with two signals of the kind of the reported metrics: zero-shot acc1 on the
  validation entities whose class (--val-classes: image,class with the class folders of the held-out zero-shot task,
  whose class names and templates are used) is one of the held-out task's classes, and validation retrieval R@1
  ((i2t + t2i) / 2). Each signal picks its own config (ties: the first tried); the chosen configs are rerun
  on every seed. Held-out zero-shot acc1 is reported from the zero-shot-selected runs, retrieval R@1 and the modality
  gap (held-out retrieval pairs) from the R@1-selected runs. Selecting on seed 0 only and reusing it for all seeds
  saves CPU time; the chosen configs are in <out>.jsonl and <out>.md.
- Grid edges (`select`, the same rule for every method): a numeric setting (EDGE: lr, steps, tau, lambda_ot,
  lambda_structure, reg) with >= 2 values tried whose chosen value is the smallest or largest tried gets one more
  select run one step past it (x3 lr, lambda, reg; x2 steps; the next value of TAUS), the others held at the chosen
  values, and the signal picks again; until every choice is interior or at a hard bound (lr 1e-6..0.1, steps
  10..STEP_CAP, tau 0.01..1, lambda and reg 0), at most --edge-rounds extensions per choice. <out>.md lists the values
  tried per choice and marks those left on an edge or at a bound.
- Temperature: for flqmi / infonce / multipos tau is fixed (sma.py --fixed-tau) and selected from the grid: learned
  at the heads' lr it moves by < 15% in 150 steps (bench/sweep_tau_emoji.md), so its initial value is what matters.
  SigLIP's scale and bias stay learned (the grid sets the initial scale of sma.py's siglip; sotalign.py's starts at
  its default, scale 20, bias -10, as the authors' runs). STRUCTURE's InfoNCE is fixed at tau = 0.05, as its authors.
- Heads and steps: d = 128 (--dim), SMA hidden 256 (--hidden), batch 128 entities (--batch-size; the unpaired
  batch too), sotalign's heads 1 layer (the authors'); steps are set by the grid and are the same at every budget
  (SMA's epochs are derived from them).
- Uncertainty: mean +- std over seeds per cell; for the headline comparisons (COMPARE) a paired bootstrap over
  entities and seeds (`entity_seed_bootstrap`): each resample draws the held-out entities (all of an entity's
  drawings, or its image with all its descriptions) and the seeds with replacement, the same seeds for both methods
  (a seed fixes the same pairs for both), N_BOOT resamples, 95% percentile interval of the difference. It covers test
  sampling and training noise, not the selection's (one seed, one validation split).
- SMA's claim: FLQMI against multi-positive InfoNCE at a matched config (same lr, steps, fixed tau, heads) with
  K in --claim-views views (the first K) and M = 1 and M = 5 captions per step, --claim-seeds seeds, at each
  --claim-budgets budget, once at multipos's and once at flqmi's zero-shot-selected config (so neither method runs
  only at the other's optimum). The same runs give K = max - K = min per loss: several depictions against one.
- Resolution and words: each interval comes with MDD80 = (1.96 + 0.84) x its bootstrap SE, the difference a test at
  the 5% level detects with 80% power, and the number of entities and seeds behind it; `verdict` turns it into the
  one set of words (better / worse, or confirmed / refuted for a claim, only when it excludes 0; tie within +-x for
  x <= TIE; else not resolved) that <out>.md, the README and docs/RESULTS.md use.
"""
import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import sma
import sotalign


class UserError(ValueError):
    """A bad command line or input: printed as one line, exit status 2."""


class StopSweep(Exception):
    """--stop-after-runs reached: the sweep stops here; the same command continues it."""


# ---------------------------------------------------------------------------- methods
# A method is one entry: how it trains (a function of the paired / unpaired features, its config and the seed that
# returns (image head, text head)) and the grid its config is selected from. Grids are small so that 7 methods x 5
# budgets fit ~30 min on 2 busy CPU cores (README, "Results").


def train_sma(cfg, data, seed, common):
    """sma.train on the paired entities: data["sma"] = {"image": (E, K, Di), "text": (C, Dt), "counts": (E,)}."""
    feats = data["sma"]
    if cfg.get("K"):  # the claim cell: the first K of the entity's views (views 0..2 are its 3 depictions)
        feats = {**feats, "image": feats["image"][:, :cfg["K"]]}
    E, B = len(feats["image"]), min(common["batch"], len(feats["image"]))
    epochs = math.ceil(cfg["steps"] / max(E // B, 1))  # steps are what the grid sets, whatever the budget
    args = sma.Args(data="-", image_encoder=common["image_encoder"], text_encoder=common["text_encoder"],
                    views=cfg.get("K", common["views"]), captions=cfg.get("M", common["captions"]), loss=cfg["loss"],
                    eta=cfg.get("eta", 1.0), tau=cfg.get("tau", 0.0), fixed_tau=not cfg.get("learn_tau", True),
                    dim=common["dim"], hidden=common["hidden"], epochs=epochs, batch_size=B, lr=cfg["lr"], seed=seed,
                    out=common["tmp"], device="cpu", log_every=10 ** 9, ckpt_every=10 ** 9)
    model, metrics = sma.train(args, feats, 0, 1, "cpu", log=lambda *a: None)
    return model.image_head, model.text_head, metrics["step"]


def train_teacher(cfg, data, seed, common):
    """SOTAlign's stage 1 alone (kind cca, or csa with `dim` directions; CSA's image head carries its score weights):
    sotalign.fit_teacher."""
    return (*sotalign.fit_teacher(data["pairs"], cfg.get("kind", "cca"), cfg["reg"], cfg.get("dim", 0)), 0)


def train_sotalign(cfg, data, seed, common):
    """sotalign.train at sotalign.py's defaults (the authors': Lion, betas 0.9 / 0.99, wd 1e-5, 10% warm-up, SigLIP
    at scale 20, bias -10) but for the config's entries: SigLIP (or cfg's paired loss) on the pairs, + lambda KLOT on
    the unpaired halves when cfg["unpaired"]."""
    pairs = data["pairs"]
    UI, UT = (data["unpaired_images"], data["unpaired_texts"]) if cfg.get("unpaired") else (None, None)
    args = sotalign.Args(pairs="-", image_encoder=common["image_encoder"], text_encoder=common["text_encoder"],
                         lambda_ot=cfg.get("lambda_ot", 1e-4), eps=cfg.get("eps", 0.05), dim=common["dim"],
                         unpaired_negatives=cfg.get("negatives", False), paired_loss=cfg.get("loss", "siglip"),
                         tau=cfg.get("tau", 0.0), fixed_tau=cfg.get("fixed_tau", False),
                         lambda_structure=cfg.get("lambda_structure", 0.0),
                         head_layers=1, paired_batch=common["batch"], unpaired_batch=common["batch"],
                         steps=cfg["steps"], lr=cfg["lr"], seed=seed, out=common["tmp"], device="cpu", compile=False,
                         log_every=10 ** 9, ckpt_every=10 ** 9)
    use_teacher = UI is not None and args.lambda_ot > 0
    teacher = sotalign.fit_teacher(pairs, "cca", args.teacher_reg, floor=args.eig_floor) if use_teacher else None
    model, metrics = sotalign.train(args, pairs, UI, UT, teacher, 0, 1, "cpu", log=lambda *a: None)
    return model.image_head, model.text_head, metrics["step"]


@dataclass
class Method:
    train: callable
    fixed: dict  # config entries that define the method
    grid: dict  # name -> values; the product is searched
    needs_unpaired: bool = False


# not specified in the papers; we use these grids (kept small for the CPU; lr, steps and the temperature for every
# trained method, eta / lambda where the method has them); a choice on a grid's edge is extended (EDGE, `select`)
# Starting grids, centred where the earlier sweeps chose (bench/sweep_artists.md of 2026-12-01: SMA steps and tau at
# the top, the SOTAlign rows' lr and lambda at the top); the grid-edge rule (`select`) extends any choice on an edge
SMA_GRID = {"lr": [1e-3, 3e-3], "steps": [150, 300], "tau": [0.1, 0.2, 0.5]}
METHODS = {
    "flqmi": Method(train_sma, {"loss": "flqmi", "learn_tau": False}, {**SMA_GRID, "eta": [1.0]}),
    "flvmi": Method(train_sma, {"loss": "flvmi", "learn_tau": False}, SMA_GRID),
    "infonce": Method(train_sma, {"loss": "infonce", "learn_tau": False}, SMA_GRID),
    "multipos": Method(train_sma, {"loss": "multipos", "learn_tau": False}, SMA_GRID),
    # siglip: tau is the initial 1/scale; scale and bias stay learned (SAIL's loss on our GELU MLP heads, not SAIL's
    # gated StarMLP head)
    "siglip": Method(train_sma, {"loss": "siglip"}, {"lr": [1e-3, 3e-3], "steps": [150, 300], "tau": [0.05, 0.1]}),
    "teacher": Method(train_teacher, {}, {"reg": [0.01, 0.1, 1.0]}),
    # SOTAlign's rows train at sotalign.py's defaults, the authors' (Lion, wd 1e-5, 10% warm-up, SigLIP mean-normalised
    # from scale 20, bias -10; docs/FAITHFULNESS.md); the grids start where earlier sweeps chose, above the authors'
    # lr 1e-4 and lambda 1e-4, which the grid-edge rule reaches when a choice falls to the bottom
    "siglip-pairs": Method(train_sotalign, {}, {"lr": [3e-4, 1e-3, 3e-3], "steps": [300, 600]}),
    "sotalign": Method(train_sotalign, {"unpaired": True},
                       {"lr": [3e-4, 1e-3, 3e-3], "steps": [300, 600], "lambda_ot": [1e-3, 1e-2, 1e-1]},
                       needs_unpaired=True),
    # the papers' other baselines (sotalign.py's options): CSA's CCA is unregularised (reg 0), its score rho-weighted
    "csa": Method(train_teacher, {"kind": "csa"}, {"reg": [0.0, 1e-3, 0.01, 0.1], "dim": [32, 128, 0]}),
    # the authors' own setting: the unpaired samples are also SigLIP negatives (their lambda 1e-4 was tuned so)
    "sotalign-neg": Method(train_sotalign, {"unpaired": True, "negatives": True},
                           {"lr": [3e-4, 1e-3, 3e-3], "steps": [300, 600], "lambda_ot": [1e-3, 1e-2, 1e-1]},
                           needs_unpaired=True),
    # STRUCTURE as it and SOTAlign's re-run train: CLIP InfoNCE at a fixed tau = 0.05 on the pairs, the regulariser
    # over paired + unpaired features, lambda 10 theirs
    "structure": Method(train_sotalign, {"unpaired": True, "lambda_ot": 0.0, "loss": "infonce", "tau": 0.05,
                                         "fixed_tau": True},
                        {"lr": [3e-4, 1e-3, 3e-3], "steps": [100, 300], "lambda_structure": [1.0, 10.0]},
                        needs_unpaired=True),
}
# the headline comparisons that get a paired bootstrap interval: (method, baseline)
COMPARE = [("flqmi", "multipos"), ("flqmi", "infonce"), ("sotalign", "siglip-pairs"), ("sotalign", "teacher"),
           ("sotalign", "structure"), ("flqmi", "csa")]
HEADLINE = [("zs_acc1", "zero-shot acc1 (held-out)"), ("R@1", "retrieval R@1 (held-out)"),
            ("gap", "modality gap (held-out retrieval)")]


def configs(method: Method):
    keys = list(method.grid)
    return [{**method.fixed, **dict(zip(keys, values))} for values in itertools.product(*method.grid.values())]


# ---------------------------------------------------------------------------- the grid-edge rule
@dataclass(frozen=True)
class Edge:
    """How a numeric setting's grid extends past a chosen value that is the smallest or largest tried: one step of
    x `factor` (or the next value of `ladder`), never past the hard bounds [lo, hi]; a step down below `snap` goes to
    lo (lambda and reg: to 0, which a factor never reaches)."""
    factor: float = 0.0
    ladder: tuple = ()
    lo: float = 0.0
    hi: float = math.inf
    snap: float = 0.0


STEP_CAP = 1200  # steps never go past this (x2 from 300: 600, 1200): a cost bound on 2 CPU cores, the report names it
TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the tau ladder (tau = 1 / initial logit scale for siglip)
EDGE = {"lr": Edge(factor=3, lo=1e-6, hi=0.1), "steps": Edge(factor=2, lo=10, hi=STEP_CAP),
        "tau": Edge(ladder=TAUS, lo=TAUS[0], hi=TAUS[-1]),
        "lambda_ot": Edge(factor=3, lo=0.0, hi=10.0, snap=1e-6),
        "lambda_structure": Edge(factor=3, lo=0.0, hi=1e3, snap=1e-3),
        "reg": Edge(factor=3, lo=0.0, hi=100.0, snap=1e-4)}
# not extended: eta (one value, FLQMI's default), csa's dim (0 = all components: not an ordered scale)
EDGE_ROUNDS = 12  # at most this many extensions per choice; a choice still on an edge then is marked so


def next_value(rule: Edge, v, up):
    """The value one step past v (up or down) under `rule`, or None when v is at the hard bound that way."""
    if rule.ladder:
        on = [x for x in rule.ladder if (x > v if up else x < v)]
        nxt = (min(on) if up else max(on)) if on else (rule.hi if up else rule.lo)
    else:
        nxt = v * rule.factor if up else v / rule.factor
        if not up and nxt < rule.snap:
            nxt = rule.lo
    nxt = min(max(nxt, rule.lo), rule.hi)
    if nxt == v:
        return None
    return int(round(nxt)) if isinstance(v, int) else float(f"{nxt:.3g}")


def select(candidates, score, tune, rounds=EDGE_ROUNDS):
    """The grid-edge rule (issue 24). candidates: configs in grid order; score(config) -> validation score (higher
    is better) or None (not run, and not to be run: the report reading a sweep back); tune: {name: Edge} of the
    numeric settings to tune. Picks the best config (ties: the first tried); while a tuned setting with >= 2 values
    tried sits on the smallest or largest of them, scores the config one step past it (the others held at the chosen
    values) and picks again, until every such choice is interior, at a hard bound, or `rounds` extensions are spent.
    -> (best config, {name: {"tried": sorted values, "chosen": v, "mark": "interior" | "bound" | "edge"}}), where
    "edge" is a choice on an edge that was not extended (not run, or out of rounds), or None when nothing scored."""
    tried, seen = [], set()
    for c in candidates:
        k = json.dumps(c, sort_keys=True)
        if k not in seen and (s := score(c)) is not None:
            seen.add(k)
            tried.append((c, s))
    if not tried:
        return None, {}
    unrun, extended = set(), 0
    while True:
        best = max(tried, key=lambda cs: cs[1])[0]  # max keeps the first of ties
        if extended == rounds:
            break
        for name, rule in tune.items():
            values = sorted({c[name] for c, _ in tried if name in c})
            if name in unrun or name not in best or len(values) < 2 or values[0] < best[name] < values[-1]:
                continue
            nxt = next_value(rule, best[name], up=best[name] == values[-1])
            if nxt is None:
                continue  # at a hard bound
            c = {**best, name: nxt}
            if (s := score(c)) is None:
                unrun.add(name)
                continue
            tried.append((c, s))
            extended += 1
            break  # pick again with the new config
        else:
            break  # nothing extended: every choice is interior, at a bound or not to be run
    info = {}
    for name, rule in tune.items():
        values = sorted({c[name] for c, _ in tried if name in c})
        if name not in best or len(values) < 2:
            continue
        v = best[name]
        interior = values[0] < v < values[-1]
        at_bound = not interior and next_value(rule, v, up=v == values[-1]) is None
        info[name] = {"tried": values, "chosen": v, "mark": "interior" if interior else "bound" if at_bound else "edge"}
    return best, info


# ---------------------------------------------------------------------------- data
def parse_budgets(spec, n):
    """'5%,10%,100' -> [(label, count)], counts clipped to [2, n] (a contrastive batch needs 2)."""
    out = []
    for b in (s.strip() for s in spec.split(",") if s.strip()):
        k = round(float(b[:-1]) / 100 * n) if b.endswith("%") else int(b)
        out.append((b, max(2, min(n, k))))
    return out


def subset(F_, ents):
    """Features of the entities `ents` (list of ids): {"image": (e, K, Di), "text": (c, Dt), "counts": (e,)}."""
    first = F_["counts"].cumsum(0) - F_["counts"]
    caps = torch.cat([torch.arange(first[e], first[e] + F_["counts"][e]) for e in ents])
    return {"image": F_["image"][ents], "text": F_["text"][caps], "counts": F_["counts"][ents]}


def run_data(F_, train_ids, n_paired, seed, needs_unpaired):
    """The paired set of a budget (a seed-fixed prefix: nested budgets) and, for sotalign, the unpaired halves."""
    order = [train_ids[i] for i in torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))]
    paired = subset(F_, order[:n_paired])
    data = {"sma": paired, "pairs": {**paired, "image": paired["image"][:, 0]}, "n_pairs": int(paired["counts"].sum())}
    if needs_unpaired:
        rest = order[n_paired:]
        half = len(rest) // 2  # two disjoint halves: images of one, captions of the other
        data["unpaired_images"] = F_["image"][rest[:half], 0]
        data["unpaired_texts"] = subset(F_, rest[half:])["text"]
    return data


def val_split(pairs, pct):
    """Entity ids of (train, validation): an entity is validation when sha1(image path) % 100 < pct."""
    val = [i for i, p in enumerate(pairs.images)
           if int(hashlib.sha1(Path(p).name.encode()).hexdigest(), 16) % 100 < pct]
    vs = set(val)
    return [i for i in range(len(pairs.images)) if i not in vs], val


# ---------------------------------------------------------------------------- scoring
def hits_retrieval(zi, zt, text_image):
    """Per-item R@1 hits: i2t (I,) and t2i (T,) bools (evaluate.py's ranks, its tie rule)."""
    images = torch.arange(len(zi))
    return (evaluate.query_ranks(zi, zt, images, text_image) == 0,
            evaluate.query_ranks(zt, zi, text_image, images) == 0)


def score(heads, task, with_hits=False):
    """Scores of (image head, text head) on one task's cached raw features (`load_tasks`); every key carries the
    task's tag ("" for the first task of each kind, e.g. ":openmoji" for the others: `tags`)."""
    heads = [h.eval() for h in heads]
    with torch.no_grad():
        zi, zt = (F.normalize(h(x.float()), dim=-1) for h, x in zip(heads, (task["image"], task["text"])))
    ranked = evaluate.weighted_by(zi, getattr(heads[0], "score_weights", None))  # CSA ranks by its rho-weighted score
    out, hits = {}, {}
    if task["kind"] == "zeroshot":
        W = evaluate.zeroshot_classifier(zt.view(task["n_classes"], -1, zt.shape[-1]))  # (C, d)
        m = evaluate.classification_metrics(ranked, W, task["labels"])
        gap = evaluate.modality_gap(zi, W, torch.arange(len(zi)), task["labels"])
        out = {"zs_acc1": m["acc1"], "zs_acc5": m["acc5"], "zs_gap": gap["modality_gap"]}
        hits["zs"] = evaluate.query_ranks(ranked, W, task["labels"], torch.arange(len(W))) == 0
    else:
        m = evaluate.retrieval_metrics(ranked, zt, task["text_image"])
        gap = evaluate.modality_gap(zi, zt, task["text_image"], torch.arange(len(zt)))
        out = {"R@1": (m["i2t_R@1"] + m["t2i_R@1"]) / 2, "i2t_R@1": m["i2t_R@1"], "t2i_R@1": m["t2i_R@1"],
               "gap": gap["modality_gap"], "matched_cosine": gap["matched_cosine"]}
        hits["i2t"], hits["t2i"] = hits_retrieval(ranked, zt, task["text_image"])
    tag = task.get("tag", "")
    out = {k + tag: v for k, v in out.items()}
    if with_hits:
        out["hits"] = {k + tag: "".join("1" if b else "0" for b in v.tolist()) for k, v in hits.items()}
    return out


def score_all(heads, tasks, with_hits=False):
    out = {}
    for t in tasks.values():
        r = score(heads, t, with_hits)
        out["hits"] = {**out.get("hits", {}), **r.pop("hits", {})}
        out.update(r)
    if not out["hits"]:
        out.pop("hits")
    return out


def tags(names_kinds):
    """[(task name, kind)] -> {name: tag}: "" for the first task of each kind (the metrics selection and the
    headline use), ":<rest>" for a later one whose name extends the first's (emoji_zeroshot_openmoji:
    ":openmoji"), else ":<name>"."""
    first, out = {}, {}
    for name, kind in names_kinds:
        base = first.setdefault(kind, name)
        out[name] = "" if name == base else ":" + (name[len(base):].strip("_") if name.startswith(base) else name)
    return out


def load_tasks(spec, common, cache_dir):
    """Held-out tasks through evaluate.py's readers and feature cache -> {name: task dict of raw features}."""
    eargs = evaluate.Args(aligner="-", tasks=spec, cache_dir=cache_dir, device="cpu", workers=0)
    model = evaluate.Model("sweep", {"image": common["image_encoder"], "text": common["text_encoder"]},
                           {}, "cpu")
    tasks, resolved = {}, evaluate.resolve_tasks(spec)
    tag = tags([(name, task.kind) for name, task in resolved.items()])
    for name, task in resolved.items():
        data, skipped = evaluate.read_task(name, task, eargs)
        if skipped:
            raise UserError(f"--heldout: {skipped}")
        cache = Path(cache_dir) / "eval"
        root = str(evaluate.task_root(name, task, eargs).resolve())
        raw = evaluate.image_features(model, name, task, data, eargs)  # evaluate.py's cache and key
        if task.kind == evaluate.CLS:
            texts = [evaluate.fill(t, c) for c in data.classnames for t in data.templates]
        else:
            texts = [c for caps in data.captions for c in caps]
        key = evaluate.fingerprint([texts, common["text_encoder"]])
        text = evaluate.cached(cache / f"text-{key}.pt", lambda: evaluate.encode_texts(model.encoder("text"), texts,
                                                                                      eargs, f"{name} texts"))
        t = {"image": raw["features"], "text": text, "root": root, "tag": tag[name]}
        if task.kind == evaluate.CLS:
            t.update(kind="zeroshot", labels=raw["labels"], n_classes=len(data.classnames),
                     classes=list(getattr(data.images, "classes", data.classnames)), classnames=data.classnames,
                     templates=data.templates)
        else:
            t.update(kind="retrieval", text_image=torch.tensor([i for i, c in enumerate(data.captions) for _ in c]))
        tasks[name] = t
    model.encoders.clear()
    return tasks


def task_index(spec):
    """{metric: what its intervals and chance level need} of the held-out tasks `spec` (metric: zs_acc1 or R@1 with
    the task's tag), read from their files (no features, no encoder): zero-shot: "labels" (N,) and "entity" (N,),
    the entity of each image, in the order its hits are stored (images of the same class and file name are one
    entity: examples/emoji's images/<artist>/<id>.png are one emoji's drawings); retrieval: "n_images" and
    "text_image" (T,), the image (one per entity) of each caption."""
    eargs = evaluate.Args(aligner="-", tasks=spec, device="cpu", workers=0)
    resolved = evaluate.resolve_tasks(spec)
    tag = tags([(name, task.kind) for name, task in resolved.items()])
    out = {}
    for name, task in resolved.items():
        data, skipped = evaluate.read_task(name, task, eargs)
        if skipped:
            raise UserError(f"--heldout: {skipped}")
        if task.kind == evaluate.CLS:
            labels = data.labels if data.labels is not None else getattr(data.images, "labels", None)
            if labels is None or len(labels) != len(data.files):
                raise UserError(f"--heldout {name}: its reader lists no label per image file; the intervals need "
                                "them (use a folder or an image,class list)")
            keys = [(int(y), Path(f).stem) for f, y in zip(data.files, labels)]
            ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
            out["zs_acc1" + tag[name]] = {"kind": "zeroshot", "labels": torch.tensor([int(y) for y in labels]),
                                          "entity": torch.tensor([ids[k] for k in keys])}
        else:
            out["R@1" + tag[name]] = {"kind": "retrieval", "n_images": len(data.captions),
                                      "text_image": torch.tensor([i for i, c in enumerate(data.captions) for _ in c])}
    return out


def val_tasks(pairs, F_, val_ids, classes_csv, heldout):
    """Validation tasks on the validation entities: retrieval (view 0 + all captions) and, with --val-classes,
    zero-shot over the held-out zero-shot task's classes, names and templates."""
    V = subset(F_, val_ids)
    tasks = {"val_retrieval": {"kind": "retrieval", "image": V["image"][:, 0], "text": V["text"],
                               "text_image": torch.repeat_interleave(torch.arange(len(val_ids)), V["counts"])}}
    zs = [t for t in heldout.values() if t["kind"] == "zeroshot"]
    if classes_csv and zs:
        z = zs[0]
        base = Path(classes_csv).resolve().parent
        with open(classes_csv, encoding="utf-8") as f:
            cls = {str((base / r["image"]).resolve()): r[next(k for k in r if k != "image")] for r in csv.DictReader(f)}
        keep = [(j, z["classes"].index(cls[pairs.images[i]])) for j, i in enumerate(val_ids)
                if cls.get(pairs.images[i]) in z["classes"]]
        if len(keep) < 2:
            raise UserError(f"--val-classes {classes_csv}: {len(keep)} validation entities have a class of the "
                             f"held-out zero-shot task; need >= 2")
        tasks["val_zeroshot"] = {"kind": "zeroshot", "image": V["image"][[j for j, _ in keep], 0],
                                 "labels": torch.tensor([c for _, c in keep]), "text": z["text"],
                                 "n_classes": z["n_classes"]}
    return tasks


# ---------------------------------------------------------------------------- results file
class Results:
    """<out>.jsonl: one JSON row per finished run, appended, flushed and fsynced; a cut sweep re-reads it and skips
    the runs it holds (a torn last line from kill -9 is dropped)."""

    def __init__(self, path):
        self.path, self.rows = Path(path), []
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            keep = text[:text.rfind("\n") + 1]  # a line without its newline was cut mid-write
            if keep != text:
                self.path.write_text(keep, encoding="utf-8")
            self.rows = [json.loads(line) for line in keep.splitlines() if line.strip()]
        self.done = {r["key"]: r for r in self.rows}

    @staticmethod
    def key(*parts):
        return json.dumps(parts, sort_keys=True)

    def add(self, row):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done[row["key"]] = row


# ---------------------------------------------------------------------------- the sweep
def plan(a, budgets, seeds, methods):
    """Every run, in order: (stage, method, (label, n), seed, config or None = chosen later); the claim cell comes
    as soon as flqmi and multipos are done."""
    claim = "flqmi" in methods and "multipos" in methods and a.claim_seeds
    for i, name in enumerate(methods):
        m = METHODS[name]
        for b in budgets:
            if m.needs_unpaired and a.n_train - b[1] < 2:  # no two unpaired halves left
                continue
            for cfg in configs(m):
                yield "select", name, b, 0, cfg
            for s in seeds:
                yield "run", name, b, s, None
        if not claim or not {"flqmi", "multipos"} <= set(methods[:i + 1]):
            continue
        claim = False
        for b in parse_budgets(a.claim_budgets, a.n_train):
            for src in ("multipos", "flqmi"):
                for s in a.claim_seeds:
                    for K in a.claim_views:
                        for M in (1, 5):
                            for loss in ("flqmi", "multipos"):
                                yield "claim", loss, b, s, {"M": M, "K": K, "from": src}


def tuned(name):
    """{setting: Edge} of method `name`'s numeric settings that the grid-edge rule tunes."""
    return {k: EDGE[k] for k in METHODS[name].grid if k in EDGE}


def selections(results, name, budget, train=None, rounds=EDGE_ROUNDS):
    """What each validation signal picks for (method, budget) under the grid-edge rule (`select`):
    {"zeroshot": (config, info), "retrieval": (config, info)}. Candidates: the grid, then the configs the rule asks
    for. Scores are read from the select rows; train(config) -> its select row runs a config that has none (the
    sweep), without it such a config is skipped (the report). Given the same rows and rounds, the report so replays
    the sweep's choices exactly."""
    rows = [r for r in results.rows if r["stage"] == "select" and r["method"] == name and r["budget"] == budget]
    found = {json.dumps(r["config"], sort_keys=True): r for r in rows}
    cands = configs(METHODS[name])  # extensions enter only as each signal's own rule asks: a read-back replays it
    out = {}
    for signal, metric in (("zeroshot", "zs_acc1"), ("retrieval", "R@1")):
        if signal == "zeroshot" and rows and not any(metric in r["val"] for r in rows):
            metric = "R@1"  # no validation zero-shot task: R@1

        def score(c):
            r = found.get(json.dumps(c, sort_keys=True))
            if r is None and train is not None:
                r = found[json.dumps(c, sort_keys=True)] = train(c)
            return None if r is None else r["val"].get(metric)
        out[signal] = select(cands, score, tuned(name), rounds)
    return out


def choose(results, name, budget, train=None, rounds=EDGE_ROUNDS):
    """The configs the validation signals pick for (method, budget): {"zeroshot": cfg, "retrieval": cfg}."""
    return {signal: cfg for signal, (cfg, _) in selections(results, name, budget, train, rounds).items()}


def sweep(a):
    t_start = time.time()
    common = {"image_encoder": a.image_encoder, "text_encoder": a.text_encoder, "views": a.views,
              "captions": a.captions, "dim": a.dim, "hidden": a.hidden, "batch": a.batch_size}
    t0 = time.time()
    pairs = sma.read_pairs(a.data)
    sargs = sma.Args(data=a.data, image_encoder=a.image_encoder, text_encoder=a.text_encoder, views=a.views,
                     depictions=a.depictions, cache_dir=a.cache_dir)
    F_ = sma.features(pairs, sargs)  # float16 stores; the sweep's sets are small: whole, in float32
    F_ = {**F_, "image": F_["image"].tensor().float(), "text": F_["text"].tensor().float()}
    train_ids, val_ids = val_split(pairs, 0 if a.val_tasks else a.val_pct)
    a.n_train = len(train_ids)
    heldout = load_tasks(a.heldout, common, a.cache_dir)
    if a.val_tasks:  # validation entities of their own (the emoji set's emoji_val): every --data entity trains
        val = load_tasks(a.val_tasks, common, a.cache_dir)
    else:
        val = val_tasks(pairs, F_, val_ids, a.val_classes, heldout)
    t_extract = time.time() - t0
    budgets = parse_budgets(a.budgets, len(train_ids))
    if a.claim_seeds and not {b for b, _ in parse_budgets(a.claim_budgets, a.n_train)} <= {b for b, _ in budgets}:
        raise UserError(f"--claim-budgets {a.claim_budgets} must be among --budgets {a.budgets}")
    results = Results(f"{a.out}.jsonl")
    todo = list(plan(a, budgets, a.seeds, a.methods))
    print(f"{a.data}: {len(pairs.images)} entities = {len(train_ids)} train + {len(val_ids)} validation; budgets "
          f"{budgets}; {len(todo)} planned runs, {len(results.rows)} rows already in {a.out}.jsonl; "
          f"features {t_extract:.1f} s")
    n_new = 0

    def run(stage, name, label, n, seed, c, signals):
        """Train and score one run, append its row; StopSweep once --stop-after-runs new runs are done."""
        nonlocal n_new
        key = Results.key(stage, name, label, seed, c)
        if key in results.done:
            return results.done[key]
        if a.stop_after_runs and n_new >= a.stop_after_runs:
            raise StopSweep
        m = METHODS[name]
        data = run_data(F_, train_ids, n, seed, m.needs_unpaired)
        tick = time.time()
        torch.manual_seed(seed)
        hi, ht, steps = m.train(c, data, seed, common)
        dt = time.time() - tick
        row = {"key": key, "stage": stage, "method": name, "budget": label, "n_paired": n,
               "n_pairs": data["n_pairs"], "seed": seed, "config": c, "selected_for": signals,
               "steps": steps, "train_s": round(dt, 2)}
        if stage == "select":
            row["val"] = score_all((hi, ht), val)
        else:
            row["heldout"] = score_all((hi, ht), heldout, with_hits=True)
        results.add({**row, **clock(t_start, t_extract)})
        n_new += 1
        return row

    with tempfile.TemporaryDirectory() as tmp:
        common["tmp"] = tmp
        try:
            for stage, name, (label, n), seed, cfg in tqdm(todo, desc="runs", unit="run"):
                if stage == "run":  # the grid-edge rule may train more select runs (seed 0) before choosing
                    chosen = choose(results, name, label, lambda c: run("select", name, label, n, 0, c, []),
                                    a.edge_rounds)
                    cfgs = {}  # one run per distinct chosen config
                    for signal, c in chosen.items():
                        cfgs.setdefault(json.dumps(c, sort_keys=True), []).append(signal)
                    work = [(json.loads(c), signals) for c, signals in cfgs.items()]
                elif stage == "claim":
                    base = choose(results, cfg["from"], label, rounds=a.edge_rounds)["zeroshot"]
                    work = [({**json.loads(shared(base)), "loss": name, "learn_tau": False, "M": cfg["M"],
                              "K": cfg["K"]}, ["claim"])]
                else:
                    work = [(cfg, [])]
                for c, signals in work:
                    run(stage, name, label, n, seed, c, signals)
        except StopSweep:
            session(results, t_start, t_extract, n_new)
            print(f"stopping after {n_new} new runs (--stop-after-runs); rerun the command to continue")
            return results
    session(results, t_start, t_extract, n_new)
    report(a, results, budgets)
    print(summary(a, results))
    return results


def clock(t_start, t_extract):
    """Which invocation wrote a row and when: a sweep killed mid-way still accounts for its time."""
    return {"invocation": round(t_start, 3), "t_s": round(time.time() - t_start, 1), "features_s": round(t_extract, 1)}


def session(results, t_start, t_extract, n_new):
    """A row at the end of an invocation (finished or --stop-after-runs): its wall time."""
    results.add({"key": f"session {time.time()}", "stage": "session", "new_runs": n_new,
                 **clock(t_start, t_extract)})


def summary(a, results):
    """One line: runs, and the wall time of all invocations (each: until its last row) split into features,
    training and the rest."""
    runs = [r for r in results.rows if r["stage"] != "session"]
    last = {}
    for r in results.rows:
        if "invocation" in r:
            last[r["invocation"]] = r  # rows are in time order
    wall, feats = (sum(r[k] for r in last.values()) for k in ("t_s", "features_s"))
    train = sum(r["train_s"] for r in runs)
    n = len(last)
    return (f"sweep | {len(runs)} runs in {a.out}.jsonl | wall {wall / 60:.1f} min over {n} invocation(s): "
            f"features {feats / 60:.1f} min, training {train / 60:.1f} min, rest (scoring, selection, I/O) "
            f"{(wall - feats - train) / 60:.1f} min")


# ---------------------------------------------------------------------------- tables, intervals, plots
def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def cells(results, stage="run"):
    """{(method, budget): {metric: [value per seed]}} with each metric from the runs selected on its signal."""
    out = {}
    for r in results.rows:
        if r["stage"] != stage:
            continue
        c = out.setdefault((r["method"], r["budget"]), {})
        for metric, v in r["heldout"].items():
            if metric == "hits":
                continue
            signal = "zeroshot" if metric.startswith("zs_") else "retrieval"
            if signal in r["selected_for"]:
                c.setdefault(metric, {})[r["seed"]] = v
    return out


def shared(config):
    """The part of a claim run's config that both losses share (lr, steps, tau)."""
    return json.dumps({k: v for k, v in config.items() if k not in ("loss", "M", "K", "eta", "learn_tau")},
                      sort_keys=True)


def item_hits(results, method, budget, seeds, signal, stage="run", M=None, matched=None, K=None):
    """{seed: {"zs": tensor, "i2t": tensor, "t2i": tensor, ... with tags}} of the runs selected on `signal` (claim
    runs: with M captions, K views (None: any) and the shared config `matched`)."""
    out = {}
    for r in results.rows:
        if (r["stage"] == stage and r["method"] == method and r["budget"] == budget and r["seed"] in seeds
                and (signal in r["selected_for"]) and (M is None or r["config"].get("M") == M)
                and (K is None or r["config"].get("K") == K)
                and (matched is None or shared(r["config"]) == matched)):
            out[r["seed"]] = {k: torch.tensor([c == "1" for c in v], dtype=torch.float64)
                              for k, v in r["heldout"]["hits"].items()}
    return out


def tag_of(metric):
    """'zs_acc1:openmoji' -> ':openmoji'; 'zs_acc1' -> ''."""
    return metric[metric.index(":"):] if ":" in metric else ""


N_BOOT = 10_000  # resamples: at 2,000 a printed bound moved by 0.1 point between bootstrap seeds, enough to flip a
# borderline word; at 10,000 its Monte Carlo error is about half that


def counts(idx, n):
    """(B, n) how often each of 0..n-1 occurs in each row of idx (B, k): the weights of a bootstrap resample."""
    one = torch.ones(idx.shape, dtype=torch.float64)
    return torch.zeros(len(idx), n, dtype=torch.float64).scatter_add_(1, idx, one)


def entity_seed_bootstrap(parts, n_entities, n_boot=None, seed=0):
    """Paired bootstrap over entities and seeds (issue 24) of a difference that is a weighted sum of item means.

    parts: [(w, D, ent)], w a weight, D (S, N) float64 the per-item difference of hits a − b of each item n on seed s
    (paired: seed s fixes the same pairs and order for both arms), ent (N,) long, the entity 0..E-1 of each item
    (E = n_entities; all parts share the entities and seeds). Statistic: sum_k w_k * mean_n mean_s D_k[s, n].
    A resample draws E entities and S seeds with replacement; entity e comes c_e times with all its items, in
    every part, and seed s c_s times: part k's value is sum_n c_ent(n) (sum_s c_s D_k[s, n] / S) / sum_n c_ent(n).
    The interval so covers which entities were tested and which training seeds were drawn. With 3 or 5 seeds the
    seed factor is coarse, and resampling both factors of a crossed design errs slightly wide (Owen 2007, "The
    pigeonhole bootstrap", Ann. Appl. Stat.). -> {"diff", "lo", "hi" (2.5% and 97.5% percentiles), "se" (std of
    the resamples), "entities", "seeds", "items" (N of the first part)}."""
    S, n_boot = parts[0][1].shape[0], n_boot or N_BOOT
    g = torch.Generator().manual_seed(seed)
    ce = counts(torch.randint(n_entities, (n_boot, n_entities), generator=g), n_entities)  # (B, E)
    cs = counts(torch.randint(S, (n_boot, S), generator=g), S) / S  # (B, S)
    boots, diff = torch.zeros(n_boot, dtype=torch.float64), 0.0
    for w, D, ent in parts:
        De = torch.zeros(S, n_entities, dtype=torch.float64).index_add_(1, ent, D)  # (S, E) sums per entity
        Ne = torch.bincount(ent, minlength=n_entities).double()  # (E,) items per entity
        boots += w * ((cs @ De) * ce).sum(1) / (ce @ Ne)  # (B,)
        diff += w * D.mean().item()
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": diff, "lo": lo, "hi": hi, "se": boots.std().item(), "entities": n_entities, "seeds": S,
            "items": parts[0][1].shape[1]}


def bootstrap(results, a, b, budget, metric, task, stage="run", M=None, matched=None, n_boot=None, seed=0,
              K=(None, None)):
    """entity_seed_bootstrap of mean(a) - mean(b) on a held-out metric, over the seeds both ran. metric
    zs_acc1[tag]: items = zero-shot images, grouped into entities by `task_index`; R@1[tag]: (i2t + t2i) / 2, items
    = retrieval images (one per entity) and their captions (each with its image's entity). task: task_index's
    entry for the metric. K: the views of a's and b's claim runs (a == b with two K: K = 3 against K = 1).
    -> entity_seed_bootstrap's dict, or None when no seed has both."""
    base, tag = metric.partition(":")[0], tag_of(metric)
    signal = "claim" if stage == "claim" else "zeroshot" if base == "zs_acc1" else "retrieval"
    ha, hb = (item_hits(results, m, budget, range(10 ** 6), signal, stage, M, matched, k) for m, k in zip((a, b), K))
    need = ("zs" if base == "zs_acc1" else "i2t") + tag
    seeds = sorted(s for s in set(ha) & set(hb) if need in ha[s] and need in hb[s])
    if not seeds:
        return None

    def diff(k):  # (S, n) per-item hits of a minus b, one row per seed
        return torch.stack([ha[s][k + tag] - hb[s][k + tag] for s in seeds])
    if base == "zs_acc1":
        ent = task["entity"]
        parts = [(1.0, diff("zs"), ent)]
    else:
        ent = torch.arange(len(ha[seeds[0]]["i2t" + tag]))
        parts = [(0.5, diff("i2t"), ent), (0.5, diff("t2i"), task["text_image"])]
    if parts[0][1].shape[1] != len(ent):
        raise UserError(f"{metric}: the runs hold {parts[0][1].shape[1]} per-item hits, the task {len(ent)} items; "
                        "the held-out task files changed since the sweep ran: rerun it or restore them")
    return entity_seed_bootstrap(parts, int(ent.max()) + 1, n_boot, seed)


# A tie is claimed only when the whole interval lies within this many points of 0: the resolution the emoji set was
# built to reach (README, "Results": a target of +-1.5 points), fixed before the entity + seed intervals were seen.
TIE = 1.5


def verdict(lo, hi, tie=TIE, claim=0):
    """The one rule for the words (issue 24). [lo, hi]: a 95% interval of a difference a − b in points, taken as
    printed (rounded to 0.1, so a bound shown as +0.0 does not exclude 0). -> "better" (lo > 0), "worse" (hi < 0),
    "tie within ±x" (0 inside, x = max(|lo|, |hi|) <= tie), else "not resolved". claim = +1 (the claim is a > b)
    or -1 (a < b): "confirmed" / "refuted" in place of better / worse, so only an interval that excludes 0
    confirms or refutes a claim."""
    lo, hi = round(lo, 1) + 0.0, round(hi, 1) + 0.0  # + 0.0: -0.0 -> 0.0
    if lo > hi:
        raise ValueError(f"verdict: lo {lo} > hi {hi}")
    if lo > 0 or hi < 0:
        if not claim:
            return "better" if lo > 0 else "worse"
        return "confirmed" if (lo > 0) == (claim > 0) else "refuted"
    x = max(abs(lo), abs(hi))
    return f"tie within ±{x:.1f}" if x <= tie else "not resolved"


def mdd80(r):
    """The minimal detectable difference at 80% power of a two-sided 5% test: (1.96 + 0.84) x SE = 2.8 SE, points."""
    return 2.8 * 100 * r["se"]


def fmt(xs, pct=True):
    if not xs:
        return "–"
    m, s = mean_std(list(xs.values()))
    k = 100 if pct else 1
    return f"{k * m:.1f} ± {k * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def report(a, results, budgets):
    """<out>.md and <out>.png from the rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    C = cells(results)
    methods = [m for m in a.methods if any(k[0] == m for k in C)]
    index, chance = {}, {}  # per bootstrapped metric (zs_acc1, R@1, and with a task tag: zs_acc1:openmoji, ...)
    metrics = ["zs_acc1", "R@1"]  # the bootstrapped ones: each task's headline metric, with its tag
    if any(r["stage"] in ("run", "claim") for r in results.rows):  # the tasks' items, from their files
        index = task_index(a.heldout)
        metrics = list(index)
        for metric, t in index.items():
            if t["kind"] == "retrieval":  # a random ranking's R@1
                chance[metric] = 1 / t["n_images"]
            else:  # the largest class, as the emoji README's chance level
                chance[metric] = torch.bincount(t["labels"]).max().item() / len(t["labels"])
    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    validation = (f"validation tasks `{a.val_tasks}` (entities of their own)" if a.val_tasks else
                  f"validation {a.val_pct}% of the entities (sha1 of the image path)"
                  f"{', zero-shot classes from ' + a.val_classes if a.val_classes else ''}")
    L = [f"# Sweep: score against the number of paired entities ({Path(a.data).name}, {a.image_encoder} + "
         f"{a.text_encoder})", "",
         f"Command: `python {' '.join([Path(sys.argv[0]).name, *(x for x in sys.argv[1:] if x != '--report-only')])}`"
         "  ",
         f"Device: {device}, torch {torch.__version__}; seeds {a.seeds}; held-out tasks `{a.heldout}`; "
         f"{validation}.  ",
         f"{summary(a, results)}", "",
         "Protocol: sweep.py's docstring (selection per method and budget on seed 0's validation scores, zero-shot "
         "acc1 from the runs selected on validation zero-shot acc1, R@1 and the gap from those selected on "
         "validation R@1). Cells: mean ± std over seeds, % (gap: L2 distance of the modality means). A metric "
         "`name:tag` is scored on the later held-out task of that kind (`:openmoji`: the artist held out of "
         "training). Chance: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in chance.items()) + ".", ""]
    tables = [("zs_acc1", "held-out zero-shot acc1 (%)"), ("R@1", "held-out retrieval R@1, (i2t + t2i) / 2 (%)"),
              ("i2t_R@1", "held-out i2t R@1 (%)"), ("t2i_R@1", "held-out t2i R@1 (%)"),
              ("gap", "modality gap, held-out retrieval pairs")]
    tables += [(m, f"{dict(tables)[m.partition(':')[0]]} on task{tag_of(m)}") for m in metrics if ":" in m]
    for metric, title in tables:
        L += [f"### {title}", "", "| method | " + " | ".join(f"{b} ({n})" for b, n in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
        for m in methods:
            L.append(f"| {m} | " + " | ".join(fmt(C.get((m, b), {}).get(metric, {}), metric != "gap")
                                              for b, _ in budgets) + " |")
        L.append("")

    def interval(r, claim=1, n=True):
        """A bootstrap result as `diff [lo, hi], MDD80 x (E × S): verdict` in points; claim: verdict's (0: the word
        without a claim; None: no word)."""
        if r is None:
            return "–"
        lo, hi = 100 * r["lo"], 100 * r["hi"]
        word = "" if claim is None else ": **" + verdict(lo, hi, claim=claim) + "**"
        return (f"{100 * r['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}], MDD80 {mdd80(r):.1f}"
                + (f" ({r['entities']} × {r['seeds']})" if n else "") + word)

    rule = (f"Verdict (sweep.py `verdict`, the same rule in README and docs/RESULTS.md): the claim `a − b` > 0 is "
            f"**confirmed** when the interval, as printed, excludes 0 above, **refuted** when it excludes 0 below, a "
            f"**tie within ±x** when it holds 0 and lies within ±x, x <= {TIE} points (the resolution the set was "
            f"built for), else **not resolved**. MDD80: the minimal detectable difference at 80% power of a "
            f"two-sided 5% test, (1.96 + 0.84) × SE = 2.8 SE, SE the bootstrap standard error (the 95% half-width "
            f"is 1.96 SE). (E × S): the entities and seeds resampled.")
    L += ["### Paired bootstrap over entities and seeds, 95% intervals of the difference (points of %), held-out", "",
          "Each resample draws the held-out entities with replacement (all of an entity's drawings, or its image "
          "and all its descriptions, together) and the seeds with replacement, the same seeds for both methods (a "
          f"seed fixes the same pairs for both); {N_BOOT:,} resamples. The interval covers the sampling of test "
          "entities and the training noise across seeds. It does not cover the noise of the selection (one seed, a "
          "small validation split): where two methods were given different configs, part of a difference can come "
          "from that. Each method is at its own config selected for the metric (zero-shot: on validation zero-shot "
          "acc1; R@1: on validation R@1). " + rule, "",
          "| comparison | budget | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for x, y in COMPARE:
        if x not in methods or y not in methods:
            continue
        for b, _ in budgets:
            cols = [interval(bootstrap(results, x, y, b, metric, index[metric])) for metric in metrics]
            if any(c != "–" for c in cols):
                L.append(f"| {x} − {y} | {b} | " + " | ".join(cols) + " |")
    claim = [r for r in results.rows if r["stage"] == "claim"]
    if claim:
        Ks = sorted({r["config"]["K"] for r in claim})
        L += ["", "### SMA's claim: flqmi − multipos at a matched config, K views × M captions per step", "",
              "Both losses run at the same config (lr, steps, fixed tau, same heads and seeds): the zero-shot-"
              "selected config of the method in the `config of` column. K: the entity's first K images (with "
              "--depictions: its drawings by K artists). The set formulation helps if Δ > 0 at K, M > 1 and Δ ≈ 0 "
              "at K = M = 1. Δ: the paired entity + seed bootstrap above, with its verdict on the claim flqmi > "
              "multipos for the zero-shot metrics. The R@1 columns carry no verdict: this config was selected on "
              "zero-shot, and a retrieval claim compares each method at its own R@1-selected config (the flqmi − "
              "multipos row of the table above).", "",
              "| budget | config of | lr, steps, tau | K | M | " + " | ".join(
                  f"flqmi {m} | multipos {m} | Δ {m}" for m in metrics) + " |",
              "|---|---|---|---|---|" + "---|---|---|" * len(metrics)]
        groups = list(dict.fromkeys((r["budget"], shared(r["config"])) for r in claim))

        def sources(b, matched):  # the methods whose zero-shot choice at budget b is the claim runs' config
            return [m for m in ("multipos", "flqmi")
                    if shared(choose(results, m, b, rounds=a.edge_rounds)["zeroshot"]) == matched]
        for b, matched in groups:
            src = sources(b, matched)
            cfg = json.loads(matched)
            for K in Ks:
                for M in (1, 5):
                    vals = {m: {} for m in ("flqmi", "multipos")}
                    for r in claim:
                        if (r["budget"] == b and r["config"]["M"] == M and r["config"]["K"] == K
                                and shared(r["config"]) == matched):
                            for metric in metrics:
                                if metric in r["heldout"]:
                                    vals[r["method"]].setdefault(metric, {})[r["seed"]] = r["heldout"][metric]
                    row = [b, " = ".join(src), f"{cfg.get('lr')}, {cfg.get('steps')}, {cfg.get('tau')}", str(K),
                           str(M)]
                    for metric in metrics:
                        row += [fmt(vals["flqmi"].get(metric, {})), fmt(vals["multipos"].get(metric, {}))]
                        r = bootstrap(results, "flqmi", "multipos", b, metric, index[metric], "claim", M,
                                      matched, K=(K, K))
                        row.append(interval(r, claim=None if metric.startswith("R@1") else 1))
                    L.append("| " + " | ".join(row) + " |")
        if len(Ks) > 1:  # several depictions against one, same loss: does it carry to an unseen artist?
            L += ["", f"### K = {Ks[-1]} − K = {Ks[0]} views, same loss and config (claim runs)", "",
                  "Does training on several images per entity beat one, on the training artists' held-out "
                  "depictions and (`:tag`) on an artist never seen in training? Paired entity + seed bootstrap and "
                  f"verdict as above, on the claim K = {Ks[-1]} > K = {Ks[0]} (the config was selected on zero-shot).",
                  "", "| budget | config of | loss | M | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
                  "|---|---|---|---|" + "---|" * len(metrics)]
            for b, matched in groups:
                src = sources(b, matched)
                for loss in ("flqmi", "multipos"):
                    for M in (1, 5):
                        row = [b, " = ".join(src), loss, str(M)]
                        for metric in metrics:
                            r = bootstrap(results, loss, loss, b, metric, index[metric], "claim", M,
                                          matched, K=(Ks[-1], Ks[0]))
                            row.append(interval(r))
                        L.append("| " + " | ".join(row) + " |")
    L += ["", "### Selected configs (validation, seed 0) and the grid-edge rule", "",
          "Each numeric setting with >= 2 values tried: its chosen value and, in braces, the values tried. The "
          "grid-edge rule (sweep.py `select`) extends a choice on the smallest or largest value tried by one step "
          "(x3 lr, lambda, reg; x2 steps; the next tau of " + ", ".join(map(str, TAUS)) + "), the others held, "
          "until it is interior or at a hard bound (" + "; ".join(f"{k} {e.lo:g}..{e.hi:g}" for k, e in EDGE.items())
          + f"; at most {a.edge_rounds} extensions per choice). Marks: **edge** = on an edge and not extended (the "
          "runs predate the rule, or its rounds ran out), **bound** = at a hard bound; unmarked = interior. "
          "Single-valued settings are listed without braces; csa's dim (0 = all components) is not an ordered "
          "scale and is not extended.", "", "| method | budget | for zero-shot | for R@1 |", "|---|---|---|---|"]
    n_choices, n_edge, n_bound = 0, 0, 0
    for m in methods:
        for b, _ in budgets:
            if any(r["stage"] == "select" and r["method"] == m and r["budget"] == b for r in results.rows):
                sel = selections(results, m, b, rounds=a.edge_rounds)
                cols = []
                for signal in ("zeroshot", "retrieval"):
                    cfg, info = sel[signal]
                    parts = []
                    for k in METHODS[m].grid:
                        if k not in cfg:
                            continue
                        if k in info:
                            n_choices += 1
                            n_edge += info[k]["mark"] == "edge"
                            n_bound += info[k]["mark"] == "bound"
                            mark = "" if info[k]["mark"] == "interior" else f" **{info[k]['mark']}**"
                            parts.append(f"{k} {cfg[k]} {{{', '.join(map(str, info[k]['tried']))}}}{mark}")
                        else:
                            parts.append(f"{k} {cfg[k]}")
                    cols.append("; ".join(parts))
                L.append(f"| {m} | {b} | {cols[0]} | {cols[1]} |")
    L += ["", f"{n_edge} of the {n_choices} choices of a setting with >= 2 values tried (method × budget × signal "
          f"× setting) sit on an edge of the values tried without being extended; {n_bound} at a hard bound."]
    Path(f"{a.out}.md").write_text("\n".join(L) + "\n", encoding="utf-8")

    panels = HEADLINE + [(m, f"{dict(HEADLINE)[m.partition(':')[0]]}{tag_of(m)}") for m in metrics if ":" in m]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (metric, title) in zip(axes, panels):
        for m in methods:
            xs, ms, ss = [], [], []
            for b, n in budgets:
                v = C.get((m, b), {}).get(metric, {})
                if v:
                    mu, sd = mean_std(list(v.values()))
                    xs.append(n)
                    ms.append(mu * (100 if metric != "gap" else 1))
                    ss.append(0 if math.isnan(sd) else sd * (100 if metric != "gap" else 1))
            if xs:
                line, = ax.plot(xs, ms, marker="o", label=m)
                ax.fill_between(xs, [u - s for u, s in zip(ms, ss)], [u + s for u, s in zip(ms, ss)],
                                color=line.get_color(), alpha=0.15)
        if metric in chance:
            ax.axhline(100 * chance[metric], color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xticks([n for _, n in budgets], [f"{n}\n{b}" for b, n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("paired training entities (log scale)")
        ax.set_title(title + ("" if metric == "gap" else " (%)"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: 10 lines fill the panels
    fig.suptitle(f"{Path(a.data).name}, {a.image_encoder} + {a.text_encoder}; mean ± std over seeds {a.seeds}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{a.out}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    protocol = __doc__.split("Protocol (every choice here is ours, not the papers'):")[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Protocol:" + protocol,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="pairs file (image,caption rows): training + validation entities")
    p.add_argument("--heldout", required=True, help="evaluate.py tasks scored after training, e.g. `emoji` or "
                   "`csv:heldout.csv,folder:zeroshot` (never used for selection)")
    p.add_argument("--val-classes", default="", help="CSV image,class: the class (a folder of the held-out "
                   "zero-shot task) of training entities; enables the validation zero-shot signal")
    p.add_argument("--budgets", default="5%,10%,25%,50%,100%", help="paired training entities: counts or percentages")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (selection always trains with seed 0)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "flvmi"),
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--claim-seeds", default="0,1,2,3,4",
                   help="seeds of the flqmi vs multipos M = 1 / 5 cell ('' = off)")
    p.add_argument("--claim-budgets", default="100%", help="budgets of that cell (comma list, among --budgets)")
    p.add_argument("--claim-views", default="", help="K values of that cell, each <= --views: the entity's first K "
                   "views ('' = --views)")
    p.add_argument("--depictions", default="", help="sma.py --depictions: CSV image,depiction, more images of an "
                   "entity (SMA methods' views; the SOTAlign methods see view 0)")
    p.add_argument("--val-tasks", default="", help="evaluate.py tasks on validation entities of their own, used for "
                   "selection instead of --val-pct of --data (e.g. emoji_val); their first zero-shot and first "
                   "retrieval task are the signals")
    p.add_argument("--image-encoder", default="offline:efficientnet-lite0")
    p.add_argument("--text-encoder", default="offline:all-minilm-l6-v2")
    p.add_argument("--views", type=int, default=2, help="K image views per entity (SMA methods)")
    p.add_argument("--captions", type=int, default=5, help="M captions per entity per step (SMA methods)")
    p.add_argument("--dim", type=int, default=128, help="output dimension of every trained head")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of SMA's 2-layer heads")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 was fastest on "
                   "2 cores shared with other jobs)")
    p.add_argument("--batch-size", type=int, default=128, help="entities (pairs) per step, also unpaired per step")
    p.add_argument("--val-pct", type=int, default=20, help="percent of the --data entities kept for validation")
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out", default="runs/sweep", help="prefix of <out>.jsonl, <out>.md, <out>.png")
    p.add_argument("--grid", default="", help='JSON replacing grid entries, e.g. \'{"flqmi": {"steps": [20]}}\'')
    p.add_argument("--edge-rounds", type=int, default=EDGE_ROUNDS, help="at most this many grid extensions per "
                   "choice under the grid-edge rule (0: off, the grid as given)")
    p.add_argument("--stop-after-runs", type=int, default=0, help="stop after this many new runs (tests resume)")
    p.add_argument("--report-only", action="store_true", help="only rewrite <out>.md / .png from <out>.jsonl")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.claim_seeds = [int(s) for s in a.claim_seeds.split(",") if s.strip()]
    a.claim_views = [int(k) for k in a.claim_views.split(",") if k.strip()] or [a.views]
    if max(a.claim_views) > a.views or min(a.claim_views) < 1:
        p.error(f"--claim-views {a.claim_views}: each K must be in 1..--views ({a.views})")
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; known: {', '.join(METHODS)}")
    try:
        grid = json.loads(a.grid) if a.grid else {}
    except json.JSONDecodeError as e:
        p.error(f"--grid: not JSON ({e})")
    for name, entries in grid.items():
        if name not in METHODS or not isinstance(entries, dict):
            p.error(f"--grid: {name!r} must be one of {', '.join(METHODS)}, with a dict of lists")
        METHODS[name] = replace(METHODS[name], grid={**METHODS[name].grid, **entries})
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.report_only:
            pairs = sma.read_pairs(a.data)
            n_train = len(val_split(pairs, 0 if a.val_tasks else a.val_pct)[0])
            return report(a, Results(f"{a.out}.jsonl"), parse_budgets(a.budgets, n_train))
        return sweep(a)
    except (sma.DataError, UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
