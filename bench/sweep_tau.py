"""How does SMA's temperature learn? (the measurement behind sweep.py's fixed, selected tau; not a test)

flqmi (corrected scale) and infonce on the emoji set with the offline encoders, sweep.py's heads (d = 128, hidden
256), batch 128, 150 steps, seed 0, all 711 training entities (sweep.py's split); tau learned from 0.07 (CLIP) or
fixed at 0.03 / 0.07 / 0.15; scored on sweep.py's validation split (never the held-out). Uses the feature cache.

  python bench/sweep_tau.py --out bench/sweep_tau_emoji.md
"""
import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sma  # noqa: E402
import sweep  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/sweep_tau_emoji.md")
    p.add_argument("--cache-dir", default=".cache")
    o = p.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    a = sweep.parse_args(["--data", "examples/emoji/train.csv", "--heldout", "emoji", "--val-classes",
                          "examples/emoji/subgroups.csv", "--cache-dir", o.cache_dir])
    pairs = sma.read_pairs(a.data)
    F_ = sma.features(pairs, sma.Args(data=a.data, image_encoder=a.image_encoder, text_encoder=a.text_encoder,
                                      views=2, cache_dir=o.cache_dir))
    tr, va = sweep.val_split(pairs, a.val_pct)
    common = {"image_encoder": a.image_encoder, "text_encoder": a.text_encoder}
    val = sweep.val_tasks(pairs, F_, va, a.val_classes, sweep.load_tasks("emoji", common, o.cache_dir))
    data = sweep.run_data(F_, tr, len(tr), 0, False)
    E, B = len(tr), 128
    lines = ["# How SMA's temperature learns (emoji set, offline encoders; validation split, seed 0)", "",
             f"`python {' '.join(sys.argv)}`; CPU ({platform.machine()}, {os.cpu_count()} shared cores, 1 thread), "
             f"torch {torch.__version__}. 150 steps, batch 128, heads d = 128 / hidden 256, K = 2, M = 5, all "
             f"{E} training entities of sweep.py's split; validation: {len(va)} entities (retrieval), "
             f"{len(val['val_zeroshot']['image'])} images in the 29 zero-shot classes. One seed: a 1-image change "
             "is 1.25 points of validation acc1.", "",
             "| loss | lr | tau | learned? | tau after 150 steps | val zero-shot acc1 | val R@1 |",
             "|---|---|---|---|---|---|---|"]
    for loss in ("infonce", "flqmi"):
        for lr in (1e-3, 3e-3):
            for tau, learn in ((0.07, True), (0.03, False), (0.07, False), (0.15, False)):
                args = sma.Args(data="-", views=2, captions=5, loss=loss, tau=tau, fixed_tau=not learn, dim=128,
                                hidden=256, epochs=math.ceil(150 / (E // B)), batch_size=B, lr=lr, seed=0,
                                out=str(ROOT / "runs" / "sweep_tau"), device="cpu", log_every=10 ** 9,
                                ckpt_every=10 ** 9)
                model, m = sma.train(args, data["sma"], 0, 1, "cpu", log=lambda *x: None)
                s = sweep.score_all((model.image_head, model.text_head), val)
                lines.append(f"| {loss} | {lr:g} | {tau} | {'yes' if learn else 'no'} | "
                             f"{1 / model.logit_scale.exp().item():.4f} | {100 * s['zs_acc1']:.1f} | "
                             f"{100 * s['R@1']:.1f} |")
                print(lines[-1], flush=True)
    (ROOT / o.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
