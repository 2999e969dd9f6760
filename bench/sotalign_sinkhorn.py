"""Benchmark (not a test): SOTAlign's log-domain Sinkhorn against POT's `sinkhorn_log` (torch backend) on the same
device and inputs, and one full stage-2 training step of sotalign.py.

    python bench/sotalign_sinkhorn.py                          # CUDA: n = m = 4096, 100 iterations; step 4096 + 1024
    python bench/sotalign_sinkhorn.py --device cpu --n 512 --batch 512 --paired 128 --out bench/sotalign_sinkhorn_cpu.md

Sinkhorn: cost C = -cosine similarity of random unit vectors (d = 1024), uniform marginals, eps = 0.05, fp32, a fixed
number of iterations (ours: tol = 0, no symmetrised step, so both compute the same iterates; POT: stopThr = 0, which
still checks its error every 10 iterations as it always does). Reported: median ms over --repeats after --warmup
untimed runs (which include torch.compile's compilation), the speed-up over POT, and the plan's relative error
||P_ours - P_pot||_F / ||P_pot||_F. Step: sotalign.train on synthetic features (Di = 2048 as DINOv2-L's CLS+mean,
Dt = 1024 as GTE-large, d = 1024), --batch unpaired images and texts + --paired pairs, KLOT with 100 + 100 iterations;
ms/step is read from train's own log line over the steps after the first --warmup ones.
Writes a markdown table to --out (and prints it) naming the device, torch and POT versions and n.
"""
import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sotalign as so  # noqa: E402


def timed(fn, device, warmup, repeats):
    """(median ms, last result) of fn() over `repeats` runs after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=4096, help="n = m: points on each side of the Sinkhorn problem")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=4096, help="unpaired images and texts per stage-2 step")
    p.add_argument("--paired", type=int, default=1024, help="pairs per stage-2 step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="bench/sotalign_sinkhorn_gpu.md")
    a = p.parse_args()
    import ot  # POT, a test/bench-only dependency

    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as plumbing.setup
    g = torch.Generator().manual_seed(0)
    X, Y = (F.normalize(torch.randn(a.n, 1024, generator=g), dim=-1).to(a.device) for _ in range(2))
    C = -(X @ Y.T)  # (n, n) fp32
    u = torch.full((a.n,), 1.0 / a.n, device=a.device)
    rows = []
    pot_ms, P_pot = timed(lambda: ot.bregman.sinkhorn_log(u, u, C, a.eps, numItermax=a.iters, stopThr=0.0),
                          a.device, a.warmup, a.repeats)
    rows.append(("POT sinkhorn_log (torch backend)", pot_ms, "1.00x", "reference"))
    for name, compile in (("ours, eager", False), ("ours, torch.compile (--compile)", True)):
        try:
            ms, log_P = timed(lambda: so.sinkhorn_log(C, a.eps, iters=a.iters, symmetric=False, compile=compile)[0],
                              a.device, a.warmup, a.repeats)
        except Exception as e:  # e.g. no compiler for inductor on this machine: report, do not hide
            rows.append((name, float("nan"), "-", f"failed: {type(e).__name__}: {str(e)[:80]}"))
            continue
        rel = ((log_P.exp() - P_pot).norm() / P_pot.norm()).item()
        rows.append((name, ms, f"{pot_ms / ms:.2f}x", f"{rel:.2e}"))

    # one full stage-2 step, through sotalign.train itself
    Di, Dt, U = 2048, 1024, max(a.batch, 1)
    feats = lambda n, d: torch.randn(n, d, generator=g)  # noqa: E731
    P = {"image": feats(a.paired, Di), "text": feats(a.paired, Dt), "counts": torch.ones(a.paired, dtype=torch.long)}
    teacher = (so.AffineHead(Di, 256), so.AffineHead(Dt, 256))
    for h in teacher:
        h.W.normal_(generator=g)
    steps = a.warmup + a.repeats
    unpaired_images, unpaired_texts = feats(U, Di), feats(U, Dt)
    step = {}
    for compile in (False, True):  # the same data and initial heads for both
        args = so.Args(pairs="synthetic", steps=steps, paired_batch=a.paired, unpaired_batch=U, log_every=1,
                       ckpt_every=10**9, out="/tmp/sotalign_bench", sinkhorn_tol=0.0, device=a.device,
                       compile=compile)
        lines = []  # with log_every = 1 each log line times exactly one step
        so.train(args, P, unpaired_images, unpaired_texts, teacher, 0, 1, a.device, lines.append)
        step_ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", "\n".join(lines))][a.warmup:]
        step["--compile" if compile else "--no-compile"] = statistics.median(step_ms)

    dev = (torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)")
    md = [f"# SOTAlign Sinkhorn and stage-2 step benchmark ({a.device})", "",
          f"Device: {dev}; torch {torch.__version__}; POT {ot.__version__}; Python {platform.python_version()}.",
          f"Command: `python {' '.join(sys.argv)}`", "",
          f"## Log-domain Sinkhorn, n = m = {a.n}, {a.iters} iterations, eps = {a.eps}, fp32",
          f"median of {a.repeats} runs after {a.warmup} warm-up runs", "",
          "| implementation | ms | speed-up vs POT | plan relative error vs POT |", "|---|---|---|---|"]
    md += [f"| {n} | {ms:.2f} | {s} | {r} |" for n, ms, s, r in rows]
    md += ["", f"## One stage-2 step: {U} unpaired images + {U} unpaired texts + {a.paired} pairs, "
               f"Di = {Di}, Dt = {Dt}, d = 1024, KLOT with {args.sinkhorn_iters} + {args.sinkhorn_iters} iterations",
           "", f"median ms/step over {len(step_ms)} steps after {a.warmup} warm-up steps (sotalign.train's own "
               "ms/step: forward, SigLIP, KLOT, backward, AdamW)", "", "| Sinkhorn kernel | ms/step |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in step.items()] + [""]
    text = "\n".join(md)
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
