"""Benchmark (not a test): feature extraction at the papers' scale, the feature store against the code it replaced,
in one invocation; then stage 2 of sotalign.py on 1M unpaired + 10k paired features, and sma.py on 118k entities.

    nice -n 10 python bench/scale.py --out bench/scale_cpu.md          # ~40 min on 2 shared CPU cores

Extraction: sotalign.features("unpaired", "text", N items, ...) with a stand-in encoder (`py:scale:stand_in`, this
file): random features of --dim, no decode, at a fixed pace of --pace items/s per rank (a sleep per batch of 64),
so the time measured is the pipeline's, not a model's. N in {10k, 100k, 1M} at 1,024-d and 1M at 2,048-d; 1 process,
and 2 gloo ranks under torchrun. The old code is the commit in --old (git archive of its sotalign.py and plumbing.py
into a temporary folder, imported there). Each run is a fresh child process on an empty cache folder: wall time of
the features() call, peak RSS per rank (getrusage ru_maxrss), per node (the sum of the ranks' peaks, an upper
bound), bytes written (/proc/self/io wchar, all ranks), the final cache folder's size. Growth exponents: the slope
of log(time), log(bytes) against log(N) between 100k and 1M. Runs the old code cannot fit in this machine's RAM are
skipped and said so (--max-old-gb: the largest fp32 feature matrix tried with the old code).
Stage 2 (new code only): sotalign.train on stores of 1M x 1,024 unpaired images and texts + 10k pairs, and sma.train
on 118k entities x K = 2 x M = 5 (1,024-d), a few steps: ms/step from their log lines (after the first), peak RSS.
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def stand_in(modality, device="cpu"):
    """py:scale:stand_in: random (B, SCALE_DIM) features at SCALE_PACE items/s, no model, no decode."""
    from plumbing import Encoder
    dim, pace = int(os.environ.get("SCALE_DIM", "1024")), float(os.environ.get("SCALE_PACE", "5000"))

    def forward(texts):
        time.sleep(len(texts) / pace)
        return torch.randn(len(texts), dim)
    return Encoder("", modality, dim, forward)


def written() -> int:
    with open("/proc/self/io") as f:
        return int(re.search(r"wchar: (\d+)", f.read()).group(1))


def child(a):
    """One extraction in this process (one rank under torchrun): prints a JSON line with its figures."""
    a = argparse.Namespace(**json.loads(a))
    if a.code == "old":
        sys.path.insert(0, a.old_dir)
    else:
        sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import sotalign as so
    rank, world, device = so.setup("cpu")
    args = so.Args(pairs="-", text_encoder="py:scale:stand_in", cache_dir=a.cache, extract_batch_size=BATCH)
    items = [f"item {i:07d}" for i in range(a.n)]
    w0, t0 = written(), time.time()
    X = so.features("unpaired", "text", items, args, {}, rank, world, device)
    seconds, wrote = time.time() - t0, written() - w0
    assert len(X) == a.n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": rank, "s": seconds, "rss": peak, "wrote": wrote}
    # one file per rank: two ranks' lines printed to one pipe can interleave (it broke a parse)
    Path(a.results, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def extraction(code, n, dim, ranks, a, old_dir):
    cache = Path(a.work) / f"{code}-{n}-{dim}-{ranks}"
    results = Path(a.work) / f"{code}-{n}-{dim}-{ranks}.results"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    env = {**os.environ, "SCALE_DIM": str(dim), "SCALE_PACE": str(a.pace), "PYTHONPATH": str(ROOT / "bench"),
           "OMP_NUM_THREADS": "1"}
    # the child's settings travel in the environment: torchrun's own parser would take --n and the like
    env.update(SCALE_CHILD=json.dumps({"code": code, "n": n, "cache": str(cache), "old_dir": old_dir,
                                          "results": str(results)}))
    me = [str(Path(__file__).resolve())]
    cmd = [sys.executable, *me] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={ranks}", "--master_port=29533", *me]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    rows = [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]
    shutil.rmtree(results, ignore_errors=True)
    if proc.returncode or len(rows) != ranks:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return {"code": code, "n": n, "dim": dim, "ranks": ranks, "error": f"exit {proc.returncode}"}
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    shutil.rmtree(cache, ignore_errors=True)
    return {"code": code, "n": n, "dim": dim, "ranks": ranks, "s": max(r["s"] for r in rows), "wall": wall,
            "rss_rank": max(r["rss"] for r in rows), "rss_node": sum(r["rss"] for r in rows),
            "wrote": sum(r["wrote"] for r in rows), "store": size}


def stage2(a):
    """sotalign.train on 1M unpaired + 10k pairs, sma.train on 118k x K=2 x M=5: stores made by plumbing.extract."""
    sys.path.insert(0, str(ROOT))
    import plumbing
    import sma
    import sotalign as so

    def store(name, n, row, pace=a.pace * 4):
        def load():
            def encode(batch):
                time.sleep(len(batch) / pace)
                return torch.randn(len(batch), *row)
            return range(n), encode
        return plumbing.extract(Path(a.work) / "stage2" / name, n, load, 1024, desc=f"items {name}")
    out = {}
    E, U, D = 10_000, a.stage2_unpaired, 1024
    P = {"image": store("pi", E, (D,)), "text": store("pt", E, (D,)), "counts": torch.ones(E, dtype=torch.long)}
    UI, UT = store("ui", U, (D,)), store("ut", U, (D,))
    dense = {**P, "image": P["image"].tensor().float(), "text": P["text"].tensor().float()}
    teacher = so.fit_teacher(dense, "cca", 0.1)
    del dense
    lines = []
    args = so.Args(pairs="-", steps=a.steps, paired_batch=1024, unpaired_batch=1024, out=str(Path(a.work) / "run1"),
                   overwrite=True, compile=False, log_every=1, ckpt_every=10 ** 9, dim=1024, sinkhorn_iters=100)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time()
    so.train(args, P, UI, UT, teacher, 0, 1, "cpu", lines.append)
    out["sotalign"] = {"unpaired": U, "pairs": E, "ms": step_ms(lines), "rss": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": rss0, "store": sum(X.nbytes() for X in (UI, UT)),
        "s": time.time() - t0}
    E, K, M = 118_000, 2, 5
    feats = {"image": store("si", E, (K, D)), "text": store("st", E * M, (D,)),
             "counts": torch.full((E,), M, dtype=torch.long)}
    lines = []
    args = sma.Args(data="-", batch_size=1024, epochs=1, stop_after_steps=a.steps, out=str(Path(a.work) / "run2"),
                    log_every=1, ckpt_every=10 ** 9, dim=1024, hidden=1024)
    t0 = time.time()
    sma.train(args, feats, 0, 1, "cpu", lines.append)
    out["sma"] = {"entities": E, "K": K, "M": M, "ms": step_ms(lines), "rss": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "store": feats["image"].nbytes() + feats["text"].nbytes(),
        "s": time.time() - t0}
    print("RESULT " + json.dumps(out), flush=True)


def step_ms(lines):
    ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", "\n".join(lines))]
    return sum(ms[1:]) / max(len(ms) - 1, 1)


def slope(rows, key):
    import math
    by_n = {r["n"]: r[key] for r in rows}
    return math.log(by_n[1_000_000] / by_n[100_000]) / math.log(10) if {100_000, 1_000_000} <= by_n.keys() else None


def gb(x):
    return f"{x / 1e9:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage2", action="store_true", help="only stage 2 (in this process)")
    p.add_argument("--old", default="2b7a02e6429a8c7506eed5b30947764256e70e7c", help="commit of the old code")
    p.add_argument("--repo", default=str(ROOT), help="the git repository holding --old")
    p.add_argument("--pace", type=float, default=5000.0, help="stand-in encoder items/s per rank")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--max-old-gb", type=float, default=4.2, help="largest fp32 features the old code is run with")
    p.add_argument("--stage2-unpaired", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "scale_bench"))
    p.add_argument("--out", default="bench/scale_cpu.md")
    a = p.parse_args()
    if os.environ.get("SCALE_CHILD"):
        return child(os.environ["SCALE_CHILD"])
    if a.stage2:
        return stage2(a)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    a.load_start = os.getloadavg()[0]  # the machine's other work shows in the times: the report states it
    old_dir = tempfile.mkdtemp(prefix="old_code_")
    archive = subprocess.run(["git", "archive", a.old, "sotalign.py", "plumbing.py"], cwd=a.repo, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", old_dir], input=archive, check=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    plan = [(n, 1024, r) for n in sizes for r in (1, 2)] + [(max(sizes), 2048, 1)]
    rows = []
    for n, dim, ranks in plan:
        for code in ("old", "new"):
            if code == "old" and n * dim * 4 / 1e9 * (1 if ranks == 1 else 2.3) > a.max_old_gb:
                rows.append({"code": code, "n": n, "dim": dim, "ranks": ranks, "error": "not run: RAM"})
                continue
            rows.append(extraction(code, n, dim, ranks, a, old_dir))
            print(json.dumps(rows[-1]), flush=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage2", "--work", a.work, "--pace",
                           str(a.pace), "--steps", str(a.steps), "--stage2-unpaired", str(a.stage2_unpaired)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    s2 = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if s2 is None:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
    shutil.rmtree(Path(a.work) / "stage2", ignore_errors=True)
    write_report(a, rows, s2)


def write_report(a, rows, s2):
    cpu = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    md = [f"# Feature extraction at scale: the feature store against the code it replaced ({cpu})", "",
          f"`python bench/scale.py` (one invocation, {time.strftime('%Y-%m-%d')}), torch {torch.__version__}, Python "
          f"{platform.python_version()}. Stand-in encoder `py:scale:stand_in`: random features, {a.pace:.0f} items/s "
          f"per rank, batches of {BATCH}; texts `item 0000001` ...; old = commit {a.old[:7]}'s sotalign.features "
          "(fp32 partial saves every 60 s, all_gather_object, one .pt); new = the float16 feature store. Each row a "
          "fresh process (torchrun for 2 ranks) on an empty cache. RSS per node: the sum of the ranks' peaks. "
          f"Load average (1 min) at the start {a.load_start:.2f}, at the end {os.getloadavg()[0]:.2f}.", "",
          "| code | N | dim | ranks | time s | peak RSS / rank GB | peak RSS / node GB | written GB | store GB | "
          "written / store |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['code']} | {r['n']:,} | {r['dim']} | {r['ranks']} | {r['error']} | | | | | |")
            continue
        md.append(f"| {r['code']} | {r['n']:,} | {r['dim']} | {r['ranks']} | {r['s']:.1f} | {gb(r['rss_rank'])} | "
                  f"{gb(r['rss_node'])} | {gb(r['wrote'])} | {gb(r['store'])} | {r['wrote'] / r['store']:.2f} |")
    md += ["", "Growth exponents between N = 100k and 1M (1,024-d; slope of log y against log N; 1 = linear):", "",
           "| code | ranks | time | bytes written |", "|---|---|---|---|"]
    for code in ("old", "new"):
        for ranks in (1, 2):
            sel = [r for r in rows if r["code"] == code and r["ranks"] == ranks and r["dim"] == 1024
                   and "error" not in r]
            t, b = slope(sel, "s"), slope(sel, "wrote")
            md.append(f"| {code} | {ranks} | {'-' if t is None else f'{t:.2f}'} | {'-' if b is None else f'{b:.2f}'} |")
    if s2:
        so, sm = s2["sotalign"], s2["sma"]
        md += ["", f"## Training on the stores (new code, 1 process, CPU, {a.steps} steps, first step not timed)", "",
               "| run | features | store GB | ms/step | peak RSS GB |", "|---|---|---|---|---|",
               f"| sotalign.train, SigLIP + KLOT, batches 1,024 + 1,024 + 1,024 | {so['pairs']:,} pairs + "
               f"{so['unpaired']:,} unpaired images and texts, 1,024-d | {gb(so['store'])} | {so['ms']:.0f} | "
               f"{gb(so['rss'])} |",
               f"| sma.train, FLQMI, N = 1,024 | {sm['entities']:,} entities x K = {sm['K']} x M = {sm['M']}, "
               f"1,024-d | {gb(sm['store'])} | {sm['ms']:.0f} | {gb(sm['rss'])} |"]
    Path(a.out).write_text("\n".join(md) + "\n")
    json_rows = {"extraction": rows, "stage2": s2}
    Path(a.out).with_suffix(".json").write_text(json.dumps(json_rows, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
