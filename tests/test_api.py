"""evaluate.load_aligner: shapes and unit norm for every exported method, paths = PIL images = a transformed batch,
the same embeddings as an evaluate.py run, a plain open_clip model, and the README snippet run as written."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
import evaluate as ev  # noqa: E402
import plumbing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE, TEXT = "timm-random:test_vit", "py:tiny_encoders:text"  # random weights: mechanics only
COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def tiny_aligner(path, method="sma", kind="mlp", dim=16):
    """An aligner.pt in the exported format (format aligner/1) with random heads of the given kind."""
    in_dims = {"image": ev.load_encoder(IMAGE, "image").dim, "text": 32}  # py:tiny_encoders:text is 32-d
    ckpt = {"format": "aligner/1", "method": method, "image_encoder": IMAGE, "text_encoder": TEXT,
            "logit_scale": 10.0, "logit_bias": None, "args": {"seed": 0}, "metrics": {}}
    torch.manual_seed(0)
    for m, d in in_dims.items():
        head = plumbing.AffineHead(d, dim) if kind == "affine" else plumbing.make_head(kind, d, dim, 24, 2)
        if kind == "affine":  # a fitted teacher: non-zero mean and map
            head.mu.normal_(0, 0.1), head.W.normal_()
        ckpt[f"{m}_head"] = plumbing.head_state(head, kind, d, dim, 24, 2)
    ev.atomic_save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4-class image folder (two shades per class) and a pairs file over one image per class."""
    root = tmp_path_factory.mktemp("api")
    rows = ["image,caption"]
    for name, colour in COLOURS.items():
        for j in (1, 2):
            path = root / "folder" / name / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 16), tuple(c // j for c in colour)).save(path)
        rows += [f"folder/{name}/1.png,a {name} square", f"folder/{name}/1.png,{name}"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def aligner_path(tmp_path_factory):
    return tiny_aligner(tmp_path_factory.mktemp("aligner") / "aligner.pt")


@pytest.mark.parametrize("method,kind", [("sma", "mlp"), ("sotalign", "mlp"), ("sotalign-teacher", "affine"),
                                         ("siglip-pairs", "mlp")])
def test_every_exported_method_gives_unit_float32_embeddings(tmp_path, data, method, kind):
    aligner = ev.load_aligner(tiny_aligner(tmp_path / "aligner.pt", method, kind), device="cpu")
    assert (aligner.method, aligner.dim, aligner.specs) == (method, 16, {"image": IMAGE, "text": TEXT})
    assert aligner.info["args"] == {"seed": 0}
    images = aligner.encode_image(sorted(str(p) for p in (data / "folder").glob("*/*.png")))
    texts = aligner.encode_text(["a red square", "green", "a blue thing"])
    for emb, n in ((images, 8), (texts, 3)):
        assert emb.shape == (n, 16) and emb.dtype == torch.float32 and not emb.requires_grad
        assert torch.allclose(emb.norm(dim=1), torch.ones(n), atol=1e-5)
    assert aligner.encode_text("green").shape == (1, 16)



def test_score_is_the_cosine_and_csas_rho_weighted_product_for_a_csa_export(tmp_path, data):
    """Aligner.score ranks as evaluate.py does: the cosine, but sum_i rho_i xh_i yh_i for a CSA teacher."""
    paths = sorted(str(p) for p in (data / "folder").glob("*/1.png"))
    texts = [f"a {name} square" for name in COLOURS]
    plain = ev.load_aligner(tiny_aligner(tmp_path / "plain.pt", "sotalign-teacher", "affine"), device="cpu")
    images, captions = plain.encode_image(paths), plain.encode_text(texts)
    assert torch.allclose(plain.score(images, captions), images @ captions.T)
    ckpt = torch.load(tmp_path / "plain.pt", weights_only=False)
    rho = torch.linspace(0.9, 0.1, ckpt["image_head"]["out_dim"])  # CSA's correlations, largest first
    ev.atomic_save({**ckpt, "method": "csa", "score_weights": rho}, tmp_path / "csa.pt")
    csa = ev.load_aligner(tmp_path / "csa.pt", device="cpu")
    brute = torch.tensor([[sum(rho[c] * x[c] * y[c] for c in range(len(rho))) for y in captions] for x in images])
    assert torch.allclose(csa.score(images, captions), brute, atol=1e-6)
    assert not torch.allclose(brute, images @ captions.T, atol=1e-3)  # the weights matter here

def test_paths_pil_images_and_a_transformed_batch_give_the_same_embeddings(aligner_path, data):
    aligner = ev.load_aligner(aligner_path, device="cpu", batch_size=3)  # 3: several batches, one partial
    paths = sorted((data / "folder").glob("*/*.png"))
    from_paths = aligner.encode_image(paths)  # pathlib paths; str paths below
    assert torch.equal(from_paths, aligner.encode_image([str(p) for p in paths]))
    pil = [Image.open(p) for p in paths]
    assert torch.allclose(aligner.encode_image(pil), from_paths, atol=1e-6)
    batch = torch.stack([aligner.transform(im) for im in pil])  # (B, 3, H, W)
    assert torch.allclose(aligner.encode_image(batch), from_paths, atol=1e-6)
    assert torch.allclose(aligner.encode_image(pil[2]), from_paths[2:3], atol=1e-6)  # one image
    assert not torch.allclose(from_paths[0], from_paths[1])  # the images do differ


def test_embeddings_equal_what_an_evaluate_run_scores(aligner_path, data, tmp_path, monkeypatch):
    seen = {"image": [], "text": []}
    embed = ev.embed

    def spy(model, modality, raw):
        out = embed(model, modality, raw)
        seen[modality].append(out)
        return out
    monkeypatch.setattr(ev, "embed", spy)
    out = ev.main(["--aligner", str(aligner_path), "--tasks", f"folder:{data / 'folder'},csv:{data / 'pairs.csv'}",
                   "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "eval.json"),
                   "--workers", "0", "--device", "cpu"])
    monkeypatch.undo()
    aligner = ev.load_aligner(aligner_path, device="cpu")
    # classification: images in ImageFolder order, prompts "a photo of a {}." class-major
    paths = sorted(str(p) for p in (data / "folder").glob("*/*.png"))
    prompts = [f"a photo of a {c}." for c in sorted(COLOURS)]
    assert torch.allclose(aligner.encode_image(paths), seen["image"][0], atol=1e-6)
    assert torch.allclose(aligner.encode_text(prompts), seen["text"][0], atol=1e-6)
    # retrieval: the pairs file's entities and their captions; the metrics recomputed from the API's embeddings
    pairs = ev.read_pairs(data / "pairs.csv")
    images, texts = aligner.encode_image(pairs.images), aligner.encode_text([c for cs in pairs.captions for c in cs])
    assert torch.allclose(images, seen["image"][1], atol=1e-6) and torch.allclose(texts, seen["text"][1], atol=1e-6)
    text_image = torch.tensor([i for i, cs in enumerate(pairs.captions) for _ in cs])
    metrics = next(r["metrics"] for r in out["results"] if r["task"] == ev.RET)
    for k, v in ev.retrieval_metrics(images, texts, text_image).items():
        assert metrics[k] == pytest.approx(v), k


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A registered open_clip config small enough for random weights in a second."""
    import open_clip
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("clip") / "tiny-api-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "tiny-api-clip"


def test_plain_open_clip_model_equals_its_own_normalised_towers(tiny_clip, data):
    import open_clip
    aligner = ev.load_aligner("openclip:tiny-api-clip:", device="cpu")  # empty pretrained: random weights
    assert (aligner.method, aligner.dim, aligner.specs["text"]) == ("open_clip", 16, "openclip:tiny-api-clip:")
    model, preprocess = plumbing._openclip_model("tiny-api-clip", "", "cpu")
    paths = sorted((data / "folder").glob("*/*.png"))
    texts = ["a red square", "green"]
    with torch.no_grad():
        want_image = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths])), dim=-1)
        want_text = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny-api-clip")(texts)), dim=-1)
    assert torch.allclose(aligner.encode_image(paths), want_image, atol=1e-5)
    assert torch.allclose(aligner.encode_text(texts), want_text, atol=1e-5)


def test_evaluate_model_writes_to_the_results_folder_by_default(tiny_clip, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ev.main(["--model", tiny_clip, "--pretrained", "none", "--tasks", f"csv:{data / 'pairs.csv'}", "--workers", "0",
             "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []  # nothing in the current folder itself
    out = json.loads((tmp_path / "results" / f"eval_{tiny_clip}_none.json").read_text())
    assert out["model"] == f"{tiny_clip}/none"


def test_readme_snippet_runs_as_written(aligner_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Evaluation and the Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6 and "runs/sma/aligner.pt" in code  # import + five lines
    monkeypatch.chdir(ROOT)  # the snippet's image paths are relative to the repository root
    exec(code.replace("runs/sma/aligner.pt", str(aligner_path)), {})
    printed = capsys.readouterr().out
    assert printed.startswith("tensor([[") and printed.count("[") >= 4, printed
