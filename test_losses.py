"""SMA's losses against brute-force float64 implementations written straight from their set definitions (loops over
entities, sets and members; FLVMI's ground set enumerated), values and gradients, plus the invariants the
definitions promise: smooth max -> max, order within a set, padding, K = M = 1 is InfoNCE at the same tau."""
import math

import pytest
import torch
import torch.nn.functional as F

import sma


@pytest.fixture(autouse=True)
def _float64():
    """The definitions are checked in float64 (restored after each test: other modules run float32)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def batch(N=3, K=2, M=3, d=4, seed=0, lengths=(3, 1, 2)):
    """Normalised float64 embeddings (leaves), a caption mask with variable set sizes, and 1/tau."""
    g = torch.Generator().manual_seed(seed)
    zi = F.normalize(torch.randn(N, K, d, generator=g), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(N, M, d, generator=g), dim=-1).requires_grad_()
    mask = torch.arange(M) < torch.tensor(lengths)[:, None]
    return zi, zt, mask, torch.tensor(2.5, requires_grad=True)


# ---------------------------------------------------------------- brute force, from the definitions
def sets(zi, zt, mask):
    """A_k = the K views of entity k; T_l = the real captions of entity l (lists of (d,) vectors)."""
    A = [[zi[k, a] for a in range(zi.shape[1])] for k in range(len(zi))]
    T = [[zt[l, t] for t in range(zt.shape[1]) if mask[l, t]] for l in range(len(zt))]
    return A, T


def smax(values):  # log of the mean of exp over a set
    return torch.log(torch.stack(list(values)).exp().mean())


def smin(x, y):
    return -smax([-x, -y])


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def contrastive(L):  # L[k][l]: list of lists of 0-dim tensors
    N = len(L)
    i2t = -sum(L[k][k] - torch.log(sum(torch.exp(L[k][l]) for l in range(N))) for k in range(N)) / N
    t2i = -sum(L[k][k] - torch.log(sum(torch.exp(L[l][k]) for l in range(N))) for k in range(N)) / N
    return (i2t + t2i) / 2


def bf_flqmi(zi, zt, mask, scale, eta=1.0):
    A, T = sets(zi, zt, mask)
    s = lambda x, y: scale * torch.dot(x, y)  # noqa: E731
    L = [[(mean(smax(s(a, t) for a in A[k]) for t in T[l]) + eta * mean(smax(s(a, t) for t in T[l]) for a in A[k]))
          / (1 + eta) for l in range(len(T))] for k in range(len(A))]
    return contrastive(L)


def bf_flvmi(zi, zt, mask, scale, eta=1.0):
    A, T = sets(zi, zt, mask)
    V = [a for As in A for a in As] + [t for Ts in T for t in Ts]  # the ground set, enumerated
    s = lambda x, y: scale * torch.dot(x, y)  # noqa: E731
    L = [[mean(smin(smax(s(i, j) for j in A[k]), eta * smax(s(i, j) for j in T[l])) for i in V)
          for l in range(len(T))] for k in range(len(A))]
    return contrastive(L)


def bf_gcmi(zi, zt, mask, scale, eta=1.0):
    A, T = sets(zi, zt, mask)
    lam = eta / 2  # I(A; Q) = 2 lambda sum_{i in A} sum_{j in Q} s_ij, here averaged over the pairs
    L = [[2 * lam * mean(scale * torch.dot(a, t) for a in A[k] for t in T[l]) for l in range(len(T))]
         for k in range(len(A))]
    return contrastive(L)


def bf_logdetmi(zi, zt, mask, scale, eta=1.0, ridge=0.1):
    A, T = sets(zi, zt, mask)

    def logdet_mi(As, Qs):
        ZA, ZQ = torch.stack(As), torch.stack(Qs)
        if eta == 1.0:  # the SMI definition itself: I = f(A) + f(Q) - f(A u Q), f(X) = log det(S_X)
            f = lambda Z: torch.logdet(Z @ Z.T + ridge * torch.eye(len(Z)))  # noqa: E731
            return f(ZA) + f(ZQ) - f(torch.cat([ZA, ZQ]))
        SA, SQ, SAQ = ZA @ ZA.T + ridge * torch.eye(len(ZA)), ZQ @ ZQ.T + ridge * torch.eye(len(ZQ)), ZA @ ZQ.T
        return torch.logdet(SA) - torch.logdet(SA - eta ** 2 * SAQ @ torch.linalg.inv(SQ) @ SAQ.T)
    return contrastive([[scale * logdet_mi(A[k], T[l]) for l in range(len(T))] for k in range(len(A))])


def bf_multipos(zi, zt, mask, scale, eta=1.0):
    A, T = sets(zi, zt, mask)
    s = lambda x, y: scale * torch.dot(x, y)  # noqa: E731
    views = [(k, a) for k in range(len(A)) for a in A[k]]
    caps = [(l, t) for l in range(len(T)) for t in T[l]]
    i2t = mean(-mean(s(a, t) - torch.log(sum(torch.exp(s(a, u)) for _, u in caps)) for l, t in caps if l == k)
               for k, a in views)
    t2i = mean(-mean(s(a, t) - torch.log(sum(torch.exp(s(b, t)) for _, b in views)) for k, a in views if k == l)
               for l, t in caps)
    return (i2t + t2i) / 2


def bf_siglip(x, y, scale, bias):
    N = len(x)
    return -sum(F.logsigmoid((1 if k == l else -1) * (scale * torch.dot(x[k], y[l]) + bias))
                for k in range(N) for l in range(N)) / N


def bf_divergence(zi, zt, mask, scale):
    A, T = sets(zi, zt, mask)
    V = [a for As in A for a in As] + [t for Ts in T for t in Ts]
    c = scale.detach()
    m = lambda i, X: smax(c * torch.dot(i, x) for x in X) / c  # noqa: E731  (cosine units)
    return mean(mean(F.relu(m(i, A[k]) - m(i, T[k])) + F.relu(m(i, T[k]) - m(i, A[k])) for i in V)
                for k in range(len(A)))


SET = [("flqmi", bf_flqmi), ("flvmi", bf_flvmi), ("gcmi", bf_gcmi), ("logdetmi", bf_logdetmi),
       ("multipos", bf_multipos)]


def grads(value, inputs):
    return torch.autograd.grad(value, inputs)


# ---------------------------------------------------------------- definitions: values and gradients
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("name,brute", SET, ids=[n for n, _ in SET])
def test_set_loss_matches_brute_force(name, brute, eta):
    zi, zt, mask, scale = batch()
    fast = sma.SET_LOSSES[name](zi, zt, mask, scale, eta)[0]
    slow = brute(zi, zt, mask, scale, eta)
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12), (fast, slow)
    for gf, gs in zip(grads(fast, [zi, zt, scale]), grads(slow, [zi, zt, scale])):
        assert torch.allclose(gf, gs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", [n for n, _ in SET])
def test_set_loss_gradcheck(name):
    zi, zt, mask, scale = batch(N=3, K=2, M=3, d=3)
    assert torch.autograd.gradcheck(lambda a, b, s: sma.SET_LOSSES[name](a, b, mask, s, 0.8)[0], (zi, zt, scale))


def test_pair_baselines_and_divergence_match_brute_force():
    zi, zt, mask, scale = batch()
    x, y, bias = zi[:, 0], zt[:, 0], torch.tensor(-1.0, requires_grad=True)
    L = [[scale * torch.dot(x[k], y[l]) for l in range(3)] for k in range(3)]
    assert torch.allclose(sma.infonce(x, y, scale)[0], contrastive(L))
    assert torch.allclose(sma.siglip(x, y, scale, bias)[0], bf_siglip(x, y, scale, bias))
    assert torch.allclose(sma.divergence(zi, zt, mask, scale), bf_divergence(zi, zt, mask, scale))
    for gf, gs in zip(grads(sma.divergence(zi, zt, mask, scale), [zi, zt]),
                      grads(bf_divergence(zi, zt, mask, scale), [zi, zt])):
        assert torch.allclose(gf, gs, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, s, c: sma.siglip(a, b, s, c)[0], (x, y, scale, bias))
    assert torch.autograd.gradcheck(lambda a, b: sma.divergence(a, b, mask, scale), (zi, zt))


def test_sma_loss_picks_one_pair_for_baselines_and_adds_divergence():
    zi, zt, mask, scale = batch()
    pick_v, pick_t = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 1])
    ar = torch.arange(3)
    got = sma.sma_loss("infonce", zi, zt, mask, scale, None, pick_v, pick_t)[0]
    assert torch.allclose(got, sma.infonce(zi[ar, pick_v], zt[ar, pick_t], scale)[0])
    loss, parts = sma.sma_loss("flqmi", zi, zt, mask, scale, None, pick_v, pick_t, lambda_div=0.3)
    assert torch.allclose(loss, sma.flqmi(zi, zt, mask, scale)[0] + 0.3 * parts["div"])


# ---------------------------------------------------------------- invariants
def test_smooth_max_tends_to_hard_max_and_ignores_masked_members():
    x = torch.randn(5, 7)
    gaps = [(x.max(-1).values - sma.smax(c * x) / c).abs().max().item() for c in (1, 10, 100, 1e4)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-3
    assert all(g <= math.log(7) / c + 1e-12 for g, c in zip(gaps, (1, 10, 100, 1e4)))
    mask = torch.rand(5, 7) < 0.6
    mask[:, 0] = True
    for row in range(5):
        assert torch.allclose(sma.smax(x, mask)[row], sma.smax(x[row][mask[row]]))


@pytest.mark.parametrize("name", [n for n, _ in SET] + ["div"])
def test_order_within_a_set_does_not_matter(name):
    zi, zt, mask, scale = batch(N=4, K=3, M=4, lengths=(4, 2, 1, 3))
    fn = (lambda a, b, m: sma.divergence(a, b, m, scale)) if name == "div" else \
        (lambda a, b, m: sma.SET_LOSSES[name](a, b, m, scale)[0])
    g = torch.Generator().manual_seed(1)
    pv = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])  # views, per entity
    pt = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])  # caption slots (padding moves along)
    ar = torch.arange(4)[:, None]
    assert torch.allclose(fn(zi, zt, mask), fn(zi[ar, pv], zt[ar, pt], mask[ar, pt]))
    perm = torch.randperm(4, generator=g)  # the order of the entities in the batch
    assert torch.allclose(fn(zi, zt, mask), fn(zi[perm], zt[perm], mask[perm]))


@pytest.mark.parametrize("name", [n for n, _ in SET] + ["div"])
def test_padding_changes_nothing_when_sets_are_full(name):
    zi, zt, full, scale = batch(N=3, K=2, M=3, lengths=(3, 3, 3))
    junk = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_()  # two padded slots per entity
    padded, mask = torch.cat([zt, junk], 1), torch.cat([full, torch.zeros(3, 2, dtype=torch.bool)], 1)
    fn = (lambda b, m: sma.divergence(zi, b, m, scale)) if name == "div" else \
        (lambda b, m: sma.SET_LOSSES[name](zi, b, m, scale)[0])
    value = fn(padded, mask)
    assert torch.allclose(fn(zt, full), value)
    assert torch.count_nonzero(grads(value, [junk])[0]) == 0  # padding gets no gradient


def test_one_view_one_caption_reduces_to_infonce_at_the_same_tau():
    """K = M = 1: flqmi (any eta: l = (s + eta s) / (1 + eta)), multipos and gcmi (eta = 1) are InfoNCE at the same
    1/tau, values and gradients; logdetmi is the non-linear -scale log(1 - (eta c / (1 + ridge))^2) of its docstring."""
    zi, zt, mask, scale = batch(N=5, K=1, M=1, lengths=(1,) * 5)
    x, y = zi[:, 0], zt[:, 0]
    ref = sma.infonce(x, y, scale)[0]
    g_ref = grads(ref, [zi, zt, scale])
    for loss in [sma.flqmi(zi, zt, mask, scale, eta)[0] for eta in (1.0, 0.3, 2.0)] + \
            [sma.multipos(zi, zt, mask, scale)[0], sma.gcmi(zi, zt, mask, scale, 1.0)[0]]:
        assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
        for g, h in zip(grads(loss, [zi, zt, scale]), g_ref):
            assert torch.allclose(g, h, rtol=1e-10, atol=1e-12)
    eta, c = 0.5, x @ y.T  # (N, N) cosines
    closed = sma.contrastive(-scale * torch.log(1 - (eta * c / 1.1) ** 2))[0]
    assert torch.allclose(sma.logdetmi(zi, zt, mask, scale, eta)[0], closed)


def test_flqmi_is_finite_and_prefers_aligned_sets_in_float32():
    """Large 1/tau (the clamp, 100) in float32: no overflow, and matched sets give a lower loss than shuffled ones."""
    g = torch.Generator().manual_seed(0)
    zi = F.normalize(torch.randn(16, 2, 32, generator=g, dtype=torch.float32), dim=-1)
    zt = F.normalize(zi.mean(1, keepdim=True).expand(-1, 5, -1) + 0.1 * torch.randn(16, 5, 32, generator=g,
                                                                                   dtype=torch.float32), dim=-1)
    mask, scale = torch.ones(16, 5, dtype=torch.bool), torch.tensor(100.0)
    aligned, shuffled = sma.flqmi(zi, zt, mask, scale)[0], sma.flqmi(zi, zt.roll(1, 0), mask, scale)[0]
    assert torch.isfinite(aligned) and aligned < 0.01 < shuffled
