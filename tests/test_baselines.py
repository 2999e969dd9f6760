"""The baselines both papers compare against, each against a brute-force float64 version of its definition: CSA's
correlation-weighted CCA score, SigLIP and InfoNCE with unpaired samples as extra negatives, and the STRUCTURE
regulariser (values and gradients); then sotalign.py's options end to end on tiny random encoders."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sotalign as so

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text"]


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------- CSA
def test_csa_score_is_the_correlation_weighted_product_of_normalised_canonical_coordinates():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 7, generator=g, dtype=torch.float64)
    Y = torch.randn(60, 5, generator=g, dtype=torch.float64) + X[:, :5]
    dim = 3
    T, C = so.cca(X, Y, 0.1), so.csa(X, Y, 0.1, dim=dim)
    px = (F.normalize(X, dim=-1) - T["mu_x"]) @ T["W_x"][:, :dim]  # canonical coordinates, first dim
    py = (F.normalize(Y, dim=-1) - T["mu_y"]) @ T["W_y"][:, :dim]
    xh, yh = F.normalize(px, dim=-1), F.normalize(py, dim=-1)
    for i in range(5):
        for j in range(5):  # the definition, one pair at a time
            s = sum(T["rho"][c] * xh[i, c] * yh[j, c] for c in range(dim))
            hx = F.normalize((F.normalize(X[i], dim=-1) - C["mu_x"]) @ C["W_x"], dim=-1)
            hy = F.normalize((F.normalize(Y[j], dim=-1) - C["mu_y"]) @ C["W_y"], dim=-1)
            # the normalised head outputs, weighted by rho (the export's score_weights): s itself
            assert torch.allclose((hx * C["rho"]) @ hy, s, atol=1e-12)
    assert C["W_x"].shape == (7, dim) and C["rho"].shape == (dim,)
    assert so.csa(X, Y, 0.1)["W_x"].shape[1] == len(T["rho"])  # dim = 0 keeps every direction


# ---------------------------------------------------------------- paired losses with unpaired negatives
def brute_siglip(x, y, scale, bias, xu, yu):
    """The authors' mean form: image anchors against [y; yu], text anchors against [x; xu], each a mean, averaged."""
    N = len(x)

    def mean_side(anchors, targets):
        total = 0.0
        for k in range(N):
            for l in range(len(targets)):
                z = 1.0 if k == l else -1.0
                total = total - math.log(1 / (1 + math.exp(-z * (scale * float(anchors[k] @ targets[l]) + bias))))
        return total / (N * len(targets))
    return (mean_side(x, torch.cat([y, yu])) + mean_side(y, torch.cat([x, xu]))) / 2


def brute_infonce(x, y, scale, xu, yu):
    X, Y, N = torch.cat([x, xu]), torch.cat([y, yu]), len(x)
    i2t = -sum(scale * float(x[k] @ y[k]) - math.log(sum(math.exp(scale * float(x[k] @ t)) for t in Y))
               for k in range(N)) / N
    t2i = -sum(scale * float(y[k] @ x[k]) - math.log(sum(math.exp(scale * float(y[k] @ v)) for v in X))
               for k in range(N)) / N
    return (i2t + t2i) / 2


def test_siglip_and_infonce_with_unpaired_negatives_match_their_definitions():
    x, y, xu, yu = unit(4, 3, seed=1), unit(4, 3, seed=2), unit(5, 3, seed=3), unit(2, 3, seed=4)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    assert math.isclose(so.siglip(x, y, scale, bias, xu, yu)[0].item(), brute_siglip(x, y, 7.0, -3.0, xu, yu),
                        rel_tol=1e-12)
    assert math.isclose(so.infonce(x, y, scale, xu, yu)[0].item(), brute_infonce(x, y, 7.0, xu, yu), rel_tol=1e-12)
    none = x[:0]  # no unpaired samples: the plain losses
    assert math.isclose(so.siglip(x, y, scale, bias)[0].item(), brute_siglip(x, y, 7.0, -3.0, none, none),
                        rel_tol=1e-12)
    assert math.isclose(so.infonce(x, y, scale)[0].item(), brute_infonce(x, y, 7.0, none, none), rel_tol=1e-12)


def test_paired_losses_gradients_pass_gradcheck():
    x, y, xu, yu = (unit(n, 3, seed=s).requires_grad_() for n, s in ((3, 1), (3, 2), (4, 3), (2, 4)))
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: so.siglip(t[0], t[1], scale, bias, t[2], t[3])[0], (x, y, xu, yu))
    assert torch.autograd.gradcheck(lambda *t: so.infonce(t[0], t[1], scale, t[2], t[3])[0], (x, y, xu, yu))


# ---------------------------------------------------------------- STRUCTURE
def brute_structure(E, A, tau, levels):
    def neighbours(Z):
        Z = F.normalize(Z, dim=-1)
        Z = Z - Z.mean(0)
        S = Z @ Z.T / tau
        return torch.stack([torch.exp(S[i]) / torch.exp(S[i]).sum() for i in range(len(Z))])
    PE, PA = neighbours(E), neighbours(A)
    total = 0.0
    for level in range(1, levels + 1):
        QE, QA = torch.linalg.matrix_power(PE, level), torch.linalg.matrix_power(PA, level)
        for i in range(len(E)):
            p, q = QE[i], QA[i]
            m = (p + q) / 2
            total = total + (0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()) / len(E)
    return total / levels


@pytest.mark.parametrize("levels", [1, 2])
def test_structure_matches_its_definition_and_passes_gradcheck(levels):
    g = torch.Generator().manual_seed(levels)
    E = torch.randn(6, 5, generator=g, dtype=torch.float64)
    A = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    value = so.structure(E, A, tau=0.5, levels=levels)
    assert torch.allclose(value, brute_structure(E, A.detach(), 0.5, levels), atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda A: so.structure(E, A, tau=0.5, levels=levels), (A,))
    assert so.structure(E, E.clone(), tau=0.5, levels=levels).abs().item() < 1e-12  # same geometry: R = 0


# ---------------------------------------------------------------- COCO input
def coco_fixture(root, n=6, missing=(), empty=()):
    """A tiny COCO-layout folder: annotations/captions_train2017.json + train2017/<id>.jpg (emoji rendered as JPEG)."""
    from PIL import Image
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    sources = sorted((EMOJI / "images" / "noto").glob("*.png"))[:n]
    images, notes = [], []
    for k, src in enumerate(sources):
        image_id = 100 + 7 * k  # ids not in file order
        name = f"{image_id:012d}.jpg"
        if image_id not in missing:
            Image.open(src).convert("RGB").save(root / "train2017" / name, quality=90)
        images.append({"id": image_id, "file_name": name})
        for c in range(3):
            caption = "" if (image_id, c) in empty else f"{src.stem} caption {c}"
            notes.append({"id": len(notes) + 1, "image_id": image_id, "caption": caption})
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json_dumps({"images": images[::-1], "annotations": notes}))
    return path


def json_dumps(obj):
    import json
    return json.dumps(obj)


def test_coco_reader_layout_subset_and_bad_entries(tmp_path):
    path = coco_fixture(tmp_path / "coco")
    pairs = so.read_pairs(f"coco:{path}")
    assert [int(Path(p).stem) for p in pairs.images] == [100 + 7 * k for k in range(6)]  # by image id
    assert all(Path(p).parent == (tmp_path / "coco" / "train2017").resolve() for p in pairs.images)
    assert [len(c) for c in pairs.captions] == [3] * 6
    small, large = so.read_pairs(f"coco:{path}", subset=2), so.read_pairs(f"coco:{path}", subset=4)
    assert len(small.images) == 2 and set(small.images) <= set(large.images)  # nested, fixed seed
    assert so.read_pairs(f"coco:{path}", subset=2).images == small.images
    moved = tmp_path / "elsewhere"
    (tmp_path / "coco" / "train2017").rename(moved)
    assert len(so.read_pairs(f"coco:{path}", image_root=str(moved)).images) == 6
    with pytest.raises(so.DataError, match=r"captions_train2017.json, image id 100: image not found.*--image-root"):
        so.read_pairs(f"coco:{path}")
    bad = coco_fixture(tmp_path / "bad", missing={107}, empty={(114, 1)})
    with pytest.raises(so.DataError, match=r"image id 114\): empty caption \(and 1 more\)"):
        so.read_pairs(f"coco:{bad}")
    pairs = so.read_pairs(f"coco:{bad}", skip_bad_rows=True)
    assert len(pairs.images) == 5 and len(pairs.skipped) == 2
    ids = [int(Path(p).stem) for p in pairs.images]
    assert len(pairs.captions[ids.index(114)]) == 2 and 107 not in ids


def run(*argv, timeout=600):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_both_scripts_train_on_a_coco_layout_with_image_root_and_subset(tmp_path):
    path = coco_fixture(tmp_path / "coco")
    moved = tmp_path / "images"
    (tmp_path / "coco" / "train2017").rename(moved)
    common = [*TINY, "--image-root", str(moved), "--subset", "4", "--cache-dir", str(tmp_path / "cache"),
              "--dim", "8", "--epochs", "2"]
    proc = run("sma.py", "--data", f"coco:{path}", *common, "--views", "1", "--batch-size", "4", "--hidden", "8",
               "--out", str(tmp_path / "sma"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 entities, 12 captions" in proc.stdout and (tmp_path / "sma" / "aligner.pt").is_file()
    proc = run("sotalign.py", "--pairs", f"coco:{path}", *common, "--paired-batch", "4", "--out",
               str(tmp_path / "so"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 entities, 12 captions" in proc.stdout and (tmp_path / "so" / "aligner.pt").is_file()


# ---------------------------------------------------------------- sotalign.py's options end to end
def test_csa_infonce_negatives_and_structure_run_end_to_end_and_evaluate(tmp_path):
    data = ["--pairs", str(EMOJI / "sotalign_pairs.csv"), "--unpaired-images", str(EMOJI / "unpaired_images.csv"),
            "--unpaired-texts", str(EMOJI / "unpaired_texts.txt"), *TINY, "--cache-dir", str(tmp_path / "cache"),
            "--dim", "16", "--steps", "4", "--paired-batch", "16", "--unpaired-batch", "32"]
    proc = run("sotalign.py", *data, "--teacher", "csa", "--csa-dim", "8", "--paired-loss", "infonce",
               "--unpaired-negatives", "--lambda-structure", "10", "--lambda-ot", "0", "--out", str(tmp_path / "a"),
               "--eval", "emoji")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    teacher = torch.load(tmp_path / "a" / "teacher.pt", weights_only=True)
    aligner = torch.load(tmp_path / "a" / "aligner.pt", weights_only=True)
    assert teacher["method"] == "csa" and teacher["image_head"]["out_dim"] == 8
    assert aligner["method"] == "structure" and aligner["logit_bias"] is None
    assert "struct" in aligner["metrics"] and "nce" in aligner["metrics"]
    assert (tmp_path / "a" / "eval_teacher.json").is_file()  # CSA's export evaluates through evaluate.py
    proc = run("sotalign.py", *data, "--unpaired-negatives", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    aligner = torch.load(tmp_path / "b" / "aligner.pt", weights_only=True)
    assert aligner["method"] == "sotalign" and {"sig", "ot"} <= set(aligner["metrics"])


def test_unpaired_data_that_no_term_uses_changes_nothing(tmp_path):
    """--lambda-ot 0 without --unpaired-negatives or --lambda-structure is the pairs-only baseline, unpaired data or
    not: the same steps, the same weights."""
    g = torch.Generator().manual_seed(0)
    P = {"image": torch.randn(20, 16, generator=g), "text": torch.randn(20, 8, generator=g),
         "counts": torch.ones(20, dtype=torch.long)}
    UI, UT = torch.randn(300, 16, generator=g), torch.randn(300, 8, generator=g)
    args = so.Args(pairs="-", lambda_ot=0.0, dim=8, paired_batch=8, unpaired_batch=32, epochs=1, lr=1e-3,
                   out=str(tmp_path), device="cpu", compile=False, log_every=10 ** 9, ckpt_every=10 ** 9)
    (a, ma), (b, mb) = (so.train(args, P, X, Y, None, 0, 1, "cpu", log=lambda *_: None) for X, Y in ((None, None),
                                                                                                    (UI, UT)))
    assert ma["step"] == mb["step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
