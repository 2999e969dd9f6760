"""The authors' formulas, written from their definitions in our words (float64, brute force), against sotalign.py:
SigLIP's mean normalisation (SAIL's pairs-only and the authors' semi-supervised rectangle), the symmetrised last
half-step of their Sinkhorn, CSA's unregularised CCA with fewer pairs than dimensions and its rho-weighted score, the
collapsed-caption teacher fit, Lion's update rule, and the authors' initial values (docs/FAITHFULNESS.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
import sotalign as so


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------- SigLIP, as the authors normalise it
def brute_rectangle(anchors, targets, N, scale, bias):
    """-mean over the (N, len(targets)) logits of log sigmoid(z (scale <a_k, t_l> + bias)), z = +1 iff k = l."""
    total = 0.0
    for k in range(N):
        for l in range(len(targets)):
            z = 1.0 if k == l else -1.0
            total -= math.log(1 / (1 + math.exp(-z * (scale * float(anchors[k] @ targets[l]) + bias))))
    return total / (N * len(targets))


def test_siglip_is_the_mean_over_the_logits_pairs_only_and_with_unpaired_negatives():
    x, y, xu, yu = unit(4, 3, seed=1), unit(4, 3, seed=2), unit(5, 3, seed=3), unit(2, 3, seed=4)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    # SAIL's and the authors' supervised loss: the mean over the N x N logits
    assert so.siglip(x, y, scale, bias)[0].item() == pytest.approx(brute_rectangle(x, y, 4, 20.0, -10.0), rel=1e-12)
    # the authors' semi-supervised loss: image anchors against all texts, text anchors against all images, averaged
    want = (brute_rectangle(x, torch.cat([y, yu]), 4, 20.0, -10.0)
            + brute_rectangle(y, torch.cat([x, xu]), 4, 20.0, -10.0)) / 2
    assert so.siglip(x, y, scale, bias, xu, yu)[0].item() == pytest.approx(want, rel=1e-12)
    args = [t.clone().requires_grad_() for t in (x, y, xu, yu)]
    assert torch.autograd.gradcheck(lambda *t: so.siglip(t[0], t[1], scale, bias, t[2], t[3])[0], args)


def test_the_pair_block_counts_twice_and_each_unpaired_block_once():
    """Moving one unpaired text changes only L_img (weight 1/2 of one mean); a pair's logit enters both means."""
    x, y, xu, yu = unit(3, 4, seed=5), unit(3, 4, seed=6), unit(2, 4, seed=7), unit(2, 4, seed=8)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    yu = yu.clone().requires_grad_()
    y = y.clone().requires_grad_()
    so.siglip(x, y, scale, bias, xu, yu)[0].backward()
    # d/dyu_l of -log sigmoid(-(s <x_k, yu_l> + b)) = s sigmoid(s <x_k, yu_l> + b) x_k, averaged over 3 x 5, halved
    want = sum(5.0 * torch.sigmoid(5.0 * (x[k] @ yu[1]) - 2.0) * x[k] for k in range(3)) / (3 * 5) / 2
    assert torch.allclose(yu.grad[1], want.detach(), atol=1e-12)


# ---------------------------------------------------------------- Sinkhorn's symmetrised last half-step
def official_sinkhorn(C, eps, a, b, iters):
    """The authors' loop and finish (ExplainableML/SOTAlign, src/klot.py, sinkhorn), in our words: rows u then columns
    v each iteration; then u' = the row update from v, v' = the column update from the *old* u, and both averaged."""
    K = -C / eps
    u = torch.zeros(len(a), dtype=C.dtype)
    v = torch.zeros(len(b), dtype=C.dtype)
    for _ in range(iters):
        u = a.log() - torch.logsumexp(K + v[None, :], dim=1)
        v = b.log() - torch.logsumexp(K + u[:, None], dim=0)
    u_next = a.log() - torch.logsumexp(K + v[None, :], dim=1)
    v_next = b.log() - torch.logsumexp(K + u[:, None], dim=0)
    return K + (u + u_next)[:, None] / 2 + (v + v_next)[None, :] / 2


def marginal_errors(P, a, b):
    return (P.sum(1) - a).abs().sum().item(), (P.sum(0) - b).abs().sum().item()


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_symmetrised_half_step_is_the_official_one_in_our_update_order(iters):
    """Ours updates columns then rows (POT's order), theirs rows then columns: ours on C is theirs on C^T,
    transposed."""
    g = torch.Generator().manual_seed(iters)
    C = torch.rand(6, 4, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(), b / b.sum()
    ours, _ = so.sinkhorn_log(C, 0.1, a, b, iters=iters)
    theirs = official_sinkhorn(C.T, 0.1, b, a, iters).T
    assert torch.allclose(ours, theirs, atol=1e-12), (ours - theirs).abs().max()


def test_both_marginal_errors_come_out_as_the_official_form_predicts():
    g = torch.Generator().manual_seed(0)
    n, eps, iters = 8, 0.02, 5  # few iterations at a small eps: errors large enough to see
    C = torch.rand(n, n, generator=g, dtype=torch.float64)
    a = b = torch.full((n,), 1 / n, dtype=torch.float64)
    before = so.sinkhorn_log(C, eps, iters=iters, symmetric=False)[0].exp()
    after, err = so.sinkhorn_log(C, eps, iters=iters)
    after = after.exp()
    rows_before, cols_before = marginal_errors(before, a, b)
    assert rows_before < 1e-14 and cols_before > 1e-3  # the loop ends on the row update: rows exact
    c = before.sum(0)  # the column sums before the half-step
    # the column potential moves half-way (in log space) to its update: columns sum to sqrt(b c), rows to P sqrt(b / c)
    assert torch.allclose(after.sum(0), (b * c).sqrt(), atol=1e-14)
    assert torch.allclose(after.sum(1), before @ (b / c).sqrt(), atol=1e-14)
    rows, cols = marginal_errors(after, a, b)
    assert 0.3 * cols_before < cols < 0.7 * cols_before  # |sqrt(b c) - b| ~ |c - b| / 2: about half the error
    assert rows > 0.1 * cols  # neither marginal exact: the error is split between rows and columns
    assert err.item() == pytest.approx(rows + cols, rel=1e-10)


# ---------------------------------------------------------------- CSA: CCA at ridge 0, its score
def test_cca_and_csa_at_ridge_zero_with_fewer_pairs_than_dimensions():
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    T = so.cca(X, Y, reg=0.0)  # singular covariances: the eigenvalue floor keeps C^-1/2 finite (it raised before)
    assert all(torch.isfinite(v).all() for v in T.values())
    Xc = F.normalize(X, dim=-1) - T["mu_x"]
    Yc = F.normalize(Y, dim=-1) - T["mu_y"]
    # on the training pairs the canonical coordinates are perfectly correlated (n - 1 = 5 of them: CCA overfits)
    assert len(T["rho"]) == 5 and torch.allclose(T["rho"], torch.ones(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(T["W_x"].T @ (Xc.T @ Xc / 6) @ T["W_x"], torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(Xc @ T["W_x"], Yc @ T["W_y"], atol=1e-5)
    W = so.ridge(X, Y, reg=0.0)["W_x"]  # least squares: the minimum-norm exact fit, not an error
    assert torch.isfinite(W).all() and torch.allclose(Xc @ W, Yc, atol=1e-8)


def test_csa_score_through_the_heads_and_evaluate_is_the_rho_weighted_product():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 7, generator=g)
    Y = torch.randn(60, 5, generator=g) + X[:, :5]
    dim = 3
    pairs = {"image": X, "text": Y, "counts": torch.ones(60, dtype=torch.long)}
    image_head, text_head = so.fit_teacher(pairs, "csa", 0.0, dim)
    T = so.cca(X, Y, 0.0)
    px = (F.normalize(X.double(), dim=-1) - T["mu_x"]) @ T["W_x"][:, :dim]  # canonical coordinates, first dim
    py = (F.normalize(Y.double(), dim=-1) - T["mu_y"]) @ T["W_y"][:, :dim]
    xh, yh = F.normalize(px, dim=-1), F.normalize(py, dim=-1)
    with torch.no_grad():
        zi = evaluate.weighted_by(F.normalize(image_head(X[:5]), dim=-1), image_head.score_weights)
        zt = F.normalize(text_head(Y[:5]), dim=-1)
    for i in range(5):
        for j in range(5):  # CSA's weighted_corr_sim, one pair at a time
            s = sum(T["rho"][c] * xh[i, c] * yh[j, c] for c in range(dim))
            assert float(zi[i] @ zt[j]) == pytest.approx(float(s), abs=1e-5)
    assert torch.equal(so.score_weighted(image_head, zi), zi * image_head.score_weights)


def test_teacher_on_collapsed_captions_is_cca_of_the_normalised_caption_means():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([1, 3, 2, 4, 1, 2, 3, 1, 2, 2])
    X, Y = torch.randn(10, 6, generator=g), torch.randn(int(counts.sum()), 5, generator=g)
    heads = so.fit_teacher({"image": X, "text": Y, "counts": counts}, "cca", 0.1, captions="mean")
    means, start = [], 0
    for c in counts.tolist():  # normalise, mean, normalise: one text row per image
        means.append(F.normalize(F.normalize(Y[start:start + c].double(), dim=-1).mean(0), dim=0))
        start += c
    T = so.cca(X, torch.stack(means), 0.1)
    assert torch.allclose(heads[1].W, T["W_y"].float(), atol=1e-5) and torch.allclose(heads[0].W, T["W_x"].float(),
                                                                                       atol=1e-5)


# ---------------------------------------------------------------- Lion
def test_lion_follows_its_update_rule():
    """Chen et al. 2023, Algorithm 2, three steps by hand in float64 against sotalign.Lion, and a resume mid-way."""
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    lr, (b1, b2), wd = 0.1, (0.9, 0.99), 0.05
    theta, m = theta0.clone(), torch.zeros(5, dtype=torch.float64)
    for grad in grads:  # the definition
        c = b1 * m + (1 - b1) * grad
        theta = theta - lr * (torch.sign(c) + wd * theta)
        m = b2 * m + (1 - b2) * grad
    p = torch.nn.Parameter(theta0.clone())
    opt = so.Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for k, grad in enumerate(grads):
        p.grad = grad.clone()
        opt.step()
        if k == 0:  # a resumed optimiser continues the same trajectory
            state = opt.state_dict()
            opt = so.Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
            opt.load_state_dict(state)
    assert torch.allclose(p.detach(), theta, atol=1e-14)
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))  # no gradient: untouched, even by the decay
    so.Lion([frozen], lr=1.0, weight_decay=0.5).step()
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------- the authors' initial values and flags
def test_defaults_are_the_authors_published_values():
    args = so.Args(pairs="-")
    assert (args.optimizer, args.lr, args.beta1, args.beta2, args.wd, args.warmup) == ("lion", 1e-4, 0.9, 0.99, 1e-5,
                                                                                      0.1)
    assert (args.lambda_ot, args.eps, args.eps_teacher, args.sinkhorn_iters) == (1e-4, 0.05, 0.005, 100)
    heads = so.Heads(6, 4, args)
    assert heads.logit_scale.exp().item() == pytest.approx(20.0) and heads.logit_bias.item() == -10.0
    fixed = so.Heads(6, 4, so.Args(pairs="-", paired_loss="infonce", tau=0.05, fixed_tau=True))
    assert fixed.logit_scale.exp().item() == pytest.approx(20.0) and not fixed.logit_scale.requires_grad
    assert fixed.logit_bias is None
    assert so.Heads(6, 4, so.Args(pairs="-", paired_loss="infonce")).logit_scale.exp().item() == pytest.approx(1 / 0.07)
    linear = heads.image_head[-1]
    bound = math.sqrt(6 / (linear.in_features + linear.out_features))  # Xavier uniform, zero bias (the authors')
    assert linear.weight.abs().max() <= bound and (linear.bias == 0).all()


def test_recall_at_1_leaves_the_heads_where_they_are():
    heads = (so.AffineHead(4, 3), so.AffineHead(2, 3))
    feats = {"image": torch.randn(3, 4), "text": torch.randn(3, 2), "counts": torch.ones(3, dtype=torch.long)}
    heads[0].W.normal_()
    heads[1].W.normal_()
    heads = tuple(h.to(torch.float64) for h in heads)  # a stand-in for "on another device": dtype must not change
    so.recall_at_1(heads, {k: v.double() if v.is_floating_point() else v for k, v in feats.items()})
    assert heads[0].W.dtype == torch.float64 and heads[0].training
