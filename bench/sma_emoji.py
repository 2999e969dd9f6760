"""Emoji-set comparison (not a test): flqmi vs infonce vs multipos with the same heads, epochs and seeds, on the
shipped examples/emoji split with the offline encoders (EfficientNet-Lite0 + MiniLM). Emoji-set results, not paper
numbers. The feature cache is shared, so each run is head training plus evaluation. Superseded by sweep.py (its
results used FLQMI's old logit scale and one untuned setting for every loss).

  python bench/sma_emoji.py --out bench/sma_emoji_results.md [--cache-dir .cache] [--seeds 0 1 2]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--data", "examples/emoji/train.csv", "--image-encoder", "offline:efficientnet-lite0", "--text-encoder",
         "offline:all-minilm-l6-v2", "--eval", "emoji", "--dim", "512", "--hidden", "1024", "--batch-size", "256",
         "--epochs", "30", "--lr", "3e-4"]
METRICS = [("emoji_zeroshot", "acc1"), ("emoji_zeroshot", "acc5"), ("emoji_retrieval", "i2t_R@1"),
           ("emoji_retrieval", "t2i_R@1"), ("emoji_retrieval", "i2t_R@5"), ("emoji_retrieval", "t2i_R@5")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--losses", nargs="+", default=["flqmi", "infonce", "multipos"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out", default="bench/sma_emoji_results.md")
    p.add_argument("--note", default="", help="a line added under the device line (e.g. how the weights got there)")
    a = p.parse_args()
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in a.losses:
            for seed in a.seeds:
                out = Path(tmp) / f"{loss}-{seed}"
                cmd = [sys.executable, "sma.py", *FLAGS, "--loss", loss, "--seed", str(seed), "--out", str(out),
                       "--cache-dir", a.cache_dir]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                print(proc.stdout.strip().splitlines()[-1], flush=True)
                res = {r["dataset"]: r["metrics"] for r in json.loads((out / "eval.json").read_text())["results"]}
                scores[loss, seed] = [res[d][m] for d, m in METRICS]
    device = (f"{torch.cuda.get_device_name()} (sma.py's default device)" if torch.cuda.is_available() else
              f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared with other jobs)")
    lines = ["# SMA on the emoji example set: flqmi vs infonce vs multipos", "",
             "Emoji-set results with the offline encoders (EfficientNet-Lite0 224 px + all-MiniLM-L6-v2), the shipped "
             "train split (886 entities, 3,500 captions) and held-out splits (29-class zero-shot on 186 images, "
             "chance 0.081; retrieval over 297 held-out entities, chance R@1 0.0034). Not paper numbers. "
             f"Mean ± std over seeds {a.seeds}; same heads, epochs, batch, lr and seeds for every loss.", "",
             f"Command (per loss and seed): `python sma.py {' '.join(FLAGS)} --loss <loss> --seed <seed>`  ",
             f"Driver: `python {' '.join(sys.argv)}`  ",
             f"Device: {device}; torch {torch.__version__}; n = {len(a.seeds)} seeds per loss.  ", a.note, "",
             "| loss | " + " | ".join(f"{d.split('_')[1]} {m}" for d, m in METRICS) + " |",
             "| --- |" + " --- |" * len(METRICS)]
    for loss in a.losses:
        cols = list(zip(*[scores[loss, s] for s in a.seeds]))
        lines.append(f"| {loss} | " + " | ".join(f"{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}"
                                                 for c in cols) + " |")
    lines += ["", "Per seed:", "", "| loss | seed | " + " | ".join(f"{d.split('_')[1]} {m}" for d, m in METRICS)
              + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    lines += [f"| {loss} | {s} | " + " | ".join(f"{v:.3f}" for v in scores[loss, s]) + " |"
              for loss in a.losses for s in a.seeds]
    (ROOT / a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
