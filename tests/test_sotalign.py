"""SOTAlign: log-domain Sinkhorn (marginals, the exact permutation at small eps, POT parity), KLOT (value = KL from the
definition, gradient = finite differences with re-solved plans, zero at K = K*), the closed-form teachers (CCA on a
planted correspondence and against the eigen-solution, Procrustes orthogonal), the unpaired readers' errors, the
feature cache, the data stream, and the real command end to end on the example data (then --resume, then evaluate.py
on the export). Float64 wherever a definition is checked; tiny random encoders wherever real ones are not the point."""
import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import plumbing
import sotalign as so

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text"]


def random_problem(n, m, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(*batch, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(*batch, n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(*batch, m, generator=g, dtype=torch.float64) + 0.5
    return C, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


# ---------------------------------------------------------------- Sinkhorn
def test_sinkhorn_plans_meet_both_marginals_to_the_stated_tolerance():
    C, a, b = random_problem(7, 5, batch=(3,))
    eps = torch.tensor([0.5, 0.1, 0.05], dtype=torch.float64)  # one eps per problem of the batch
    log_P, err = so.sinkhorn_log(C, eps, a, b, iters=5000, tol=1e-9)
    P = log_P.exp()
    assert err.shape == (3,) and (err <= 1e-9).all()
    assert torch.allclose(P.sum(-1), a, atol=1e-9) and torch.allclose(P.sum(-2), b, atol=1e-9)
    direct = (P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)  # the reported error is the real one
    assert torch.allclose(err, direct)


def test_sinkhorn_warns_when_not_converged_and_raises_on_nan():
    C, a, b = random_problem(6, 6)
    with pytest.warns(UserWarning, match="marginal error above tol"):
        _, err = so.sinkhorn_log(C, 1e-3, iters=3, tol=1e-12)
    assert err.item() > 1e-12
    C[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        so.sinkhorn_log(C, 0.1)


@pytest.mark.parametrize("seed", range(4))
def test_sinkhorn_at_small_eps_concentrates_on_the_optimal_permutation(seed):
    n = 5
    C = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    costs = sorted((C[range(n), list(p)].sum().item(), p) for p in itertools.permutations(range(n)))  # brute force
    (_, perm), gap = costs[0], costs[1][0] - costs[0][0]
    eps = gap / 20  # the plan's mass off the optimum scales like exp(-gap / eps)
    log_P, err = so.sinkhorn_log(C, eps, iters=20000, tol=1e-4)  # small eps: slow, so a looser tolerance
    P = log_P.exp()
    assert err < 1e-4
    assert P.argmax(1).tolist() == list(perm)
    assert (P[range(n), list(perm)] > 0.99 / n).all()


def test_sinkhorn_matches_pots_sinkhorn_log():
    ot = pytest.importorskip("ot", reason="POT (pip install pot) is the reference for sinkhorn_log; not installed")
    C, a, b = random_problem(9, 6, seed=1)
    for eps, iters in ((0.05, 37), (0.01, 300)):
        ours = so.sinkhorn_log(C, eps, a, b, iters=iters, symmetric=False)[0].exp()  # POT has no symmetrised step
        with warnings.catch_warnings():  # POT warns "did not converge" whenever it runs all iterations
            warnings.simplefilter("ignore")
            pot = ot.bregman.sinkhorn_log(a, b, C, eps, numItermax=iters, stopThr=0.0)
        assert torch.allclose(ours, pot, rtol=1e-10, atol=1e-14), (eps, (ours - pot).abs().max())
    converged = so.sinkhorn_log(C, 0.05, a, b, iters=5000, tol=1e-12)[0].exp()  # symmetrised, to convergence
    pot = ot.bregman.sinkhorn_log(a, b, C, 0.05, numItermax=5000, stopThr=1e-13)
    assert torch.allclose(converged, pot, atol=1e-11)


# ---------------------------------------------------------------- KLOT
def plans(K, K_star, eps, eps_star):
    solve = lambda K, e: so.sinkhorn_log(-K, e, iters=20000, tol=1e-13)[0].exp()  # noqa: E731
    return solve(K, eps), solve(K_star, eps_star)


def test_klot_value_is_kl_of_the_teacher_plan_from_the_student_plan():
    g = torch.Generator().manual_seed(0)
    K, K_star = (torch.rand(6, 8, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    loss, parts = so.klot(K, K_star, eps=0.2, eps_star=0.1, iters=20000, tol=1e-13)
    P, P_star = plans(K, K_star, 0.2, 0.1)
    kl = sum(P_star[i, j].item() * math.log(P_star[i, j] / P[i, j]) for i in range(6) for j in range(8))  # definition
    assert loss.item() == pytest.approx(kl, rel=1e-9) and parts["ot"].item() == pytest.approx(kl, rel=1e-9)
    assert kl > 0 and parts["ot_err"] < 1e-12 and parts["ot_err_t"] < 1e-12


def test_klot_gradient_matches_finite_differences_of_the_value():
    g = torch.Generator().manual_seed(1)
    K = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    K_star = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 1
    value = lambda K: so.klot(K, K_star, eps=0.3, eps_star=0.2, iters=20000, tol=1e-14)[0].item()  # noqa: E731
    so.klot(K, K_star, eps=0.3, eps_star=0.2, iters=20000, tol=1e-14)[0].backward()
    h, fd = 1e-5, torch.zeros_like(K)
    for i, j in itertools.product(range(4), range(5)):
        E = torch.zeros_like(K)
        E[i, j] = h
        fd[i, j] = (value(K.detach() + E) - value(K.detach() - E)) / (2 * h)
    assert torch.allclose(K.grad, fd, atol=1e-7), (K.grad - fd).abs().max()
    P, P_star = plans(K.detach(), K_star, 0.3, 0.2)
    assert torch.allclose(K.grad, (P - P_star) / 0.3, atol=1e-10)  # Theorem 5.1


def test_klot_is_zero_when_the_student_equals_the_teacher():
    K = (torch.rand(5, 7, dtype=torch.float64) * 2 - 1).requires_grad_()
    loss, _ = so.klot(K, K.detach(), eps=0.05, eps_star=0.05)
    loss.backward()
    assert loss.item() == 0 and (K.grad == 0).all()


# ---------------------------------------------------------------- teachers
def planted(n=400, d=6, noise=0.01, seed=0):
    """Y = X Q + noise, Q a random rotation: a linear correspondence the teachers should find."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0  # off-centre, so centring matters
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return X, X @ Q + noise * torch.randn(n, d, generator=g, dtype=torch.float64), Q


def embed(T, X, Y):
    """The teacher's normalised embeddings z = (x / ||x|| - mu) W / ||.|| of both sides."""
    return (F.normalize((F.normalize(X, dim=-1) - T["mu_x"]) @ T["W_x"], dim=-1),
            F.normalize((F.normalize(Y, dim=-1) - T["mu_y"]) @ T["W_y"], dim=-1))


def test_cca_recovers_a_planted_correspondence():
    X, Y, _ = planted()
    T = so.cca(X, Y, reg=1e-4)
    assert T["rho"][:5].min() > 0.95  # the normalised x lose one dimension (their norm), hence d - 1
    zi, zt = embed(T, X, Y)
    S = zi @ zt.T
    assert (S.argmax(1) == torch.arange(len(X))).float().mean() > 0.95  # each x finds its own y
    # the teacher as an AffineHead (the export's form) gives the same embedding in float32
    head = so.AffineHead(*T["W_x"].shape)
    head.mu.copy_(T["mu_x"]), head.W.copy_(T["W_x"])
    assert torch.allclose(F.normalize(head(X.float()), dim=-1), zi.float(), atol=1e-4)


def test_cca_correlations_match_the_direct_eigen_solution():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    Y = Y + X[:, :4]  # some shared signal
    reg = 0.1
    T = so.cca(X, Y, reg)
    Xc = F.normalize(X, dim=-1) - F.normalize(X, dim=-1).mean(0)
    Yc = F.normalize(Y, dim=-1) - F.normalize(Y, dim=-1).mean(0)
    I = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    Cxx, Cyy, Cxy = Xc.T @ Xc / 50 + reg * I(7), Yc.T @ Yc / 50 + reg * I(4), Xc.T @ Yc / 50
    ev = torch.linalg.eigvals(torch.linalg.solve(Cxx, Cxy) @ torch.linalg.solve(Cyy, Cxy.T)).real  # rho^2, (7,)
    assert T["rho"].shape == (4,) and torch.allclose(T["rho"] ** 2, ev.sort(descending=True).values[:4], atol=1e-10)
    assert torch.allclose(T["W_x"].T @ Cxx @ T["W_x"], torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(T["W_x"].T @ Cxy @ T["W_y"], torch.diag(T["rho"]), atol=1e-10)


def test_procrustes_returns_an_orthogonal_matrix_and_the_planted_rotation():
    X, Y, Q = planted(noise=0.0)
    T = so.procrustes(X, Y)
    assert torch.allclose(T["W_x"].T @ T["W_x"], torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(T["W_x"], Q, atol=1e-10)
    X2, Y2, _ = planted(noise=0.05, seed=1)
    W = so.procrustes(X2, Y2[:, :4])["W_x"]  # Dx > Dy: orthonormal columns
    assert W.shape == (6, 4) and torch.allclose(W.T @ W, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_ridge_is_the_regularised_least_squares_solution():
    X, Y, _ = planted(noise=0.1)
    T = so.ridge(X, Y, reg=0.01)
    Xc, Yc = F.normalize(X, dim=-1) - T["mu_x"], F.normalize(Y, dim=-1) - T["mu_y"]
    grad = Xc.T @ (Xc @ T["W_x"] - Yc) / len(X) + 0.01 * T["W_x"]  # of ||X W - Y||^2 / 2n + reg ||W||^2 / 2
    assert grad.abs().max() < 1e-12


# ---------------------------------------------------------------- data
def test_unpaired_readers_name_the_file_and_the_row(tmp_path):
    images = so.read_unpaired(EMOJI / "unpaired_images.csv", "image")
    assert len(images) == 449 and all(Path(p).is_absolute() for p in images)
    folder = tmp_path / "imgs" / "deeper"
    folder.mkdir(parents=True)
    for p in images[:3]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    assert len(so.read_unpaired(tmp_path / "imgs", "image")) == 3  # recursive, image suffixes only
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(so.DataError, match=r"imgs, file .*broken\.png: unreadable image"):
        so.read_unpaired(tmp_path / "imgs", "image")
    bad = tmp_path / "images.csv"
    bad.write_text(f"image\n{images[0]}\nmissing.png\n")
    with pytest.raises(so.DataError, match=r"images\.csv, row 3: image not found"):
        so.read_unpaired(bad, "image")
    assert so.read_unpaired(bad, "image", skip_bad_rows=True) == images[:1]
    texts = so.read_unpaired(EMOJI / "unpaired_texts.txt", "text")
    assert len(texts) == 5064 and texts[0] == "copyright"
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"one\ntwo\n\xff three\n")
    with pytest.raises(so.DataError, match=r"t\.txt, row 3: not UTF-8"):
        so.read_unpaired(txt, "text")
    csv_ = tmp_path / "t.csv"
    csv_.write_text("id,text\n1,hello\n2,\n")
    assert so.read_unpaired(csv_, "text", skip_bad_rows=True) == ["hello"]
    with pytest.raises(so.DataError, match=r"t\.csv, row 3: empty text"):
        so.read_unpaired(csv_, "text")
    with pytest.raises(so.DataError, match=r"row 1: header \['id', 'text'\] has none of the columns \['words'\]"):
        so.read_unpaired(csv_, "text", key="words")


def test_draw_visits_every_item_once_per_epoch_and_is_a_function_of_seed_and_step():
    batches = torch.cat([so.draw(0, 1, 10, 4, s) for s in range(5)])  # 20 = two epochs, straddling at step 2
    assert sorted(batches[:10].tolist()) == sorted(batches[10:].tolist()) == list(range(10))
    assert torch.equal(so.draw(0, 1, 10, 4, 3), so.draw(0, 1, 10, 4, 3))
    assert not torch.equal(so.draw(0, 1, 10, 4, 3), so.draw(1, 1, 10, 4, 3))


def test_cache_is_reused_invalidated_and_an_interrupted_extraction_resumes(tmp_path, monkeypatch):
    args = so.parse_args(["--pairs", "x.csv", *TINY, "--cache-dir", str(tmp_path), "--extract-batch-size", "2"])
    texts = so.read_unpaired(EMOJI / "unpaired_texts.txt", "text")[:12]
    Encoder = type(so.load_encoder(args.text_encoder, "text"))  # py:tiny_encoders:text builds plumbing's Encoder
    encode, calls = Encoder.encode, []
    monkeypatch.setattr(plumbing, "SHARD_ROWS", 4)  # 3 shards of 2 batches

    def failing(self, batch):
        calls.append(len(batch))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed during the second batch of the second shard
        return encode(self, batch)
    monkeypatch.setattr(Encoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        so.features("unpaired", "text", texts, args, {})
    calls.clear()
    monkeypatch.setattr(Encoder, "encode", lambda self, batch: (calls.append(len(batch)), encode(self, batch))[1])
    first = so.features("unpaired", "text", texts, args, {})
    assert calls == [2] * 4 and first.shape == (12, 32)  # only the second and third shards were left to do
    fresh = so.features("unpaired", "text", texts, so.Args(**{**vars(args), "cache_dir": str(tmp_path / "b")}), {})
    assert torch.equal(first.tensor(), fresh.tensor())  # a resumed store is bit-identical to an uncut one
    monkeypatch.setattr(so, "load_encoder", lambda *a: pytest.fail("cache miss: an encoder was loaded"))
    assert torch.equal(so.features("unpaired", "text", texts, args, {}).tensor(), first.tensor())  # reused
    assert not list(tmp_path.rglob(".*.tmp*"))
    key = so.cache_key("text", texts, args.text_encoder)
    assert so.cache_key("text", texts[:-1] + ["changed"], args.text_encoder) != key
    assert so.cache_key("text", texts, "py:tiny_encoders:other") != key


def synthetic(E=12, U=20, Di=16, Dt=8, seed=0):
    """Features for train() without an encoder: P (pairs, 2 captions each), UI, UT, a random teacher."""
    g = torch.Generator().manual_seed(seed)
    P = {"image": torch.randn(E, Di, generator=g), "text": torch.randn(2 * E, Dt, generator=g),
         "counts": torch.full((E,), 2)}
    T = so.cca(torch.randn(40, Di, generator=g), torch.randn(40, Dt, generator=g))
    teacher = (so.AffineHead(*T["W_x"].shape), so.AffineHead(*T["W_y"].shape))
    for h, side in zip(teacher, "xy"):
        h.mu.copy_(T[f"mu_{side}"]), h.W.copy_(T[f"W_{side}"])
    return P, torch.randn(U, Di, generator=g), torch.randn(U + 3, Dt, generator=g), teacher


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    args = so.parse_args(["--pairs", "x.csv", "--out", str(tmp_path), "--steps", "8", "--dim", "8",
                          "--unpaired-batch", "8", "--ckpt-every", "2", "--log-every", "1"])
    calls, klot = [], so.klot

    def poisoned(*a, **k):
        calls.append(1)
        loss, parts = klot(*a, **k)
        return (loss * float("nan") if len(calls) == 5 else loss), parts
    monkeypatch.setattr(so, "klot", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss nan .* at step 5; .*step 4\)"):
        so.train(args, *synthetic(), 0, 1, "cpu", print)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.setattr(so, "klot", lambda *a, **k: klot(a[0], a[1] * float("nan"), *a[2:], **k))
    with pytest.raises(SystemExit, match=r"sinkhorn_log: NaN/inf plan .* at step 1; .*Last good checkpoint"):
        so.train(args, *synthetic(), 0, 1, "cpu", print)


# ---------------------------------------------------------------- end to end
def run(*argv, timeout=600):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_real_command_on_the_example_data_then_resume_then_evaluate(tmp_path):
    """`python sotalign.py --pairs examples/emoji/sotalign_pairs.csv --unpaired-images ... --unpaired-texts ...`
    (47 paired entities + 449 unpaired images + 5064 texts; tiny encoders, a few steps), cut short, resumed with
    --eval emoji, then the export evaluated again by evaluate.py; and a cut + resumed run equals an uninterrupted
    one."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    command = ["sotalign.py", "--pairs", "examples/emoji/sotalign_pairs.csv", "--unpaired-images",
               "examples/emoji/unpaired_images.csv", "--unpaired-texts", "examples/emoji/unpaired_texts.txt",
               "--heldout", "examples/emoji/heldout.csv", *TINY, "--cache-dir", str(cache), "--out", str(out),
               "--steps", "6", "--unpaired-batch", "64", "--dim", "64", "--lr", "1e-3", "--log-every", "1",
               "--ckpt-every", "2"]
    cut = run(*command, "--stop-after-steps", "3")
    assert "47 entities, 507 captions; unpaired: 449 images, 5064 texts" in cut and "stopping after step 3" in cut
    assert "teacher cca: train R@1" in cut and "heldout R@1" in cut
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and not (out / "aligner.pt").exists()
    has_evaluate = (ROOT / "evaluate.py").is_file()
    resumed = run(*command, "--resume", *(["--eval", "emoji"] if has_evaluate else []))
    assert "resumed" in resumed and "features: reusing" in resumed and "step 6/6" in resumed
    tail = resumed.strip().splitlines()[-1]
    assert tail.startswith("sotalign (sotalign.py) | seed 0 | 6 steps | final loss"), tail
    full = run(*[x if x != str(out) else str(tmp_path / "full") for x in command])
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (out, tmp_path / "full"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert full.strip().splitlines()[-1].split("|")[:3] == tail.split("|")[:3]
    for name, method in (("aligner.pt", "sotalign"), ("teacher.pt", "sotalign-teacher")):
        ck = torch.load(out / name, weights_only=True)
        assert ck["format"] == "aligner/1" and ck["method"] == method and ck["image_encoder"] == TINY[1]
        heads = [evaluate.head_from_state(ck[f"{m}_head"]) for m in ("image", "text")]
        assert heads[0](torch.randn(3, 128)).shape[-1] == heads[1](torch.randn(3, 32)).shape[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["step"] == 6 and manifest["teacher_R@1"]["heldout"]["i2t_R@1"] >= 0
    with pytest.raises(AssertionError, match=r"--eps-teacher 0\.005 \(now 0\.01\)"):
        run(*command, "--resume", "--eps-teacher", "0.01")
    if not has_evaluate:
        pytest.skip("evaluate.py is not there yet: training, resume and export checked, evaluation not")
    assert "R@1" in tail and "acc1" in tail and (out / "eval_teacher.json").is_file()
    run("evaluate.py", "--aligner", str(out / "aligner.pt"), "--tasks", "emoji", "--output",
        str(tmp_path / "again.json"), "--cache-dir", str(cache))
    first, again = (json.loads(p.read_text()) for p in (out / "eval.json", tmp_path / "again.json"))
    assert {r["dataset"] for r in again["results"]} == {"emoji_zeroshot", "emoji_retrieval"}
    assert [r["metrics"] for r in first["results"]] == [r["metrics"] for r in again["results"]]


def test_two_processes_give_the_same_losses_and_weights_as_one(tmp_path):
    """torchrun (gloo): pairs and unpaired sets extracted in shards and gathered, heads under DDP, each rank's slice of
    the paired and unpaired batches gathered so SigLIP and KLOT see the whole global batch, as one process does."""
    def command(cache, out):
        return ["sotalign.py", "--pairs", "examples/emoji/sotalign_pairs.csv", "--unpaired-images",
                "examples/emoji/unpaired_images.csv", "--unpaired-texts", "examples/emoji/unpaired_texts.txt", *TINY,
                "--cache-dir", str(tmp_path / cache), "--out", str(tmp_path / out), "--steps", "6",
                "--paired-batch", "46", "--unpaired-batch", "64", "--dim", "32", "--lr", "1e-3", "--log-every", "1",
                "--no-compile"]  # 46 of the 47 pairs: a batch both process counts can split evenly
    one = run(*command("cache1", "one"))
    two = run("-m", "torch.distributed.run", "--nproc_per_node=2", *command("cache2", "two"))
    assert "batches (46, 64, 64) x 2 rank(s)" in two and "features: 449 unpaired images" in two  # extracted, not read
    for part in ("pairs-image", "unpaired-image", "unpaired-text"):
        a, b = (plumbing.Store(next((tmp_path / d).glob(f"sotalign-{part}-*"))).tensor() for d in ("cache1", "cache2"))
        assert torch.equal(a, b), part  # shard j is encoded in the same batches whichever rank encodes it
    losses = [[float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([\d.]+)", out, re.M)] for out in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 6 and losses[0] == pytest.approx(losses[1], abs=2e-4)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_without_unpaired_data_it_is_the_supervised_baseline(tmp_path):
    out = run("sotalign.py", "--pairs", "examples/emoji/sotalign_pairs.csv", *TINY, "--cache-dir",
              str(tmp_path / "cache"), "--out", str(tmp_path), "--steps", "3", "--dim", "32")
    assert "no unpaired data" in out and "training siglip-pairs" in out and " ot " not in out
    assert torch.load(tmp_path / "aligner.pt", weights_only=True)["method"] == "siglip-pairs"
