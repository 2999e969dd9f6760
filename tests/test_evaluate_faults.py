"""evaluate.py on real dataset layouts and their faults (issue 20): each of the 14 clip14 sets as a tiny fixture in the
exact layout torchvision and CLIP_benchmark read (generated here; torchvision's md5 checks patched to "file exists"),
then the faults a user's copy has: missing, half-extracted or damaged sets skip with a one-line reason while the
others are evaluated and the JSON is written after every task; wrong class or image counts are refused (or marked
partial); a changed split file misses the cache; --strict exits 2. Tiny deterministic encoders keep it fast."""
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
import evaluate as ev  # noqa: E402
from plumbing import Encoder, atomic_save, head_state, make_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = "py:test_evaluate_faults:tiny"


# ---------------------------------------------------------------------------- tiny encoders (mechanics only)
def thumbnail(im):
    """PIL image -> (3, 8, 8) tensor in [0, 1]: a picklable transform (DataLoader workers)."""
    x = torch.from_numpy(np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).copy())
    return x.permute(2, 0, 1) / 255


def tiny(modality, device="cpu") -> Encoder:
    """image: the 8x8 thumbnail flattened (192-d); text: byte counts (256-d). Deterministic, no weights."""
    if modality == "image":
        return Encoder("", "image", 192, lambda x: x.flatten(1), thumbnail, 8, (0.0,) * 3, (1.0,) * 3)

    def text(texts):
        out = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            out[i] = torch.bincount(torch.tensor(list(t.encode()), dtype=torch.long), minlength=256)[:256].float()
        return out
    return Encoder("", "text", 256, text)


@pytest.fixture(scope="module")
def aligner(tmp_path_factory):
    torch.manual_seed(0)
    ckpt = {"format": "aligner/1", "method": "test", "image_encoder": SPEC, "text_encoder": SPEC, "args": {},
            "metrics": {}, "logit_scale": 10.0, "logit_bias": None}
    for m, dim in (("image", 192), ("text", 256)):
        ckpt[f"{m}_head"] = head_state(make_head("mlp", dim, 16), "mlp", dim, 16)
    path = tmp_path_factory.mktemp("aligner") / "aligner.pt"
    atomic_save(ckpt, path)
    return path


# ---------------------------------------------------------------------------- fixtures in the real layouts
def jpg(path, k=0, size=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), ((40 * k) % 256, (90 * k) % 256, (150 + 7 * k) % 256)).save(path)
    return path


def make_cifar(root, folder, meta, key, label_key, n_classes, train):
    base = root / folder
    base.mkdir(parents=True)
    for name in train:  # torchvision checks that the train files exist too
        (base / name).write_bytes(b"")
    data = np.random.default_rng(0).integers(0, 255, (3, 3072), dtype=np.uint8)
    (base / "test" if folder.startswith("cifar-100") else base / "test_batch").write_bytes(
        pickle.dumps({"data": data, label_key: [0, 1, 2]}))
    (base / meta).write_bytes(pickle.dumps({key: [f"class {c}" for c in range(n_classes)]}))


def make_sets(root: Path) -> dict:
    """Each clip14 set, tiny, as torchvision / CLIP_benchmark find it under root/<task>/. -> {task: n_images}."""
    from scipy.io import savemat
    n = {}
    make_cifar(root / "cifar10", "cifar-10-batches-py", "batches.meta", "label_names", "labels", 10,
               [f"data_batch_{i}" for i in range(1, 6)])
    make_cifar(root / "cifar100", "cifar-100-python", "meta", "fine_label_names", "fine_labels", 100, ["train"])
    n["cifar10"] = n["cifar100"] = 3
    stl = root / "stl10" / "stl10_binary"
    stl.mkdir(parents=True)
    for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin"):
        (stl / name).write_bytes(b"")
    (stl / "test_X.bin").write_bytes(np.random.default_rng(1).integers(0, 255, 3 * 3 * 96 * 96, dtype=np.uint8)
                                     .tobytes())
    (stl / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    (stl / "class_names.txt").write_text("\n".join(f"thing{c}" for c in range(10)) + "\n")
    n["stl10"] = 3
    food = root / "food101" / "food-101"
    split = {f"dish_{c}": [] for c in range(101)}
    for k in range(3):
        split[f"dish_{k}"].append(f"dish_{k}/{100 + k}")
        jpg(food / "images" / f"dish_{k}" / f"{100 + k}.jpg", k)
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "test.json").write_text(json.dumps(split))
    n["food101"] = 3
    cal = root / "caltech101" / "caltech101" / "101_ObjectCategories"
    for c, folder in enumerate(ev.CALTECH101_FOLDERS):  # the real folder names: evaluate.py checks them
        (cal / folder).mkdir(parents=True)
        if c < 3:
            jpg(cal / folder / "image_0001.jpg", c)
    n["caltech101"] = 3
    pets = root / "pets" / "oxford-iiit-pet"
    (pets / "annotations").mkdir(parents=True)
    lines = [f"breed{c}_1 {c + 1} {1 + c % 2} 1" for c in range(37)]  # the split names all 37 breeds
    for c in range(37):
        jpg(pets / "images" / f"breed{c}_1.jpg", c)
    (pets / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    n["pets"] = 37
    flowers = root / "flowers" / "flowers-102"
    for i in (1, 2, 3):
        jpg(flowers / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(flowers / "imagelabels.mat", {"labels": np.array([5, 1, 2])})
    savemat(flowers / "setid.mat", {"trnid": np.array([1]), "valid": np.array([2]), "tstid": np.array([1, 2, 3])})
    n["flowers"] = 3
    dtd = root / "dtd" / "dtd" / "dtd"
    (dtd / "labels").mkdir(parents=True)
    for c in range(47):
        jpg(dtd / "images" / f"texture{c:02d}" / f"texture{c:02d}_0001.jpg", c)
    (dtd / "labels" / "test1.txt").write_text("".join(f"texture{c:02d}/texture{c:02d}_0001.jpg\n" for c in range(47)))
    n["dtd"] = 47
    air = root / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    air.mkdir(parents=True)
    (air / "variants.txt").write_text("".join(f"Plane {c}\n" for c in range(100)))
    (air / "images_variant_test.txt").write_text("0001 Plane 0\n0002 Plane 7\n0003 Plane 7\n")
    for k, name in enumerate(("0001", "0002", "0003")):
        jpg(air / "images" / f"{name}.jpg", k)
    n["fgvc_aircraft"] = 3
    cars = root / "cars" / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": np.array([f"Car {c}" for c in range(196)],
                                                                        dtype=object)})
    annos = np.array([(f"{k:05d}.jpg", k + 1) for k in range(3)], dtype=[("fname", object), ("class", object)])
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annos})
    for k in range(3):
        jpg(cars / "cars_test" / f"{k:05d}.jpg", k)
    n["cars"] = 3
    sun = root / "sun397" / "SUN397"
    sun.mkdir(parents=True)
    (sun / "ClassName.txt").write_text("".join(f"/a/place_{c:03d}\n" for c in range(397)))
    for k in range(3):
        jpg(sun / "a" / f"place_{k:03d}" / f"sun_{k}.jpg", k)
    n["sun397"] = 3
    inet = root / "imagenet1k"
    wnids = [f"n{c:08d}" for c in range(1000)]
    inet.mkdir()
    torch.save(({w: (f"class {c}",) for c, w in enumerate(wnids)}, []), inet / "meta.bin")
    for c, w in enumerate(wnids):
        (inet / "val" / w).mkdir(parents=True)
        if c < 3:
            jpg(inet / "val" / w / f"ILSVRC2012_val_{c:08d}.JPEG", c)
    n["imagenet1k"] = 3
    flickr = root / "flickr30k"
    for k in range(3):
        jpg(flickr / f"{k}.jpg", k)
    (flickr / "flickr30k_test_karpathy.txt").write_text(
        "image,caption\n" + "".join(f"{k}.jpg,a photo, number {k}\n{k}.jpg,picture {k}\n" for k in range(3)))
    n["flickr30k"] = 3
    coco = root / "mscoco_captions"
    ann = {"images": [{"id": k, "file_name": f"COCO_val2014_{k:012d}.jpg"} for k in range(3)],
           "annotations": [{"image_id": k, "id": 10 * k + j, "caption": f"scene {k} view {j}"}
                           for k in range(3) for j in range(2)]}
    for k in range(3):
        jpg(coco / "val2014" / f"COCO_val2014_{k:012d}.jpg", k)
    (coco / "coco_test_karpathy.json").write_text(json.dumps(ann))
    n["mscoco_captions"] = 3
    return n


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return root, make_sets(root)


@pytest.fixture
def sets(pristine, tmp_path, monkeypatch):
    """A fresh copy of the 14 sets, with each task's known sizes set to the fixture's (6 captions per retrieval
    set) and torchvision's md5 checks reduced to "the file exists"."""
    import torchvision.datasets as tvd
    src, sizes = pristine
    root = tmp_path / "datasets"
    shutil.copytree(src, root)
    for name, count in sizes.items():
        task = ev.TASKS[name]
        monkeypatch.setitem(ev.TASKS, name, dataclasses.replace(task, n_images=count,
                                                                n_texts=6 if task.n_texts else 0))
    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    for module in (tvd.cifar, tvd.stl10, tvd.flowers102):
        monkeypatch.setattr(module, "check_integrity", exists)
    return root


def run(aligner, root, tmp_path, *extra, tasks="clip14"):
    """evaluate.py's command line in this process -> (exit status, the JSON it wrote, stderr lines)."""
    out = tmp_path / "eval.json"
    argv = ["--aligner", str(aligner), "--tasks", tasks, "--dataset-root", str(root), "--cache-dir",
            str(tmp_path / "cache"), "--output", str(out), "--workers", "0", "--device", "cpu", *extra]
    status = ev.cli(argv)
    return status, json.loads(out.read_text()) if out.exists() else None


def rows(out):
    return {r["dataset"]: r for r in out["results"]}


# ---------------------------------------------------------------------------- the sets as they should be
def test_all_14_sets_in_their_real_layouts_evaluate(aligner, sets, tmp_path):
    status, out = run(aligner, sets, tmp_path)
    assert status == 0
    got = rows(out)
    assert [n for n, r in got.items() if "metrics" not in r] == [], {n: r.get("skipped") for n, r in got.items()}
    assert out["complete"] and out["mean"]["tasks"] == 14 and out["mean"]["clip14"] is not None
    assert got["imagenet1k"]["n_classes"] == 1000 and got["caltech101"]["n_classes"] == 102
    assert got["mscoco_captions"]["n_texts"] == 6


# ---------------------------------------------------------------------------- the "done when"
def damage(root: Path):
    """Some sets half-extracted, some damaged, one missing: -> the tasks that must still be evaluated."""
    (root / "food101" / "food-101" / "meta" / "test.json").unlink()  # half-extracted: images only
    (root / "cifar10" / "cifar-10-batches-py" / "test_batch").unlink()  # half-extracted
    pet = root / "pets" / "oxford-iiit-pet" / "images" / "breed3_1.jpg"  # a truncated image
    jpg(pet, 3, size=256)
    pet.write_bytes(pet.read_bytes()[:300])
    (root / "flickr30k" / "1.jpg").unlink()  # an image missing
    coco = root / "mscoco_captions" / "coco_test_karpathy.json"  # Karpathy's original file under the expected name
    coco.write_text(json.dumps({"dataset": "coco", "images": [{"filepath": "val2014", "filename": "a.jpg",
                                                              "split": "test", "sentences": [{"raw": "a"}]}]}))
    shutil.rmtree(root / "caltech101")
    (root / "caltech101").write_text("not a folder")  # a path that is a file
    shutil.rmtree(root / "imagenet1k" / "val" / "n00000500")  # a class folder missing: labels would shift
    dtd = root / "dtd" / "dtd" / "dtd" / "labels" / "test1.txt"  # a split file cut short: 46 of 47 classes
    dtd.write_text("".join(dtd.read_text().splitlines(keepends=True)[:-1]))
    shutil.rmtree(root / "cars")  # not there at all
    return ["cifar100", "stl10", "flowers", "fgvc_aircraft", "sun397"]


def test_a_root_of_complete_half_extracted_and_damaged_sets(aligner, sets, tmp_path, capsys):
    complete = damage(sets)
    status, out = run(aligner, sets, tmp_path)
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err
    got = rows(out)
    assert sorted(n for n, r in got.items() if "metrics" in r) == sorted(complete)
    skipped = {n: r["skipped"] for n, r in got.items() if "skipped" in r}
    assert len(skipped) == 9 and out["mean"]["clip14"] is None and out["mean"]["tasks"] == 5
    for name, reason in skipped.items():
        assert "\n" not in reason and reason.startswith(f"{name}: ") and str(sets / name) in reason, reason
        assert f"[evaluate] skipped {reason}" in err
    assert "breed3_1.jpg: cannot read the image" in skipped["pets"]
    assert "is a file, not a folder" in skipped["caltech101"]
    assert "Karpathy's dataset_coco.json" in skipped["mscoco_captions"]
    assert "n00000500" in skipped["imagenet1k"] and "999 class folders" in skipped["imagenet1k"]
    assert "defines 46 classes, dtd has 47" in skipped["dtd"]
    assert "does not exist" in skipped["cars"] and "--download" not in skipped["cars"]  # cannot download
    assert "1.jpg" in skipped["flickr30k"] and "test.json" in skipped["food101"]
    # --strict: the same run, the same JSON, exit status 2 and one line naming the skipped tasks
    status, again = run(aligner, sets, tmp_path, "--strict")
    err = capsys.readouterr().err
    timeless = lambda out: [{k: v for k, v in r.items() if k != "seconds"} for r in out["results"]]  # noqa: E731
    assert status == 2 and timeless(again) == timeless(out)
    assert err.strip().splitlines()[-1].startswith("error: --strict: 9 of 14 tasks skipped (imagenet1k, cifar10")


def test_command_line_exit_status_without_patches(aligner, tmp_path):
    """The real command, nothing patched: torchvision's md5 check refuses the fixture's CIFAR-100 and the count check
    (the fixture is not the real split) FGVC-Aircraft; no traceback, JSON written, 0 (2 with --strict)."""
    root = tmp_path / "datasets"
    make_sets(root)
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--aligner", str(aligner), "--tasks",
           "cifar100,fgvc_aircraft,nope",
           "--dataset-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "e.json"),
           "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --tasks: unknown task 'nope'")
    cmd[5] = "cifar100,fgvc_aircraft"
    for extra, status in (([], 0), (["--strict"], 2)):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        out = json.loads((tmp_path / "e.json").read_text())
        cifar, aircraft = (r["skipped"] for r in out["results"])
        assert "Dataset not found or corrupted" in cifar and "cifar-100-python/" in cifar and "\n" not in cifar
        assert "read 3 images, the split (test, 3,333, 100 variants) has 3,333 images" in aircraft


# ---------------------------------------------------------------------------- counts
def test_a_missing_class_folder_is_refused_never_a_shifted_label(aligner, sets, tmp_path):
    shutil.rmtree(sets / "caltech101" / "caltech101" / "101_ObjectCategories" / "lotus")
    status, out = run(aligner, sets, tmp_path, tasks="caltech101")
    reason = rows(out)["caltech101"]["skipped"]
    assert status == 0 and "101 class folders for the 102 expected" in reason and "missing ['lotus']" in reason


def test_an_image_count_short_of_the_split_is_refused_or_partial(aligner, sets, tmp_path, monkeypatch):
    monkeypatch.setitem(ev.TASKS, "fgvc_aircraft", dataclasses.replace(ev.TASKS["fgvc_aircraft"], n_images=5))
    _, out = run(aligner, sets, tmp_path, tasks="fgvc_aircraft,sun397")
    assert "read 3 images, the split (test, 3,333, 100 variants) has 5 images" in rows(out)["fgvc_aircraft"]["skipped"]
    _, out = run(aligner, sets, tmp_path, "--partial", tasks="fgvc_aircraft,sun397")
    partial = rows(out)["fgvc_aircraft"]
    assert "metrics" in partial and partial["partial"].startswith("read 3 images") and partial["n_images"] == 3
    assert out["mean"]["tasks"] == 1 and out["mean"]["mean"] == rows(out)["sun397"]["metrics"]["acc1"]


# ---------------------------------------------------------------------------- cache key
def test_a_changed_split_file_is_recomputed_not_read_from_the_cache(aligner, sets, tmp_path):
    run(aligner, sets, tmp_path, tasks="food101,fgvc_aircraft")
    cache = tmp_path / "cache" / "eval"
    assert len(list(cache.glob("food101-image-*.pt"))) == 1
    meta = sets / "food101" / "food-101" / "meta" / "test.json"
    split = json.loads(meta.read_text())
    split["dish_0"], split["dish_1"] = split["dish_1"], split["dish_0"]  # two images swap labels
    meta.write_text(json.dumps(split))
    labels = sets / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt"
    labels.write_text(labels.read_text().replace("0001 Plane 0", "0001 Plane 7"))
    _, second = run(aligner, sets, tmp_path, tasks="food101,fgvc_aircraft")
    assert len(list(cache.glob("food101-image-*.pt"))) == 2 and len(list(cache.glob("fgvc_aircraft-image-*"))) == 2
    raw = ev.read_cache(  # the labels cached now are the new split's
        sorted(cache.glob("fgvc_aircraft-image-*.pt"), key=os.path.getmtime)[-1])
    assert raw["labels"].tolist() == [7, 7, 7] and second["results"][1]["n_images"] == 3


def test_a_replaced_image_is_recomputed(aligner, sets, tmp_path):
    run(aligner, sets, tmp_path, tasks="cifar100")
    batch = sets / "cifar100" / "cifar-100-python" / "test"  # a binary set: its files are in the key
    d = pickle.loads(batch.read_bytes())
    d["data"] = 255 - d["data"]
    batch.write_bytes(pickle.dumps(d))
    run(aligner, sets, tmp_path, tasks="cifar100")
    assert len(list((tmp_path / "cache" / "eval").glob("cifar100-image-*.pt"))) == 2


# ---------------------------------------------------------------------------- download, workers, interruption
def test_download_without_a_network_skips_and_leaves_no_empty_folder(aligner, sets, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    shutil.rmtree(sets / "stl10")
    status, out = run(aligner, sets, tmp_path, "--download", tasks="stl10,cars")
    got = rows(out)
    assert status == 0 and "the download failed" in got["stl10"]["skipped"] and "no network" in got["stl10"]["skipped"]
    assert not (sets / "stl10").exists()
    assert "metrics" in got["cars"]  # its files are there: --download does not touch it


def test_a_bad_image_read_in_a_worker_is_one_line(aligner, sets, tmp_path):
    bad = sets / "sun397" / "SUN397" / "a" / "place_001" / "sun_1.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "eval.json"
    ev.cli(["--aligner", str(aligner), "--tasks", "sun397", "--dataset-root", str(sets), "--cache-dir",
            str(tmp_path / "cache"), "--output", str(out), "--workers", "2", "--device", "cpu"])
    reason = json.loads(out.read_text())["results"][0]["skipped"]
    assert reason.startswith(f"sun397: {bad}: cannot read the image (UnidentifiedImageError") and "\n" not in reason


def test_an_interrupted_run_keeps_the_tasks_it_finished(aligner, sets, tmp_path, monkeypatch):
    evaluate_task = ev.evaluate_task

    def interrupted(model, name, *a):
        if name == "stl10":
            raise KeyboardInterrupt
        return evaluate_task(model, name, *a)
    monkeypatch.setattr(ev, "evaluate_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(aligner, sets, tmp_path, tasks="cifar10,flowers,stl10,dtd")
    out = json.loads((tmp_path / "eval.json").read_text())
    assert [r["dataset"] for r in out["results"]] == ["cifar10", "flowers"] and not out["complete"]
