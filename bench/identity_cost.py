"""Benchmark (not a test): what the content identities of issue 25 cost on a 100k-image folder.

    python bench/identity_cost.py --work /tmp/idcost --out bench/identity_cost_cpu.md

1. The store key (plumbing.store_key) over N image files: one os.stat per file gives size, mtime and ctime, so the
   ctime that catches a same-size replacement with its mtime kept costs no extra system call. Timed on N files,
   against the same loop keyed by size and mtime only (the old key), in one process, twice (the second warm).
2. The leak check by content (plumbing.content_copies): N training files against M evaluation files, sizes drawn
   from a log-normal fitted to COCO's JPEGs (median 160 kB, sigma 0.35; an assumption, no COCO here). Only training
   files whose size equals an evaluation file's are hashed. Reports the candidates, the bytes hashed, the time.
   The files are sparse (os.truncate), so the bytes hashed read as zeros from the page cache: the time of the
   hashing itself, not of a disk.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402


def old_key(items) -> str:  # the key before issue 25: size and mtime
    h = hashlib.sha256()
    for item in items:
        st = os.stat(item)
        data = f"{item}|{st.st_size}:{st.st_mtime_ns}".encode()
        h.update(f"{len(data)}:".encode() + data)
    return h.hexdigest()[:20]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--m", type=int, default=5_000)
    p.add_argument("--out", default="")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    work = Path(a.work)
    train, test = work / "train", work / "test"
    for folder, count in ((train, a.n), (test, a.m)):
        folder.mkdir(parents=True, exist_ok=True)
        sizes = np.exp(rng.normal(np.log(160_000), 0.35, count)).astype(int)
        for i, size in enumerate(sizes):
            path = folder / f"{i:07d}.jpg"
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(int(size))
    train_files = sorted(str(p) for p in train.iterdir())
    test_files = sorted(str(p) for p in test.iterdir())
    rows = []
    for attempt in ("first", "second"):
        t = time.perf_counter()
        old_key(train_files)
        old = time.perf_counter() - t
        t = time.perf_counter()
        plumbing.store_key(["spec"], "image", train_files)
        new = time.perf_counter() - t
        rows.append((attempt, old, new))
    t = time.perf_counter()
    sizes = {os.path.getsize(f) for f in test_files}
    candidates = [f for f in train_files if os.path.getsize(f) in sizes]
    copies = plumbing.content_copies(train_files, test_files)
    leak_s = time.perf_counter() - t
    hashed = sum(os.path.getsize(f) for f in candidates) + sum(os.path.getsize(f) for f in test_files
                                                                 if os.path.getsize(f) in {os.path.getsize(c)
                                                                                           for c in candidates})
    lines = [f"# What the content identities cost: {a.n:,} training files, {a.m:,} evaluation files", "",
             f"Command: `python bench/identity_cost.py --work {a.work} --n {a.n} --m {a.m}`  ",
             f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores), Python {platform.python_version()}, "
             f"load average {os.getloadavg()[0]:.2f} at the end; sparse files (sizes log-normal, median 160 kB).", "",
             "| store key over the training files | size + mtime (old) | size + mtime + ctime (new) |",
             "|---|---|---|"]
    lines += [f"| {attempt} pass | {old:.2f} s | {new:.2f} s |" for attempt, old, new in rows]
    lines += ["", "| leak check by content | value |", "|---|---|",
              f"| training files of an evaluation file's size (hashed) | {len(candidates):,} of {a.n:,} |",
              f"| bytes hashed (candidates + the evaluation files of their sizes) | {hashed / 1e9:.2f} GB |",
              f"| byte-identical copies found (all zeros here: sparse files of equal size) | {len(copies):,} |",
              f"| time (stat of every file, hashing the candidates) | {leak_s:.1f} s |"]
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    print(json.dumps({"rows": rows, "candidates": len(candidates), "leak_s": leak_s}))


if __name__ == "__main__":
    main()
