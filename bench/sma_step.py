"""Benchmark (not a test): SMA's training-step cost and feature-extraction speed.

1. One training step (heads forward, loss, NaN check, backward, AdamW step) of `flqmi` vs `infonce` on the same heads
   and the same batch of cached features: N entities x K views x M captions, heads Di -> hidden -> d and
   Dt -> hidden -> d. sma.py forwards the whole set batch through the heads for every loss (the single-pair
   baselines pick one view and one caption after the heads), so the "same batch" step is what training runs; the
   `infonce, picked rows only` line forwards just the N picked views and captions, the cheapest possible InfoNCE.
   Target on an H100-class GPU at N=1024, K=2, M=5, d=1024: flqmi / infonce <= 1.5x.
2. (--extract, meant for CUDA) frozen-feature extraction img/s of sma.py's path (Encoder.encode: no_grad + bf16
   autocast) vs plain timm eager in fp32 on the same model (DINOv2 ViT-L/14 at 224 px, sma.py's default, with random
   weights: speed does not depend on them), same input batch in GPU memory. Two baselines: with autograd on (a bare
   `model.forward_features(x)`) and under torch.no_grad(); the ratio is taken against the faster of the two. TF32 is
   on for every line (as sma.py sets it), which favours the fp32 baseline. Then sma.py's whole extraction
   (DataLoader workers, decode, augmentations, encode_all) on the emoji images. The ratio printed here is against
   fp32 eager, NOT the fair baseline: a user's one-line timm loop runs in bf16 (autocast or bf16 weights), which
   bench/extract.py measures side by side with ours (issue target >= 1.3x of that bf16 baseline).

  python bench/sma_step.py                       # CPU size (N=256, d=256) unless CUDA is present
  python bench/sma_step.py --extract --out bench/sma_step_gpu.md    # on a GPU: the issue's sizes + extraction
Warm-up steps are excluded from timing; CUDA timings synchronise before reading the clock; n = timed repeats.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sma  # noqa: E402


def timed(fn, n, warmup, cuda):
    """Per-call seconds of fn() over n timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def step_bench(a, device):
    cuda = device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    N, K, M = a.n, a.k, a.m
    xi = torch.randn(N, K, a.di, generator=g).to(device)  # (N, K, Di) cached image features
    xt = torch.randn(N, M, a.dt, generator=g).to(device)  # (N, M, Dt) cached caption features
    mask = (torch.arange(M) < torch.randint(3, M + 1, (N,), generator=g)[:, None]).to(device)  # 3..M captions
    pick_v = torch.randint(K, (N,), generator=g).to(device)
    pick_t = (torch.rand(N, generator=g) * mask.sum(1).cpu()).long().to(device)
    rows = []
    for loss_name, picked in (("flqmi", False), ("infonce", False), ("infonce", True)):
        args = sma.Args(data="-", loss=loss_name, dim=a.d, hidden=a.hidden)
        torch.manual_seed(0)
        model = sma.Heads(a.di, a.dt, args).to(device)  # same initial heads for every line
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        ar = torch.arange(N, device=device)
        bx, bt = (xi[ar, pick_v][:, None], xt[ar, pick_t][:, None]) if picked else (xi, xt)
        pv, pt = (torch.zeros_like(pick_v), torch.zeros_like(pick_t)) if picked else (pick_v, pick_t)

        def step():
            zi, zt, scale, bias = model(bx, bt)
            loss, _ = sma.sma_loss(loss_name, zi, zt, mask, scale, bias, pv, pt)
            assert torch.isfinite(loss)  # the training loop's per-step check (a sync on CUDA)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = timed(step, a.repeats, a.warmup, cuda)
        rows.append((f"{loss_name}" + (", picked rows only" if picked else ""), t))
    base = statistics.median(rows[1][1])
    lines = [f"### Training step: N={N}, K={K}, M={M} (3..M real captions), Di={a.di}, Dt={a.dt}, hidden={a.hidden}, "
             f"d={a.d}, fp32{' + TF32' if cuda else ''}", "", "| step | median ms | mean ± std ms | vs infonce (same batch) |",
             "| --- | --- | --- | --- |"]
    for name, t in rows:
        lines.append(f"| {name} | {1000 * statistics.median(t):.2f} | {1000 * statistics.mean(t):.2f} ± "
                     f"{1000 * statistics.stdev(t):.2f} | {statistics.median(t) / base:.2f}x |")
    return lines


def extract_bench(a, device):
    import timm
    from torch.utils.data import DataLoader
    lines = [f"### Feature extraction: {a.image_encoder}, batch {a.extract_batch}", "",
             "| path | img/s (median) | n |", "| --- | --- | --- |"]
    torch.manual_seed(0)
    enc = sma.load_encoder(a.image_encoder, "image", device)
    name, _, px = a.image_encoder.split(":", 1)[1].partition("@")
    x = torch.randn(a.extract_batch, 3, enc.image_size, enc.image_size, device=device)
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": int(px)} if px else {}))
    plain = plain.eval().to(device)
    cuda = device.startswith("cuda")

    def plain_no_grad():
        with torch.no_grad():
            return plain.forward_features(x)
    rates = {}
    for label, fn in (("plain timm eager (fp32, autograd on)", lambda: plain.forward_features(x)),
                      ("plain timm eager (fp32, torch.no_grad)", plain_no_grad),
                      ("sma.py Encoder.encode (no_grad, bf16 autocast on CUDA)", lambda: enc.encode(x))):
        t = timed(fn, a.repeats, a.warmup, cuda)
        rates[label] = a.extract_batch / statistics.median(t)
        lines.append(f"| {label}, same batch in memory | {rates[label]:.1f} | {a.repeats} |")
    ours = rates.pop("sma.py Encoder.encode (no_grad, bf16 autocast on CUDA)")
    best = max(rates.values())
    pairs = sma.read_pairs(Path(__file__).resolve().parents[1] / "examples/emoji/train.csv")
    n = min(len(pairs.images), a.extract_images)
    views = sma.Views(pairs.images, enc, 2, 0, range(n))  # item = the 2 views of one image, decoded once
    workers = a.workers if a.workers >= 0 else (8 if cuda else 0)
    for _ in DataLoader(views, a.extract_batch // 2, num_workers=workers):  # warm the page cache and the workers
        break
    t = time.perf_counter()
    sma.encode_all(enc, views, Path("/nonexistent/never-saved.pt"), a.extract_batch // 2, workers, "images",
                   save_every_s=1e9)
    if cuda:
        torch.cuda.synchronize()
    lines.append(f"| sma.py extraction from files (decode + 2 views + encode, {workers} workers) | "
                 f"{2 * n / (time.perf_counter() - t):.1f} | 1 pass over {2 * n} views |")
    lines += ["", f"sma.py Encoder.encode / fastest plain timm FP32 baseline: {ours / best:.2f}x (not the fair "
              "baseline: plain timm in bf16 is, see bench/extract.py)"]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--n", type=int, default=1024 if cuda else 256, help="N entities per batch")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--d", type=int, default=1024 if cuda else 256, help="head output dim")
    p.add_argument("--hidden", type=int, default=1024 if cuda else 256)
    p.add_argument("--di", type=int, default=2048 if cuda else 512, help="image feature dim (DINOv2-L: 2048)")
    p.add_argument("--dt", type=int, default=1024 if cuda else 384, help="text feature dim (GTE-large: 1024)")
    p.add_argument("--repeats", type=int, default=50 if cuda else 20)
    p.add_argument("--warmup", type=int, default=10 if cuda else 3)
    p.add_argument("--extract", action="store_true", help="also benchmark feature extraction")
    p.add_argument("--image-encoder", default="timm-random:vit_large_patch14_dinov2.lvd142m@224")
    p.add_argument("--extract-batch", type=int, default=128)
    p.add_argument("--extract-images", type=int, default=512, help="emoji entities for the from-files pass")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="", help="also write the markdown here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as sma.py
    device_name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else \
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"# SMA benchmark: `python {' '.join(sys.argv)}`", "",
             f"device: {device_name}; torch {torch.__version__}; python {platform.python_version()}; "
             f"n = {a.repeats} timed repeats after {a.warmup} warm-up", ""]
    lines += step_bench(a, a.device)
    if a.extract:
        lines += [""] + extract_bench(a, a.device)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
