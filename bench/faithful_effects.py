"""The measured size of each remaining difference from the authors' code (docs/FAITHFULNESS.md), on small cases.

  python bench/faithful_effects.py --cache-dir .cache/sweep      # after sweep.py filled that cache (emoji set)

Writes bench/faithful_effects.md (--sections picks some of 1-7; the file then holds only those). Each section
computes one difference both ways: our form and the authors' (written here from their definition, in our words).
Data: the emoji set as sweep.py splits it (examples/emoji/train.csv, 20% validation by sha1 of the image path), the
offline encoders EfficientNet-Lite0 + MiniLM; scores on the validation split (retrieval R@1 = (i2t + t2i) / 2,
zero-shot acc1 on the held-out task's classes). CPU, 1 thread.
"""
import argparse
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sma  # noqa: E402
import sotalign as so  # noqa: E402
import sweep  # noqa: E402


def old_siglip(x, y, scale, bias, xu, yu):
    """Our first version: one (N + n, N + m) logit matrix without its unpaired block, summed and divided by N."""
    N = len(x)
    X, Y = torch.cat([x, xu]), torch.cat([y, yu])
    logits = scale * X @ Y.T + bias
    z = -torch.ones_like(logits)
    z[:N, :N] += 2 * torch.eye(N, dtype=x.dtype)
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[N:, N:] = False
    return -(F.logsigmoid(z * logits) * keep).sum() / N


def old_finish(C, eps, iters):
    """Our first symmetrised finish: one more full column + row update, averaged with the current potentials."""
    n, m = C.shape
    M = -C / eps
    log_a = torch.full((n,), -math.log(n), dtype=C.dtype)
    log_b = torch.full((m,), -math.log(m), dtype=C.dtype)
    f, g = torch.zeros(n, dtype=C.dtype), torch.zeros(m, dtype=C.dtype)
    for _ in range(iters):
        g = log_b - torch.logsumexp(M + f[:, None], 0)
        f = log_a - torch.logsumexp(M + g[None, :], 1)
    g2 = log_b - torch.logsumexp(M + f[:, None], 0)
    f2 = log_a - torch.logsumexp(M + g2[None, :], 1)
    return M + (f + f2)[:, None] / 2 + (g + g2)[None, :] / 2


def errors(log_P):
    P = log_P.exp()
    n, m = P.shape
    return (P.sum(1) - 1 / n).abs().sum().item(), (P.sum(0) - 1 / m).abs().sum().item()


def their_structure_divergence(E, A, tau):
    """STRUCTURE's code (src/loss/clip_loss.py, structure_reg, L = 1): 1/2 [KL(m || P_A) + KL(m || P_E)], row mean."""
    def neighbours(Z):
        Z = F.normalize(Z, dim=-1)
        Z = Z - Z.mean(0)
        return torch.softmax(Z @ Z.T / tau, dim=-1)
    PE, PA = neighbours(E), neighbours(A)
    m = (PE + PA) / 2
    kl = lambda p, q: (p * (p / q).log()).sum(-1).mean()  # noqa: E731  KL(p || q), mean over rows
    return (kl(m, PA) + kl(m, PE)) / 2


def release_sinkhorn(C, eps, iters):
    """The release's loop (ExplainableML/SOTAlign@4a810a1, src/klot.py, sinkhorn), in our words: uniform marginals,
    potentials f (rows) then g (columns) each iteration, all `iters` run, then f moves half-way to its next update
    (g's update from the unmoved f is g itself). Returns log P (n, m)."""
    n, m = C.shape
    M = -C / eps
    log_a = torch.full((n,), -math.log(n), dtype=C.dtype)
    log_b = torch.full((m,), -math.log(m), dtype=C.dtype)
    f, g = torch.zeros(n, dtype=C.dtype), torch.zeros(m, dtype=C.dtype)
    for _ in range(iters):
        f = log_a - torch.logsumexp(M + g[None, :], 1)
        g = log_b - torch.logsumexp(M + f[:, None], 0)
    f = (f + log_a - torch.logsumexp(M + g[None, :], 1)) / 2
    return M + f[:, None] + g[None, :]


def klot_grad(log_P, log_P_star, eps):
    """KLOT's gradient with respect to K, (P - P*) / eps (their Theorem 5.1), from the two log plans."""
    return (log_P.exp() - log_P_star.exp()) / eps


def cca_all_components(X, Y, reg=0.1, floor=1e-6):
    """so.cca without dropping the rho = 0 components: all min(Dx, Dy), as the development code's CCA keeps
    (roschmsi/vl-alignment-thesis@62a7c18, optimal_transport/similarity.py, CCA.fit). When n < D the extra ones span
    directions the pairs do not correlate on; the SVD picks their basis arbitrarily."""
    (X, mx), (Y, my), n = so._normalise_centre(X), so._normalise_centre(Y), len(X)

    def inv_sqrt(C):
        e, Q = torch.linalg.eigh(C)
        return (Q * e.clamp_min(floor).rsqrt()) @ Q.T
    Sx = inv_sqrt(X.T @ X / n + reg * torch.eye(X.shape[1], dtype=X.dtype))
    Sy = inv_sqrt(Y.T @ Y / n + reg * torch.eye(Y.shape[1], dtype=Y.dtype))
    U, rho, Vh = torch.linalg.svd(Sx @ (X.T @ Y / n) @ Sy, full_matrices=False)
    return {"mu_x": mx, "W_x": Sx @ U, "mu_y": my, "W_y": Sy @ Vh.T, "rho": rho}


class DefaultInitHeads(so.Heads):
    """sotalign's heads with PyTorch's default Linear initialisation instead of the authors' Xavier (section 5)."""

    def __init__(self, di, dt, args):
        super().__init__(di, dt, args)
        for layer in self.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=".cache/sweep")
    p.add_argument("--out", default=str(ROOT / "bench" / "faithful_effects.md"))
    p.add_argument("--sections", default="1,2,3,4,5,6,7", help="which sections to compute (comma list)")
    a = p.parse_args()
    todo = {int(k) for k in a.sections.split(",")}
    torch.set_num_threads(1)
    t0 = time.time()
    s = sweep.parse_args(["--data", str(ROOT / "examples/emoji/train.csv"), "--heldout", "emoji", "--val-classes",
                          str(ROOT / "examples/emoji/subgroups.csv"), "--cache-dir", a.cache_dir])
    pairs = sma.read_pairs(s.data)
    F_ = sma.features(pairs, sma.Args(data=s.data, image_encoder=s.image_encoder, text_encoder=s.text_encoder,
                                      views=s.views, cache_dir=s.cache_dir))
    F_ = {**F_, "image": F_["image"].tensor().float(), "text": F_["text"].tensor().float()}  # as sweep.main does
    train_ids, val_ids = sweep.val_split(pairs, s.val_pct)
    held = sweep.load_tasks(s.heldout, {"image_encoder": s.image_encoder, "text_encoder": s.text_encoder},
                            s.cache_dir)
    val = sweep.val_tasks(pairs, F_, val_ids, s.val_classes, held)
    common = {"image_encoder": s.image_encoder, "text_encoder": s.text_encoder, "dim": 128, "batch": 128,
              "tmp": str(Path(a.cache_dir) / "faithful_tmp")}

    def scores(heads):
        r = sweep.score_all(heads, val)
        return f"R@1 {100 * r['R@1']:.1f}, zs {100 * r['zs_acc1']:.1f}"

    L = ["# The measured size of each difference from the authors' code", "",
         f"`python bench/faithful_effects.py`; CPU ({platform.machine()}, {os.cpu_count()} cores, 1 thread), torch "
         f"{torch.__version__}; emoji set ({len(train_ids)} training + {len(val_ids)} validation entities), "
         "EfficientNet-Lite0 + MiniLM. Scores: validation retrieval R@1 (i2t + t2i) / 2 and zero-shot acc1, %. "
         "See docs/FAITHFULNESS.md for what each row compares.", ""]

    # 1. SigLIP's normalisation
    if 1 in todo:
        x, y, xu, yu = (F.normalize(torch.randn(128, 128, generator=torch.Generator().manual_seed(k),
                                                dtype=torch.float64), dim=-1).requires_grad_() for k in range(4))
        scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
        old, new = old_siglip(x, y, scale, bias, xu, yu), so.siglip(x, y, scale, bias, xu, yu)[0]
        g_old = torch.autograd.grad(old, x)[0].norm().item()
        g_new = torch.autograd.grad(new, x)[0].norm().item()
        L += ["## 1. SigLIP's normalisation (N = n = m = 128, d = 128, random unit vectors, scale 20, bias -10)", "",
              f"- value: our first form {old.item():.4g}, the authors' mean {new.item():.4g}: ratio "
              f"{old.item() / new.item():.0f}",
              f"- gradient norm w.r.t. the paired images: ratio {g_old / g_new:.0f} (N + M = 256; the pairs-only block "
              "would give N = 128)", ""]

    # 2. Sinkhorn's finish
    if 2 in todo:
        K = F.normalize(torch.randn(128, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=-1)
        Kt = F.normalize(torch.randn(128, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64), dim=-1)
        C = -(K @ Kt.T)
        L += ["## 2. Sinkhorn's symmetrised last half-step (128 x 128 cosine costs of random 64-d unit vectors, 100 "
              "iterations), L1 marginal errors (rows, columns)", "", "| eps | no finish | our first finish | the "
              "authors' half-step (ours now) |", "|---|---|---|---|"]
        for eps in (0.05, 0.005):
            none = so.sinkhorn_log(C, eps, iters=100, symmetric=False)[0]
            official = so.sinkhorn_log(C, eps, iters=100)[0]
            cells = [errors(P) for P in (none, old_finish(C, eps, 100), official)]
            L.append(f"| {eps} | " + " | ".join(f"{r:.2e}, {c:.2e}" for r, c in cells) + " |")
        L.append("")

    # 3. STRUCTURE's divergence
    if 3 in todo:
        n = 256
        E = F.normalize(F_["image"][train_ids[:n]][:, 0].double(), dim=-1)  # unit rows: the noise below is relative
        D = E.shape[1]
        R = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
        Q = R[:, :128]  # (D, 128) orthonormal columns: a projection onto 128 random directions
        L += ["## 3. STRUCTURE's divergence: the paper's JS (ours) against their code's 1/2 [KL(m||P_A) + KL(m||P_E)] "
              f"(emoji image features, n = {n}, tau = 0.05); value, and the gradient norm ||dR/dA||_F that training "
              "follows", "", "| aligned A | JS (ours) | theirs | theirs / ours | gradient norm ours | theirs | "
              "theirs / ours |", "|---|---|---|---|---|---|---|"]
        random_head = torch.randn(D, 128, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
        noise = torch.randn(n, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64) / math.sqrt(D)
        unrelated = torch.randn(n, 128, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        for name, A in (("E R, R a rotation (the same geometry)", E @ R),
                        ("E R + noise of norm 0.1 per (unit) row (near alignment)", E @ R + 0.1 * noise),
                        ("E R + noise of norm 0.3 per row", E @ R + 0.3 * noise),
                        ("E R + noise of norm 1 per row", E @ R + noise),
                        ("E Q, Q a projection onto 128 random directions", E @ Q),
                        ("a random linear head (a bad start)", E @ random_head),
                        ("unrelated embeddings (Gaussian, independent of E)", unrelated)):
            A = A.clone().requires_grad_()
            ours, theirs = so.structure(E, A, 0.05), their_structure_divergence(E, A, 0.05)
            g_ours = torch.autograd.grad(ours, A)[0].norm().item()
            g_theirs = torch.autograd.grad(theirs, A)[0].norm().item()
            ours, theirs = ours.item(), theirs.item()
            ratio = f"{theirs / ours:.3f}" if ours > 1e-12 else "–"
            g_ratio = f"{g_theirs / g_ours:.3g}" if g_ours > 1e-12 else "–"
            L.append(f"| {name} | {ours:.4g} | {theirs:.4g} | {ratio} | {g_ours:.3g} | {g_theirs:.3g} | {g_ratio} |")
        L.append("")

    # 4. CSA: ridge and score; the teacher's rows; covariance divisor; Procrustes
    if 4 in todo:
        full = sweep.run_data(F_, train_ids, len(train_ids), 0, False)["pairs"]
        quarter = sweep.run_data(F_, train_ids, round(0.25 * len(train_ids)), 0, False)["pairs"]
        X = F.normalize(full["image"].double(), dim=-1)
        X = X - X.mean(0)
        ev = torch.linalg.eigvalsh(X.T @ X / len(X))
        L += ["## 4. Closed-form teachers (validation scores)", "",
              f"Image covariance of the L2-normalised, centred emoji features ({len(X)} images, D = {X.shape[1]}): "
              f"largest eigenvalue {ev.max():.3g}, median {ev.median():.2g}.", "",
              "| teacher | budget | variant | top rho | scores |", "|---|---|---|---|---|"]
        for label, P in (("100%", full), ("25%", quarter)):
            rows = P["image"].repeat_interleave(P["counts"], 0)
            for reg in (0.1, 1e-3, 0.0):
                rho = so.cca(rows, P["text"], reg)["rho"][0].item()
                heads = so.fit_teacher(P, "csa", reg, 0)
                weighted = scores(heads)
                del heads[0].score_weights
                T = so.csa(rows, P["text"], reg)  # the old export: sqrt(rho)-scaled heads, scored by their cosine
                heads[0].W.copy_(T["W_x"] * T["rho"].sqrt())
                heads[1].W.copy_(T["W_y"] * T["rho"].sqrt())
                L.append(f"| csa, dim all | {label} | reg {reg}: CSA's score / old cosine of sqrt(rho)-scaled heads | "
                         f"{rho:.3f} | {weighted} / {scores(heads)} |")
            for captions in ("rows", "mean"):
                L.append(f"| cca, reg 0.1 | {label} | fitted on {captions} | – | "
                         f"{scores(so.fit_teacher(P, 'cca', 0.1, captions=captions))} |")
            n_rows = int(P["counts"].sum())
            L.append(f"| cca | {label} | covariances / (n - 1) (theirs) = ours at reg 0.1 (n - 1) / n | – | "
                     f"{scores(so.fit_teacher(P, 'cca', 0.1 * (n_rows - 1) / n_rows))} vs "
                     f"{scores(so.fit_teacher(P, 'cca', 0.1))} |")
            ours = so.fit_teacher(P, "procrustes", 0.0)
            Xc = F.normalize(rows.double(), dim=-1)
            Yc = F.normalize(P["text"].double(), dim=-1)
            mx, my = Xc.mean(0), Yc.mean(0)
            Xc, Yc = Xc - mx, Yc - my

            def zca(A, lam):  # (C + lam I)^-1/2, eigenvalues floored at 1e-6 (their precompute_procrustes_projections)
                e, V = torch.linalg.eigh(A.T @ A / (len(A) - 1) + lam * torch.eye(A.shape[1], dtype=A.dtype))
                return (V * e.clamp_min(1e-6).rsqrt()) @ V.T
            Wx, Wy = zca(Xc, 0.1), zca(Yc, 0.1)
            U, _, Vh = torch.linalg.svd(Wx @ (Xc.T @ Yc / (len(Xc) - 1)) @ Wy, full_matrices=False)
            theirs = so.affine_heads({"mu_x": mx, "W_x": Wx @ U @ Vh, "mu_y": my, "W_y": Wy})
            L.append(f"| procrustes | {label} | ours (plain) / theirs (ZCA-whitened, reg 0.1) | – | {scores(ours)} / "
                     f"{scores(theirs)} |")
        L.append("")

    # 6. The Sinkhorn loop: order, orientation, early stop, against KLOT's gradient
    if 6 in todo:
        L += ["## 6. The Sinkhorn loop: KLOT's gradient (P - P*) / eps, eps 0.05, eps* 0.005, 100 iterations, "
              "random 64-d unit vectors (student K) with a noisy copy (teacher K*), and emoji features", "",
              "Relative difference ||G - G_ours||_F / ||G_ours||_F, G_ours: sotalign.sinkhorn_log at tol 0 (all 100 "
              "iterations). L1 marginal error of P* after 100 iterations (ours): the teacher's plan has not converged.",
              "", "| case | P* marginal error | release on K (images x texts) | release on K^T (texts x images), "
              "transposed | ours, --sinkhorn-tol 1e-3 (the default) |", "|---|---|---|---|---|"]
        quarter = sweep.run_data(F_, train_ids, round(0.25 * len(train_ids)), 0, False)["pairs"]
        teacher = so.fit_teacher(quarter, "cca", 0.1)
        rest = sweep.subset(F_, val_ids)  # items outside the teacher's fit stand in for the unpaired sets
        UI, UT = rest["image"][:, 0].double(), rest["text"].double()
        cases = []
        for seed, (n, m) in enumerate(((128, 128), (256, 256), (256, 128), (1024, 1024))):
            gen = torch.Generator().manual_seed(20 + seed)
            x = F.normalize(torch.randn(n, 64, generator=gen, dtype=torch.float64), dim=-1)
            y = F.normalize(torch.randn(m, 64, generator=gen, dtype=torch.float64), dim=-1)
            K_star = x @ y.T + 0.3 * torch.randn(n, m, generator=gen, dtype=torch.float64)  # mostly agrees with K
            cases.append((f"random, {n} x {m}", x @ y.T, K_star))
        for seed, n in enumerate((128, min(256, len(UI), len(UT)))):  # emoji: CCA teacher, random 128-d linear student
            gen = torch.Generator().manual_seed(30 + seed)
            xi, xt = UI[:n], UT[:n]
            Wi = torch.randn(xi.shape[1], 128, generator=gen, dtype=torch.float64)
            Wt = torch.randn(xt.shape[1], 128, generator=gen, dtype=torch.float64)
            K = F.normalize(F.normalize(xi, dim=-1) @ Wi, dim=-1) @ F.normalize(F.normalize(xt, dim=-1) @ Wt, dim=-1).T
            cases.append((f"emoji 25%: CCA K*, random head K, {n} x {n}", K,
                          so.teacher_similarity(teacher, xi.float(), xt.float()).double()))
        for name, K, K_star in cases:
            ours = [so.sinkhorn_log(-k, e, iters=100)[0] for k, e in ((K, 0.05), (K_star, 0.005))]
            err_star = so.sinkhorn_log(-K_star, 0.005, iters=100)[1].item()
            G = klot_grad(*ours, 0.05)
            rel = lambda H: ((H - G).norm() / G.norm()).item()  # noqa: E731
            release = klot_grad(release_sinkhorn(-K, 0.05, 100), release_sinkhorn(-K_star, 0.005, 100), 0.05)
            release_t = klot_grad(release_sinkhorn(-K.T, 0.05, 100).T, release_sinkhorn(-K_star.T, 0.005, 100).T, 0.05)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tol = klot_grad(so.sinkhorn_log(-K, 0.05, iters=100, tol=1e-3)[0],
                                so.sinkhorn_log(-K_star, 0.005, iters=100, tol=1e-3)[0], 0.05)
            L.append(f"| {name} | {err_star:.2e} | {100 * rel(release):.2f}% | {100 * rel(release_t):.1e}% | "
                     f"{100 * rel(tol):.1e}% |")
        L.append("")

    # 7. CCA's rho = 0 components (n < D): dropped (ours) or kept (theirs), K* on items outside the fit
    if 7 in todo:
        L += ["## 7. CCA teacher, reg 0.1: rho = 0 components dropped (ours) or kept (the development code), K* on the "
              "validation entities (not in the fit)", "",
              "| budget | rows fitted | components ours / theirs | rel. diff of K* (Frobenius) | same top text per "
              "image | same top image per text | scores ours / theirs |", "|---|---|---|---|---|---|---|"]
        held_out = sweep.subset(F_, val_ids)
        vi, val_texts = held_out["image"][:, 0], held_out["text"]  # (E_val, Di), (captions, Dt)
        for frac in (0.05, 0.25, 1.0):
            P = sweep.run_data(F_, train_ids, round(frac * len(train_ids)), 0, False)["pairs"]
            rows = P["image"].repeat_interleave(P["counts"], 0)
            kept = {}
            fits = (("ours", so.cca(rows, P["text"], 0.1)), ("theirs", cca_all_components(rows, P["text"], 0.1)))
            for name, T in fits:
                kept[name] = (so.affine_heads(T), T["W_x"].shape[1])
            Ko = so.teacher_similarity(kept["ours"][0], vi, val_texts).double()  # (E_val, captions)
            Kt = so.teacher_similarity(kept["theirs"][0], vi, val_texts).double()
            rel = ((Ko - Kt).norm() / Kt.norm()).item()
            same_i = (Ko.argmax(1) == Kt.argmax(1)).double().mean().item()
            same_t = (Ko.argmax(0) == Kt.argmax(0)).double().mean().item()
            L.append(f"| {round(100 * frac)}% | {len(rows)} | {kept['ours'][1]} / {kept['theirs'][1]} | {rel:.3f} | "
                     f"{100 * same_i:.1f}% | {100 * same_t:.1f}% | {scores(kept['ours'][0])} / "
                     f"{scores(kept['theirs'][0])} |")
        L.append("")

    # 5. Optimiser, init, batch: siglip-pairs at 25%, 300 steps, seeds 0-2
    if 5 in todo:
        data = sweep.run_data(F_, train_ids, round(0.25 * len(train_ids)), 0, True)
        variants = [("the authors' settings (Lion, wd 1e-5, 10% warm-up, scale 20, Xavier) at lr 3e-4", {}),
                    ("SigLIP scale starts at 10 (tau 0.1)", {"tau": 0.1}),
                    ("AdamW lr 1e-3, wd 1e-4 (our first default)", {"optimizer": "adamw", "lr": 1e-3, "wd": 1e-4}),
                    ("PyTorch's default Linear init instead of Xavier", {"default_init": True}),
                    ("all pairs in every step (theirs), not 128", {"paired_batch": 10 ** 6})]
        L += ["## 5. Optimiser, initialisation, batch (siglip-pairs, 25% budget, 300 steps, mean over seeds 0-2)", "",
              "| variant | scores | final logit scale |", "|---|---|---|"]
        for name, change in variants:
            results, scales = [], []
            for seed in range(3):
                args = so.Args(pairs="-", dim=128, overwrite=True, head_layers=1,
                               paired_batch=change.get("paired_batch", 128),
                               steps=300, lr=change.get("lr", 3e-4), optimizer=change.get("optimizer", "lion"),
                               wd=change.get("wd", 1e-5), tau=change.get("tau", 0.0), seed=seed, out=common["tmp"],
                               device="cpu", compile=False, log_every=10 ** 9, ckpt_every=10 ** 9)
                authors_heads = so.Heads
                if change.get("default_init"):  # PyTorch's own Linear init (kaiming-uniform) drawn again after Xavier's
                    so.Heads = DefaultInitHeads
                try:
                    model, _ = so.train(args, data["pairs"], None, None, None, 0, 1, "cpu", log=lambda *_: None)
                finally:
                    so.Heads = authors_heads
                results.append(sweep.score_all((model.image_head, model.text_head), val))
                scales.append(model.logit_scale.exp().item())
            r1 = sum(r["R@1"] for r in results) / 3
            zs = sum(r["zs_acc1"] for r in results) / 3
            L.append(f"| {name} | R@1 {100 * r1:.1f}, zs {100 * zs:.1f} | {max(scales):.1f} (max) |")
    L += ["", f"Wall time {time.time() - t0:.0f} s."]
    Path(a.out).write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))


if __name__ == "__main__":
    main()
