"""Benchmark (not a test): start-up of a run whose features are all cached, on a store of N x D float16 features.

    python bench/store_startup.py --work /tmp/store --n 1000000 --dim 1024 --old 11c30f5 \
        --out bench/store_startup_cpu.md

Builds one complete store with a random-feature stand-in encoder (no model), then times, in a fresh child process
each, the call a training run makes before its first step, `extract(folder, n, load, batch)` on the complete store:
the old code (the commit --old, its plumbing.extract, which checks every shard's CRC-32) and the new one
(sotalign.extract, which checks sizes and headers and leaves the CRC to --verify-cache), each with the page cache
dropped first (cold; needs root) and again warm, plus the new code with verify=True. Reports wall seconds and the
bytes the call read from files (/proc/self/io rchar).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
import torch
mod = __import__(sys.argv[2])
folder, n, dim, verify = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
def load():
    def encode(batch):
        return torch.randn(len(batch), dim)
    return list(range(n)), encode
def rchar():
    return int(re.search(r"rchar: (\d+)", open("/proc/self/io").read()).group(1))
before, t = rchar(), time.perf_counter()
store = mod.extract(folder, n, load, 4096, **({"verify": True} if verify else {}))
seconds, read = time.perf_counter() - t, rchar() - before
print("RESULT " + json.dumps({"seconds": seconds, "read_bytes": read, "encoded": store.encoded, "n": len(store)}))
'''


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(code_dir, module, folder, n, dim, verify=False):
    out = subprocess.run([sys.executable, "-c", CHILD, str(code_dir), module, str(folder), str(n), str(dim),
                          "1" if verify else "0"], capture_output=True, text=True, env={**os.environ,
                                                                                         "OMP_NUM_THREADS": "1"})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(line[7:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--old", default="", help="commit of the old code ('' = new code only)")
    p.add_argument("--codes", default="old,new")
    p.add_argument("--out", default="")
    a = p.parse_args()
    work, folder = Path(a.work), Path(a.work) / "store"
    work.mkdir(parents=True, exist_ok=True)
    old_dir = work / "old"
    if a.old and not old_dir.is_dir():
        old_dir.mkdir()
        subprocess.run(f"git archive {a.old} plumbing.py | tar -x -C {old_dir}", shell=True, check=True, cwd=ROOT)
    codes = {"old": (old_dir, "plumbing"), "new": (ROOT, "sotalign")}
    build = codes["new"] if "new" in a.codes else codes["old"]
    t = time.perf_counter()
    made = run(*build, folder, a.n, a.dim)
    print(f"store: {a.n} x {a.dim} built in {time.perf_counter() - t:.1f} s ({made['encoded']} encoded)")
    rows = []
    for code in a.codes.split(","):
        for verify in ([False, True] if code == "new" else [False]):
            for state in ("cold", "warm"):
                cold = drop_caches() if state == "cold" else False
                r = run(*codes[code], folder, a.n, a.dim, verify)
                assert r["encoded"] == 0, r
                rows.append({"code": code, "verify": verify, "cache": state if state == "warm" or cold else
                             "warm (drop_caches refused)", **r})
                print(rows[-1], flush=True)
    size = sum(f.stat().st_size for f in folder.iterdir())
    lines = [f"# Start-up on a cached store: {a.n:,} x {a.dim} float16 ({size / 1e9:.2f} GB, "
             f"{len(list(folder.glob('*.npy')))} shards)", "",
             f"Command: `python bench/store_startup.py --work {a.work} --n {a.n} --dim {a.dim} --old {a.old}`  ",
             f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores), Python {platform.python_version()}; "
             "each row a fresh process; cold = page cache dropped first.", "",
             "| code | check | page cache | seconds | read from files |", "|---|---|---|---|---|"]
    for r in rows:
        check = "CRC of every shard" if r["code"] == "old" or r["verify"] else "sizes and headers"
        what = f"{'old (' + a.old + ')' if r['code'] == 'old' else 'new'}" + (" --verify-cache" if r["verify"] else "")
        lines.append(f"| {what} | {check} | {r['cache']} | {r['seconds']:.2f} | {r['read_bytes'] / 1e9:.3f} GB |")
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
