"""evaluate.py: the metrics against obviously-correct loops in float64 (ties, several captions per image, a class
with no samples), the class-vector construction, the dataset readers, the skip rule, and end-to-end runs of an
open_clip tiny random model and an exported aligner checkpoint on the example splits."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
import evaluate as ev  # noqa: E402
import plumbing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- loop references (float64)
def ref_rank(scores, positive):
    """Position of the first positive in Python's stable sort by descending score (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    return next(pos for pos, j in enumerate(order) if positive[j])


def ref_classification(image, classes, labels):
    C = len(classes)
    hits1, hits5, per_class = 0, 0, {}
    for x, y in zip(image.tolist(), labels.tolist()):
        scores = [sum(a * b for a, b in zip(x, w)) for w in classes.tolist()]
        r = ref_rank(scores, [c == y for c in range(C)])
        hits1, hits5 = hits1 + (r < 1), hits5 + (r < 5)
        per_class.setdefault(y, []).append(r == 0)
    n = len(labels)
    return {"acc1": hits1 / n, "acc5": hits5 / n if C >= 5 else float("nan"),
            "mean_per_class_recall": sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)}


def ref_retrieval(image, text, text_image):
    image, text, text_image = image.tolist(), text.tolist(), text_image.tolist()
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    out = {}
    for k in (1, 5, 10):
        t2i = [ref_rank([dot(t, x) for x in image], [i == ti for i in range(len(image))]) < k
               for t, ti in zip(text, text_image)]
        i2t = [ref_rank([dot(x, t) for t in text], [ti == i for ti in text_image]) < k for i, x in enumerate(image)]
        out[f"t2i_R@{k}"], out[f"i2t_R@{k}"] = sum(t2i) / len(t2i), sum(i2t) / len(i2t)
    return out


def unit(n, d, g):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def ints(n, d, g):
    """Small-integer embeddings: every dot product is exact in float64 whatever the summation order, so ties
    are real ties for both the loop and the matmul (duplicate float vectors need not tie bit for bit in a GEMM)."""
    return torch.randint(-2, 3, (n, d), generator=g).double()


def assert_close(got, want):
    assert got.keys() >= want.keys()
    for k, v in want.items():
        assert (math.isnan(v) and math.isnan(got[k])) or abs(got[k] - v) < 1e-6, (k, got[k], v)


# ---------------------------------------------------------------------------- metrics
def test_first_positive_rank_tie_rule_known_answers():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1],   # positive 2 ties with 1 (lower index) -> rank 1
                           [0.9, 0.5, 0.9, 0.1],   # positive 0 ties with 2 (higher index) -> rank 0
                           [0.2, 0.2, 0.2, 0.2],   # all tied, positives 1 and 3 -> first is 1 -> rank 1
                           [0.3, 0.8, 0.1, 0.8]])  # positives 0 and 3: best is 3 (0.8), after tied 1 -> 1
    positive = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    assert ev.first_positive_rank(scores, positive).tolist() == [1, 0, 1, 1]


def test_classification_metrics_match_loop_with_ties_and_an_empty_class():
    g = torch.Generator().manual_seed(0)
    classes, image = ints(7, 4, g), ints(60, 4, g)  # many exact ties
    classes[4] = classes[1]  # a duplicate class vector: every image ties between classes 1 and 4
    labels = torch.randint(0, 7, (60,), generator=g)
    labels[labels == 6] = 5  # class 6 has no samples: left out of mean per-class recall
    labels[:10] = torch.tensor([1, 4, 1, 4, 2, 1, 4, 4, 1, 0])
    got = ev.classification_metrics(image, classes, labels)
    want = ref_classification(image, classes, labels)
    assert_close(got, want)
    assert got["acc1"] < 1 and (labels == 6).sum() == 0
    # fewer than 5 classes: acc5 is NaN, as CLIP_benchmark
    few = ev.classification_metrics(image, classes[:3], labels % 3)
    assert math.isnan(few["acc5"])
    assert abs(few["acc1"] - ref_classification(image, classes[:3], labels % 3)["acc1"]) < 1e-9


def test_retrieval_metrics_match_loop_with_several_captions_and_ties():
    g = torch.Generator().manual_seed(1)
    n_captions = torch.randint(1, 5, (25,), generator=g)  # 1 to 4 captions per image
    text_image = torch.repeat_interleave(torch.arange(25), n_captions)
    image = ints(25, 3, g)  # many exact ties
    image[7] = image[3]  # two identical images: their captions' scores tie
    text = image[text_image] + ints(len(text_image), 3, g)
    text[5] = text[2]  # identical captions
    got = ev.retrieval_metrics(image, text, text_image)
    assert_close(got, ref_retrieval(image, text, text_image))
    assert 0 < got["t2i_R@1"] < got["t2i_R@10"] <= 1


def test_without_ties_ranks_agree_with_topk_membership():
    """CLIP_benchmark's semantics (a hit when a positive is among torch.topk's k) on tie-free scores."""
    g = torch.Generator().manual_seed(2)
    image, text = unit(40, 5, g), unit(90, 5, g)
    text_image = torch.randint(0, 40, (90,), generator=g)
    text_image[:40] = torch.arange(40)  # every image has at least one caption
    scores = image @ text.T  # (I, T)
    positive = text_image[None] == torch.arange(40)[:, None]
    for k in (1, 5, 10):
        top = scores.topk(k, dim=1).indices
        topk_hit = positive.gather(1, top).any(1).double().mean().item()
        assert abs(ev.retrieval_metrics(image, text, text_image)[f"i2t_R@{k}"] - topk_hit) < 1e-12


def test_modality_gap_matches_loop():
    g = torch.Generator().manual_seed(3)
    image, text = unit(6, 4, g), unit(9, 4, g)
    pair_image, pair_text = torch.tensor([0, 0, 1, 2, 5, 5]), torch.tensor([0, 1, 2, 3, 4, 8])
    got = ev.modality_gap(image, text, pair_image, pair_text)
    P = len(pair_image)
    cx = [sum(image[i, d].item() for i in pair_image) / P for d in range(4)]
    cy = [sum(text[j, d].item() for j in pair_text) / P for d in range(4)]
    gap = math.sqrt(sum((a - b) ** 2 for a, b in zip(cx, cy)))
    cos = sum(sum(image[i, d].item() * text[j, d].item() for d in range(4)) for i, j in zip(pair_image, pair_text)) / P
    assert_close(got, {"modality_gap": gap, "matched_cosine": cos})


def test_zeroshot_classifier_is_normalised_template_average():
    g = torch.Generator().manual_seed(4)
    prompts = torch.randn(5, 3, 8, generator=g, dtype=torch.float64) * 3  # (C, T, D), not normalised
    got = ev.zeroshot_classifier(prompts)
    for c in range(5):
        mean = [sum(prompts[c, t, d].item() / prompts[c, t].norm().item() for t in range(3)) / 3 for d in range(8)]
        norm = math.sqrt(sum(v * v for v in mean))
        assert all(abs(got[c, d].item() - mean[d] / norm) < 1e-9 for d in range(8))


# ---------------------------------------------------------------------------- names, templates, readers
def test_imagenet_names_and_80_templates_are_openai_exact():
    import open_clip
    assert ev.cb_classnames()["imagenet1k"] == list(open_clip.IMAGENET_CLASSNAMES)
    assert len(ev.cb_templates()["imagenet1k"]) == 80
    assert [ev.fill(t, "dog") for t in ev.cb_templates()["imagenet1k"]] == \
        [t("dog") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert set(ev.ALIASES["clip14"]) <= set(ev.TASKS) and len(ev.CLIP14) == 14


def test_caltech101_folder_names_follow_clip_benchmark_names_in_order():
    """The folder list read_caltech101 checks against: ImageFolder's sorted order, position for position the class
    CLIP_benchmark names (so one missing or stray folder is refused instead of shifting labels)."""
    folders, names = ev.CALTECH101_FOLDERS, ev.cb_classnames()["caltech101"]
    assert len(folders) == len(set(folders)) == len(names) == 102 and folders == sorted(folders)
    pairs = dict(zip(folders, names))
    assert (pairs["BACKGROUND_Google"], pairs["Faces_easy"], pairs["car_side"], pairs["yin_yang"]) == (
        "background", "centered face", "side of a car", "yin and yang symbol")
    assert all(f.lower().replace("_", " ").rstrip("s") in n for f, n in pairs.items()
               if f not in ("BACKGROUND_Google", "Faces_easy", "car_side", "cougar_body", "cougar_face",
                            "crocodile_head", "flamingo_head", "yin_yang"))


def png(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)
    return path


def test_mscoco_and_flickr_readers_keep_every_caption(tmp_path):
    coco = tmp_path / "mscoco_captions"
    for name in ("COCO_val2014_2.jpg", "COCO_val2014_1.jpg"):
        png(coco / "val2014" / name)
    ann = {"images": [{"id": 2, "file_name": "COCO_val2014_2.jpg"}, {"id": 1, "file_name": "COCO_val2014_1.jpg"}],
           "annotations": [{"image_id": 2, "caption": f"two {k}"} for k in range(6)] + [
               {"image_id": 1, "caption": "one, a"}, {"image_id": 1, "caption": "one b"}]}
    (coco / "coco_test_karpathy.json").write_text(json.dumps(ann))
    data = ev.read_mscoco(coco, ev.Args(), "mscoco_captions")
    assert data.files == [str(coco / "val2014" / "COCO_val2014_1.jpg"), str(coco / "val2014" / "COCO_val2014_2.jpg")]
    assert data.captions == [["one, a", "one b"], [f"two {k}" for k in range(6)]]  # all 6 kept (CLIP_benchmark)
    flickr = tmp_path / "flickr30k"
    png(flickr / "10.jpg"), png(flickr / "20.jpg")
    (flickr / "flickr30k_test_karpathy.txt").write_text("image,caption\n10.jpg,a dog, running\n20.jpg,b\n"
                                                         "10.jpg,a dog again\n")
    data = ev.read_flickr30k(flickr, ev.Args(), "flickr30k")
    assert data.captions == [["a dog, running", "a dog again"], ["b"]]


def test_missing_dataset_is_skipped_naming_the_path_never_zero(tmp_path):
    out = tmp_path / "eval.json"
    aligner = make_aligner(tmp_path)
    result = ev.main(["--aligner", str(aligner), "--tasks", "cifar10,imagenet1k", "--dataset-root",
                      str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    for r in result["results"]:
        assert "metrics" not in r and str(tmp_path / "data" / r["dataset"]) in r["skipped"]
    assert "cifar-10-batches-py" in result["results"][0]["skipped"] and "--download" in result["results"][0]["skipped"]
    assert result["mean"]["mean"] is None and json.loads(out.read_text())["results"][1]["dataset"] == "imagenet1k"


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """A tiny folder + pairs stand-in (the shipped emoji tasks are read in test_emoji_set.py; encoding their 1,449
    images would cost minutes here)."""
    root = tmp_path_factory.mktemp("splits")
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    rows = ["image,caption"]
    for k, (name, colour) in enumerate(colours.items()):
        for j in range(3):
            png(root / "zeroshot" / f"{name}_thing" / f"{j}.png", tuple(c // (j + 1) for c in colour))
        png(root / "images" / f"{name}.png", colour)
        rows += [f"images/{name}.png,a {name} square", f"images/{name}.png,{name}"]
    (root / "zeroshot" / "empty_class").mkdir()
    (root / "zeroshot" / "templates.txt").write_text("a photo of {}.\n{}\n")
    (root / "heldout.csv").write_text("\n".join(rows) + "\n")
    return f"folder:{root / 'zeroshot'},csv:{root / 'heldout.csv'}", root / "zeroshot", root / "heldout.csv"


def make_aligner(folder):
    image = ev.load_encoder("timm-random:test_vit", "image")
    torch.manual_seed(0)
    heads = {"image": (plumbing.make_head("mlp", image.dim, 16, 24, 2), image.dim),
             "text": (plumbing.make_head("mlp", 32, 16, 24, 2), 32)}  # py:tiny_encoders:text is 32-d
    ckpt = {"format": "aligner/1", "method": "test", "image_encoder": "timm-random:test_vit",
            "text_encoder": "py:tiny_encoders:text", "logit_scale": 10.0, "logit_bias": None, "args": {}, "metrics": {}}
    for m, (head, dim) in heads.items():
        ckpt[f"{m}_head"] = plumbing.head_state(head, "mlp", dim, 16, 24, 2)
    ev.atomic_save(ckpt, folder / "aligner.pt")
    return folder / "aligner.pt"


def check_results(out, tasks):
    results = {r["dataset"]: r for r in out["results"]}
    assert len(results) == 2 and all("metrics" in r for r in results.values()), out["results"]
    cls = next(r for r in results.values() if r["task"] == "zeroshot_classification")
    ret = next(r for r in results.values() if r["task"] == "zeroshot_retrieval")
    assert set(cls["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "modality_gap", "matched_cosine"}
    assert set(ret["metrics"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
        "modality_gap", "matched_cosine"}
    for r in (cls, ret):
        for k, v in r["metrics"].items():
            lo, hi = {"modality_gap": (0, 2), "matched_cosine": (-1, 1)}.get(k, (0, 1))
            assert lo - 1e-6 <= v <= hi + 1e-6, (k, v)
    assert ret["metrics"]["i2t_R@1"] <= ret["metrics"]["i2t_R@5"] <= ret["metrics"]["i2t_R@10"]
    assert out["mean"]["tasks"] == 2 and 0 <= out["mean"]["mean"] <= 1 and out["mean"]["clip14"] is None


def test_open_clip_tiny_random_model_end_to_end_and_cache(tmp_path, splits, monkeypatch):
    import open_clip
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    tasks, _, _ = splits
    argv = ["--model", "tiny-test-clip", "--pretrained", "none", "--tasks", tasks, "--cache-dir",
            str(tmp_path / "cache"), "--output", str(tmp_path / "eval.json"), "--workers", "0", "--batch-size", "64"]
    out = ev.main(argv)
    check_results(out, tasks)
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == json.loads(json.dumps(out["results"]))
    # second run: every feature comes from the cache, no encoder is loaded, same numbers
    monkeypatch.setattr(ev, "load_encoder", lambda *a, **k: pytest.fail("encoder loaded despite the cache"))
    again = ev.main(argv)
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in out["results"]]


def test_aligner_checkpoint_cli_end_to_end(tmp_path, splits):
    tasks, zeroshot, heldout = splits
    aligner = make_aligner(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--aligner", str(aligner), "--tasks", tasks,
                           "--cache-dir", str(tmp_path / "cache"), "--workers", "2"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "eval.json").read_text())  # default output: next to the aligner
    check_results(out, tasks)
    assert out["image_encoder"] == "timm-random:test_vit" and out["model"].startswith("test:")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("eval (") and "acc1" in last and "R@1" in last, last
    n_classes = len([d for d in zeroshot.iterdir() if d.is_dir()])
    cls = next(r for r in out["results"] if r["task"] == "zeroshot_classification")
    assert cls["n_classes"] == n_classes and cls["n_images"] == len(list(zeroshot.glob("*/*.png")))


def test_folder_task_names_templates_and_bad_classnames(tmp_path):
    png(tmp_path / "red_car" / "a.png"), png(tmp_path / "blue_bus" / "b.png")
    (tmp_path / "empty_class").mkdir()  # a class with no images stays a class (mean per-class recall skips it)
    args = ev.parse_args(["--model", "x", "--pretrained", "none"])
    data = ev.read_folder(tmp_path, args, "folder")
    assert data.classnames == ["blue bus", "empty class", "red car"] and data.templates == ["a photo of a {}."]
    assert len(data.images) == 2 and data.images[0][1] == 0
    args.templates = "imagenet1k"  # --templates: a CLIP_benchmark key or a file
    assert len(ev.read_folder(tmp_path, args, "folder").templates) == 80
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ev.DataError, match="1 names for 3 class folders"):
        ev.read_folder(tmp_path, args, "folder")
    tasks = ev.resolve_tasks(f"emoji,mscoco,{tmp_path}/p.tsv,folder:{tmp_path}")
    assert list(tasks) == ["emoji_zeroshot", "emoji_retrieval", "mscoco_captions", f"{tmp_path}/p.tsv",
                           f"folder:{tmp_path}"]
    with pytest.raises(ev.DataError, match="unknown task 'nope'"):
        ev.resolve_tasks("nope")
