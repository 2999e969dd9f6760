"""Frozen image encoders on a CPU: what plumbing.CPU_IMAGE_BATCH (images per forward pass) and
plumbing.keep_freed_memory (glibc keeping freed memory; off with KEEP_FREED_MMAP=0) buy, in throughput and peak
memory. Each measurement is a fresh process (glibc's settings are per process).

1. Encoder alone: EfficientNet-Lite0 on --n random 224-px images handed over 64 at a time (the scripts' extraction
   batch), forwarded 64 or CPU_IMAGE_BATCH at a time, with and without keep_freed_memory; --repeats processes each.
2. With --demo: the README's demo command end to end from an empty cache, in a copy of --before (a commit: the
   code before both changes) and of the working tree, and the earlier one-drawing demo in the working tree; wall
   time and peak RSS (the largest process, /usr/bin/time -v).

    python bench/cpu_encoding.py --demo > bench/cpu_encoding_cpu.md
"""
import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["sma.py", "--data", "examples/emoji/train.csv", "--depictions", "examples/emoji/depictions.csv",
        "--views", "3", "--image-encoder", "offline:efficientnet-lite0", "--text-encoder", "offline:all-minilm-l6-v2",
        "--eval", "emoji", "--dim", "512", "--hidden", "1024", "--batch-size", "256", "--epochs", "30", "--lr", "3e-4"]
DEMO_ONE_DRAWING = [a for i, a in enumerate(DEMO) if a not in ("--depictions", "--views")
                    and DEMO[i - 1] not in ("--depictions", "--views")]  # the earlier demo: one drawing, 2 views
SETTINGS = {  # name -> (images per forward, KEEP_FREED_MMAP)
    "64 per forward, glibc's defaults (before)": (64, "0"),
    "64 per forward, keep_freed_memory": (64, ""),
    "8 per forward, glibc's defaults": (8, "0"),
    "8 per forward, keep_freed_memory (now)": (8, ""),
}


def encoder_run(n, per_forward, features_out):
    """In the child: encode n images, print images/s and peak RSS; save the features for the comparison."""
    sys.path.insert(0, str(ROOT))
    import torch
    import plumbing
    plumbing.CPU_IMAGE_BATCH = per_forward
    encoder = plumbing.load_encoder("offline:efficientnet-lite0", "image")
    images = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = (images - torch.tensor(encoder.mean).view(3, 1, 1)) / torch.tensor(encoder.std).view(3, 1, 1)
    with torch.no_grad(), plumbing.keep_freed_memory():
        encoder.encode(images[:64])  # warm-up: weights packed, first allocations made
        start = time.time()
        features = torch.cat([encoder.encode(images[i:i + 64]) for i in range(0, n, 64)])
        seconds = time.time() - start
    torch.save(features, features_out)
    print(f"{n / seconds:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f}")


def child_env(value):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if value:
        env["KEEP_FREED_MMAP"] = value
    else:
        env.pop("KEEP_FREED_MMAP", None)
    return env


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--before", default="75b9d58", help="the commit the demo's 'before' row runs")
    parser.add_argument("--per-forward", type=int, default=8)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        return encoder_run(args.n, args.per_forward, args.child)
    import torch
    print("# Frozen image encoders on a CPU: images per forward pass and glibc keeping freed memory\n")
    print(f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores, idle), {platform.libc_ver()[0]} "
          f"{platform.libc_ver()[1]}, torch {torch.__version__}, {torch.get_num_threads()} threads. Command: "
          f"`python bench/cpu_encoding.py{' --demo' if args.demo else ''}`.\n")
    print(f"## EfficientNet-Lite0, {args.n} random 224-px images handed over 64 at a time, {args.repeats} fresh "
          "processes per setting\n")
    print("| setting | images/s, each process | peak RSS (GB), each process |\n|---|---|---|")
    work = Path(tempfile.mkdtemp())
    for i, (name, (per_forward, keep)) in enumerate(SETTINGS.items()):
        rates, peaks = [], []
        for r in range(args.repeats):
            command = [sys.executable, __file__, "--n", str(args.n), "--per-forward", str(per_forward),
                       "--child", str(work / f"{i}-{r}.pt")]
            out = subprocess.run(command, env=child_env(keep), capture_output=True, text=True, check=True).stdout
            rates.append(out.split()[-2])
            peaks.append(out.split()[-1])
        print(f"| {name} | {', '.join(rates)} | {', '.join(peaks)} |")
    features = [torch.load(work / f"{i}-0.pt") for i in range(len(SETTINGS))]
    print(f"\nFeatures bit-identical with and without keep_freed_memory: "
          f"{torch.equal(features[0], features[1]) and torch.equal(features[2], features[3])}; 8 against 64 per "
          f"forward: largest difference {(features[0] - features[3]).abs().max().item():.1e} "
          f"(features of norm ~{features[0].norm(dim=1).mean().item():.0f}).")
    if args.demo:
        print("\n## The README's demo, end to end from an empty cache\n")
        print(f"`python {' '.join(DEMO)}`, /usr/bin/time -v; the one-drawing row leaves out `--depictions` and "
              "`--views 3` (the earlier demo: each entity's one drawing, clean and one augmented view).\n")
        print("| code | wall | peak RSS, largest process (GB) | image extraction |\n|---|---|---|---|")
        last = {}
        runs = [(f"{args.before} (before)", "before", DEMO), ("working tree (now)", "now", DEMO),
                ("working tree, one drawing per entity", "now", DEMO_ONE_DRAWING)]
        for name, folder, command in runs:
            tree = work / folder
            if folder == "before" and not tree.exists():
                tree.mkdir()
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True,
                                         check=True).stdout
                subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            elif not tree.exists():
                ignore = shutil.ignore_patterns(".cache", "runs", ".git", "datasets", "results")
                shutil.copytree(ROOT, tree, ignore=ignore)
            shutil.rmtree(tree / ".cache", ignore_errors=True)  # each run from an empty cache
            shutil.rmtree(tree / "runs", ignore_errors=True)
            run = subprocess.run(["/usr/bin/time", "-v", sys.executable, *command], cwd=tree, env=child_env(""),
                                 capture_output=True, text=True, check=True)
            wall = next(line.split(": ")[-1] for line in run.stderr.splitlines() if "Elapsed (wall" in line)
            rss = next(int(line.split()[-1]) for line in run.stderr.splitlines() if "Maximum resident" in line)
            rate = next(line.split(" at ")[1].split(" ->")[0] for line in run.stdout.splitlines()
                        if line.startswith("features:") and "images" in line)
            last[name] = run.stdout.splitlines()[-1]
            print(f"| {name} | {wall} | {rss / 1e6:.2f} | {rate} |")
        print("\nLast lines:\n")
        for name, line in last.items():
            print(f"- {name}: `{line}`")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
