"""A fault generator for the training scripts' inputs (issue 25): a table of mutations, each a malformed variant of
one input kind (tar shards, pairs files, the feature store, encoders, checkpoints, train/test leaks), run through the
real command line. Each row says what must happen: a refusal (exit 2, one line on stderr naming `says`, no
traceback, nothing written into --out) or a recovery (exit 0, and where it says so the same heads as a clean run).
A new fault kind is a new row. Stand-in encoders (tests/store_encoders.py): a few seconds a row."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TARS = ROOT / "tests" / "data" / "tars"
EMOJI = ROOT / "examples" / "emoji"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENC = ["--image-encoder", "py:store_encoders:image", "--text-encoder", "py:store_encoders:text"]
LITE0 = ["--image-encoder", "offline:efficientnet-lite0"]  # a real encoder, where features must mean something


def run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def sotalign(w: Path, pairs, *more):
    return run("sotalign.py", "--pairs", pairs, *ENC, "--steps", "2", "--paired-batch", "4", "--dim", "8",
               "--no-compile", "--cache-dir", w / "cache", "--out", w / "out", *more)


def sma(w: Path, data, *more):
    return run("sma.py", "--data", data, *ENC, "--epochs", "1", "--batch-size", "4", "--dim", "8", "--hidden", "8",
               "--cache-dir", w / "cache", "--out", w / "out", *more)


def rewrite_tar(src: Path, dst: Path, change):
    """A copy of the shard `src` whose members pass through change(name, data) -> data (None drops the member)."""
    with tarfile.open(src) as f, tarfile.open(dst, "w") as out:
        for m in f:
            data = change(m.name, f.extractfile(m).read())
            if data is not None:
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return dst


def heads(out: Path):
    return torch.load(out / "aligner.pt", weights_only=True)["image_head"]["state_dict"]


def pairs_csv(w: Path, n=6, name="pairs.csv"):
    rows = (EMOJI / "train.csv").read_text().splitlines()[1:]
    seen, lines = [], ["image,caption"]
    for row in rows:
        image = row.split(",")[0]
        if image not in seen and len(seen) < n:
            seen.append(image)
        if image in seen:
            lines.append(f"{EMOJI / image},{row.split(',', 1)[1]}")
    (w / name).write_text("\n".join(lines) + "\n")
    return w / name


# ---------------------------------------------------------------- the mutations: (input kind, how, what must happen)
def truncated_jpeg(w):
    tar = rewrite_tar(TARS / "00000.tar", w / "00000.tar", lambda n, d: d[:len(d) // 2] if n == "000000003.jpg" else d)
    return sotalign(w, tar), {"refused": ["00000.tar, member 000000003.jpg", "cut short", "--skip-bad-rows"]}


def truncated_jpeg_skipped(w):
    tar = rewrite_tar(TARS / "00000.tar", w / "00000.tar", lambda n, d: d[:len(d) // 2] if n == "000000003.jpg" else d)
    proc = sotalign(w, tar, "--skip-bad-rows")
    return proc, {"recovers": ["5 entities"]}


def not_an_image(w):
    tar = rewrite_tar(TARS / "00000.tar", w / "00000.tar", lambda n, d: b"garbage" if n == "000000002.jpg" else d)
    return sotalign(w, tar), {"refused": ["member 000000002.jpg", "unreadable image"]}


def tar_cut_at_a_member_edge(w):
    data = (TARS / "00000.tar").read_bytes()
    with tarfile.open(TARS / "00000.tar") as f:
        members = f.getmembers()
    cut = members[6].offset  # the header of the 7th member: 3 whole samples before it
    (w / "00000.tar").write_bytes(data[:cut])
    return sotalign(w, w / "00000.tar"), {"refused": ["00000.tar: cut short (no end-of-archive marker"]}


def stats_disagree(w):
    shutil.copy(TARS / "00000.tar", w / "00000.tar")
    (w / "00000_stats.json").write_text(json.dumps({"successes": 9}))
    return sotalign(w, w / "00000.tar"), {"refused": ["6 samples, 00000_stats.json says 9"]}


def index_json_damaged(w):
    data = pairs_csv(w)
    first = sma(w, data)
    assert first.returncode == 0, first.stderr[-2000:]
    clean = heads(w / "out")
    for index in (w / "cache").glob("sma-image-*/index.json"):
        index.write_text(index.read_text()[:10])
    shutil.rmtree(w / "out")
    return sma(w, data), {"recovers": [], "same_heads": clean}


def stray_shard_and_stale_temporary(w):
    data = pairs_csv(w)
    assert sma(w, data).returncode == 0
    clean = heads(w / "out")
    store = next((w / "cache").glob("sma-text-*"))
    shutil.copy(next(store.glob("000000-*.npy")), store / "000007-deadbeef.npy")  # a shard number it does not have
    stale = store / f".000000-x.npy~{os.uname().nodename}~999999999~abcd.tmp"  # a dead process's temporary
    stale.write_bytes(b"half a shard")
    shutil.rmtree(w / "out")
    proc = sma(w, data)
    assert not stale.exists(), "the dead process's temporary stays"
    return proc, {"recovers": ["not a shard of this store"], "same_heads": clean}


def encoder_module_changed(w):
    (w / "enc.py").write_text((ROOT / "tests" / "store_encoders.py").read_text())
    data, enc = pairs_csv(w), ["--image-encoder", "py:enc:image", "--text-encoder", "py:enc:text"]
    small = ["--epochs", "1", "--batch-size", "4", "--dim", "8", "--hidden", "8", "--cache-dir", w / "cache"]
    first = run(ROOT / "sma.py", "--data", data, *enc, *small, "--out", w / "a", cwd=w)
    assert first.returncode == 0, first.stderr[-2000:]
    (w / "enc.py").write_text((w / "enc.py").read_text().replace("DIM = 16", "DIM = 12"))  # same spec, other features
    proc = run(ROOT / "sma.py", "--data", data, *enc, *small, "--out", w / "out", cwd=w)
    assert "reusing" not in proc.stdout, proc.stdout
    return proc, {"recovers": []}


def image_replaced_keeping_mtime(w):
    noto = sorted((EMOJI / "images" / "noto").glob("*.png"))
    folder = w / "images"
    folder.mkdir()
    lines = ["image,caption"]
    for i, png in enumerate(noto[:6]):
        shutil.copy(png, folder / f"{i}.png")
        lines.append(f"images/{i}.png,caption {i}")
    (w / "pairs.csv").write_text("\n".join(lines) + "\n")
    assert sma(w, w / "pairs.csv").returncode == 0
    target, other = folder / "0.png", folder / "1.png"
    stat = target.stat()
    replacement = Image.open(other).convert("RGB").resize(Image.open(target).size)
    buf = io.BytesIO()
    replacement.save(buf, "PNG")
    data = buf.getvalue()
    data = data[:stat.st_size].ljust(stat.st_size, b"\0") if len(data) >= stat.st_size else data + b"\0" * (
        stat.st_size - len(data))  # same size (PNG readers stop at IEND)
    time.sleep(0.01)
    target.write_bytes(data)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, rsync -t: the old mtime kept
    shutil.rmtree(w / "out")
    proc = sma(w, w / "pairs.csv")
    assert "reusing" not in proc.stdout.split("features:")[1], proc.stdout  # the image store is recomputed
    return proc, {"recovers": []}


def colons_in_a_file_name(w):
    noto = sorted((EMOJI / "images" / "noto").glob("*.png"))
    lines = ["image,caption"]
    for i, png in enumerate(noto[:6]):
        shutil.copy(png, w / f"a::{i}.png")
        lines.append(f"a::{i}.png,caption {i}")
    (w / "pairs.csv").write_text("\n".join(lines) + "\n")
    return sma(w, w / "pairs.csv"), {"recovers": ["6 entities"]}


def resume_with_other_ranks(w):
    data = pairs_csv(w)
    assert sma(w, data, "--stop-after-steps", "1").returncode == 0
    ckpt = w / "out" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["world"] = 2  # as if trained under torchrun --nproc_per_node=2
    torch.save(state, ckpt)
    return sma(w, data, "--resume"), {"refused": ["2 process(es), now 1", "--nproc_per_node=2"], "out_kept": True}


@pytest.fixture
def leak_root(tmp_path):
    """A dataset root whose Karpathy MSCOCO test split holds 2 images with captions."""
    noto = sorted((EMOJI / "images" / "noto").glob("*.png"))
    split = tmp_path / "datasets" / "mscoco_captions"
    (split / "val2014").mkdir(parents=True)
    images, notes = [], []
    for i in range(2):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        Image.open(noto[i]).convert("RGB").save(split / "val2014" / name)
        images.append({"id": i + 1, "file_name": name})
        notes.append({"id": i, "image_id": i + 1, "caption": f"a test caption {i}"})
    (split / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": notes}))
    return tmp_path


def renamed_copy_of_a_test_image(w):
    test = sorted((w / "datasets" / "mscoco_captions" / "val2014").glob("*.jpg"))
    lines = ["image,caption"] + [f"{EMOJI}/images/noto/{p.name},caption {i}" for i, p in enumerate(
        sorted((EMOJI / "images" / "noto").glob("*.png"))[10:14])]
    shutil.copy(test[0], w / "holiday.JPG")  # another name, another suffix case: the same bytes
    os.link(test[1], w / "linked.jpg")  # a hard link
    lines += ["holiday.JPG,a photo", "linked.jpg,another photo"]
    (w / "pairs.csv").write_text("\n".join(lines) + "\n")
    return sma(w, w / "pairs.csv", "--eval", "mscoco", "--dataset-root", w / "datasets"), {
        "refused": ["2 of the 6 training images are byte-for-byte copies of mscoco_captions test images"]}


def eval_captions_as_unpaired_texts(w):
    data = pairs_csv(w)
    (w / "texts.txt").write_text("a test caption 1\nsomething else\nmore\n")
    proc = run("sotalign.py", "--pairs", data, "--unpaired-images", data, "--unpaired-texts", w / "texts.txt", *ENC,
               "--steps", "2", "--paired-batch", "4", "--unpaired-batch", "2", "--dim", "8", "--no-compile",
               "--eval", "mscoco", "--dataset-root", w / "datasets", "--cache-dir", w / "cache", "--out", w / "out")
    return proc, {"refused": ["1 of the 3 training texts are mscoco_captions test captions"]}


def near_copy(w, test_image, name):
    """What img2dataset writes of a test image: resized and re-encoded as JPEG (other bytes, the same picture)."""
    Image.open(test_image).resize((128, 128), Image.BICUBIC).save(w / name, quality=75)
    return name


def resized_copy_of_a_test_image(w):
    test = sorted((w / "datasets" / "mscoco_captions" / "val2014").glob("*.jpg"))
    lines = ["image,caption"] + [f"{EMOJI}/images/noto/{p.name},caption {i}" for i, p in enumerate(
        sorted((EMOJI / "images" / "noto").glob("*.png"))[10:14])] + [f"{near_copy(w, test[0], 'b.jpg')},a photo"]
    (w / "pairs.csv").write_text("\n".join(lines) + "\n")
    return sma(w, w / "pairs.csv", "--eval", "mscoco", "--dataset-root", w / "datasets", *LITE0), {
        "refused": ["1 of the 5 training images are near copies of mscoco_captions test images", "b.jpg ~ "]}


def resized_copy_among_unpaired_images(w):
    data = pairs_csv(w)
    test = sorted((w / "datasets" / "mscoco_captions" / "val2014").glob("*.jpg"))
    (w / "images.csv").write_text(f"image\n{EMOJI}/images/noto/1f600.png\n{near_copy(w, test[1], 'c.jpg')}\n")
    (w / "texts.txt").write_text("something\nelse\n")
    proc = sotalign(w, data, "--unpaired-images", w / "images.csv", "--unpaired-texts", w / "texts.txt",
                    "--unpaired-batch", "2", "--eval", "mscoco", "--dataset-root", w / "datasets", *LITE0)
    return proc, {"refused": ["1 of the 2 training images are near copies of mscoco_captions test images"]}


ROWS = [truncated_jpeg, truncated_jpeg_skipped, not_an_image, tar_cut_at_a_member_edge, stats_disagree,
        index_json_damaged, stray_shard_and_stale_temporary, encoder_module_changed, image_replaced_keeping_mtime,
        colons_in_a_file_name, resume_with_other_ranks]
LEAK_ROWS = [renamed_copy_of_a_test_image, eval_captions_as_unpaired_texts]
NEAR_COPY_ROWS = [resized_copy_of_a_test_image, resized_copy_among_unpaired_images]  # caught after extraction


def check(proc, want, w):
    if "refused" in want:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        for says in want["refused"]:
            assert says in lines[0], (says, lines[0])
        if not want.get("out_kept"):
            assert not (w / "out").exists() or not any((w / "out").iterdir()), "a refused run wrote into --out"
    else:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
        for says in want["recovers"]:
            assert says in proc.stdout + proc.stderr, (says, proc.stdout[-2000:], proc.stderr[-2000:])
        if "same_heads" in want:
            now = heads(w / "out")
            assert all(torch.equal(now[k], want["same_heads"][k]) for k in now), "not the clean run's heads"


@pytest.mark.parametrize("mutation", ROWS, ids=[f.__name__ for f in ROWS])
def test_a_malformed_training_input_is_one_line_or_recovers(mutation, tmp_path):
    proc, want = mutation(tmp_path)
    check(proc, want, tmp_path)


@pytest.mark.parametrize("mutation", LEAK_ROWS, ids=[f.__name__ for f in LEAK_ROWS])
def test_a_leak_by_content_is_refused_before_any_compute(mutation, leak_root):
    proc, want = mutation(leak_root)
    check(proc, want, leak_root)
    assert not (leak_root / "cache").exists() or not list((leak_root / "cache").glob("s*-*")), "features computed"


@pytest.mark.parametrize("mutation", NEAR_COPY_ROWS, ids=[f.__name__ for f in NEAR_COPY_ROWS])
def test_a_near_copy_of_a_test_image_is_refused_before_training(mutation, leak_root):
    proc, want = mutation(leak_root)
    # the test split's features are embedded first, with their progress bar (the --eval run reads them back)
    bars = re.compile(r"^mscoco_captions images: +\d+%\|")
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if line.strip() and not bars.match(line))
    check(proc, want, leak_root)


@pytest.mark.parametrize("script", ["sma.py", "sotalign.py"])
def test_a_user_error_under_two_ranks_is_each_ranks_one_line(script, tmp_path):
    """--nproc-per-node 2 (torchrun's launcher in the script's process): a pairs file naming a missing image ends
    both ranks with their one line and exit status 2; no launcher traceback (ChildFailedError) follows."""
    data = pairs_csv(tmp_path)
    data.write_text(data.read_text() + "missing.png,a caption\n")
    proc = (sma if script == "sma.py" else sotalign)(tmp_path, data, "--nproc-per-node", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines and all(line.startswith("error: ") and "missing.png" in line for line in lines), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
