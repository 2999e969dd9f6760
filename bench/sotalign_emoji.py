"""Emoji-set comparison (not a test): (a) the linear teacher alone, (b) supervised SigLIP heads on the pairs only,
(c) SOTAlign (and c' with --lambda-ot 10), same seeds, on the shipped examples/emoji SOTAlign split (44 pairs, 421
unpaired images, 1,626 unpaired texts) with the offline encoders. Emoji-set results, not paper numbers. The feature
cache is shared, so each run is stage 1 + stage 2 + evaluation. (a) is read from the teacher.pt evaluation of the
(c) runs (a closed-form fit: the same for every seed).

  python bench/sotalign_emoji.py --out bench/sotalign_emoji_results_gpu.md [--seeds 0 1 2] [--cache-dir .cache]
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
E = "examples/emoji"
FLAGS = ["--pairs", f"{E}/sotalign_pairs.csv", "--heldout", f"{E}/heldout.csv", "--image-encoder",
         "offline:efficientnet-lite0", "--text-encoder", "offline:all-minilm-l6-v2", "--steps", "200", "--lr", "1e-3",
         "--eval", "emoji"]
UNPAIRED = ["--unpaired-images", f"{E}/unpaired_images.csv", "--unpaired-texts", f"{E}/unpaired_texts.txt",
            "--unpaired-batch", "256"]
METHODS = {"(b) supervised SigLIP heads, pairs only": [], "(c) SOTAlign, lambda = 1 (default)": UNPAIRED,
           "(c') SOTAlign, lambda = 10": [*UNPAIRED, "--lambda-ot", "10"]}
METRICS = [("emoji_zeroshot", "acc1"), ("emoji_zeroshot", "acc5"), ("emoji_retrieval", "i2t_R@1"),
           ("emoji_retrieval", "t2i_R@1")]


def scores(path):
    res = {r["dataset"]: r["metrics"] for r in json.loads(Path(path).read_text())["results"]}
    return [100 * res[d][m] for d, m in METRICS]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out", default="bench/sotalign_emoji_results_gpu.md")
    p.add_argument("--note", default="", help="a line added under the device line (e.g. how the weights got there)")
    a = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, extra) in enumerate(METHODS.items()):
            for seed in a.seeds:
                out = Path(tmp) / f"{i}-{seed}"
                cmd = [sys.executable, "sotalign.py", *FLAGS, *extra, "--seed", str(seed), "--out", str(out),
                       "--cache-dir", a.cache_dir]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                print(proc.stdout.strip().splitlines()[-1], flush=True)
                rows.setdefault(method, []).append(scores(out / "eval.json"))
                if i == 1:
                    rows.setdefault("(a) linear teacher alone (CCA)", []).append(scores(out / "eval_teacher.json"))
    device = (f"{torch.cuda.get_device_name()} (sotalign.py's default device, --compile on)"
              if torch.cuda.is_available() else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    lines = ["# SOTAlign on the emoji example set (offline encoders): teacher vs supervised vs SOTAlign", "",
             "Emoji-set results with the offline encoders (EfficientNet-Lite0 + all-MiniLM-L6-v2), not paper numbers; "
             "setup and caveats as in `bench/sotalign_emoji_results.md`. Mean ± std over seeds "
             f"{a.seeds}, 200 steps each. Values in %.", "",
             f"Command: `python sotalign.py {' '.join(FLAGS)} [unpaired flags] --seed <seed>`; driver: "
             f"`python {' '.join(sys.argv)}`  ",
             f"Device: {device}; torch {torch.__version__}; n = {len(a.seeds)} seeds per method.  ", a.note, "",
             "| method | " + " | ".join(f"{d.split('_')[1]} {m}" for d, m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for method in ["(a) linear teacher alone (CCA)", *METHODS]:
        cols = list(zip(*rows[method]))
        lines.append(f"| {method} | " + " | ".join(f"{statistics.mean(c):.1f} ± {statistics.stdev(c):.1f}"
                                                   for c in cols) + " |")
    Path(ROOT / a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
