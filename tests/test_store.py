"""The feature store (plumbing.extract / Store) and the data formats at scale: a SIGKILL mid-extraction loses at most
the shard in flight and the resumed store is bit-identical to an uncut one; a killed rank leaves the other ranks'
shards usable; a damaged shard is detected and recomputed; keys are exact; a full disk is one line; both scripts
train from webdataset tar shards (tests/data/tars: 12 emoji samples, one captioned by .json); a train/test leak is
refused before any compute. Stand-in encoders (tests/store_encoders.py), a few seconds each but for torchrun."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plumbing
import sotalign as so
from plumbing import DataError

ROOT = Path(__file__).resolve().parents[1]
TARS = ROOT / "tests" / "data" / "tars"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TEXTS = [f"text {i}" for i in range(20)]
CHILD = str(ROOT / "tests" / "store_encoders.py")  # extracts TEXTS into a store, 5 shards of 2 batches


def shards(cache):
    return {p.name: p.stat().st_mtime_ns for p in Path(cache).rglob("0*.npy")}


def store(cache) -> torch.Tensor:
    return plumbing.Store(next(Path(cache).glob("sotalign-unpaired-text-*"))).tensor()


def extract(cache, *prefix, **env):
    return subprocess.run([*prefix, CHILD, str(cache)], cwd=ROOT, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def uncut(tmp_path_factory):
    cache = tmp_path_factory.mktemp("uncut")
    assert extract(cache, sys.executable).returncode == 0
    return store(cache)


def test_sigkill_mid_extraction_loses_one_shard_and_the_resumed_store_is_bit_identical(tmp_path, uncut):
    cut = extract(tmp_path, sys.executable, STORE_KILL_AFTER="5")  # killed during the 6th batch: shard 2's second
    assert cut.returncode == -signal.SIGKILL
    before = shards(tmp_path)
    assert len(before) == 2 and not list(tmp_path.rglob("index.json"))  # shards 0 and 1; no index yet
    assert extract(tmp_path, sys.executable).returncode == 0
    after = shards(tmp_path)
    assert len(after) == 5 and all(after[name] == t for name, t in before.items())  # kept, not rewritten
    assert torch.equal(store(tmp_path), uncut) and store(tmp_path).dtype == torch.float16


def test_a_killed_rank_leaves_the_other_ranks_shards_usable(tmp_path, uncut):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611")
    cut = extract(tmp_path, *torchrun, STORE_KILL_AFTER="3", STORE_KILL_RANK="1", STORE_SLEEP="0.5")
    assert cut.returncode != 0
    before = shards(tmp_path)
    assert {"000000", "000001"} <= {name[:6] for name in before}  # rank 0's first, rank 1's first
    assert extract(tmp_path, sys.executable).returncode == 0  # any number of ranks continues it
    after = shards(tmp_path)
    assert all(after[name] == t for name, t in before.items()) and torch.equal(store(tmp_path), uncut)


def test_a_damaged_shard_is_detected_and_recomputed(tmp_path, monkeypatch, capsys):
    """A shard cut short is found by every run (its size), one with changed bytes by --verify-cache (its CRC)."""
    monkeypatch.setattr(plumbing, "SHARD_ROWS", 4)
    enc, calls = plumbing.load_encoder("py:store_encoders:text", "text"), []

    def load():
        def encode(batch):
            calls.append(len(batch))
            return enc.encode(batch)
        return TEXTS[:12], encode
    first = plumbing.extract(tmp_path, 12, load, 2).tensor()
    one, two = sorted(tmp_path.glob("00000[12]-*.npy"))
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last feature
    one.write_bytes(bytes(data))
    two.write_bytes(two.read_bytes()[:-10])  # and one cut short
    calls.clear()
    again = plumbing.extract(tmp_path, 12, load, 2)  # a cache hit reads headers and sizes: the cut shard is found
    assert calls == [2] * 2 and capsys.readouterr().err.count("recomputing shard 2") == 1
    calls.clear()
    again = plumbing.extract(tmp_path, 12, load, 2, verify=True)  # --verify-cache: every CRC, so the flip too
    assert calls == [2] * 2 and torch.equal(again.tensor(), first)  # that shard, and nothing else
    assert capsys.readouterr().err.count("recomputing shard 1") == 1
    calls.clear()
    assert torch.equal(plumbing.extract(tmp_path, 12, load, 2)[torch.tensor([11, 0, 5])], first[[11, 0, 5]])
    assert calls == []  # read, not recomputed


def test_store_keys_are_exact(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)
    tar = str(TARS / "00000.tar")
    refs = plumbing.read_tars(tar).images
    keys = {plumbing.store_key(["spec"], "text", ["a", "b"]), plumbing.store_key(["spec"], "text", ["ab"]),
            plumbing.store_key(["spec"], "text", ["a", "b", ""]), plumbing.store_key(["other"], "text", ["a", "b"]),
            plumbing.store_key(["spec"], "image", [str(image)]), plumbing.store_key(["spec"], "image", refs)}
    assert len(keys) == 6
    key = plumbing.store_key(["spec"], "image", [str(image)])
    os.utime(image, ns=(0, 12345))  # same path, another mtime: another key
    assert plumbing.store_key(["spec"], "image", [str(image)]) != key


def test_a_full_disk_is_one_line_naming_the_path_what_was_kept_and_the_fix(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    plumbing.atomic_save({"step": 1}, target)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DataError, match=r"checkpoint.pt: No space left on device .* kept: .* Free space"):
        plumbing.atomic_save({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1} and len(list(tmp_path.iterdir())) == 1
    # the same through a script: one line on stderr, exit status 2, during the first shard write
    code = ("import errno, os, runpy, sys\n"
            "def full(fd):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "os.fsync = full\nsys.argv = sys.argv[1:]\nrunpy.run_path('sotalign.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, "sotalign.py", "--pairs", "examples/emoji/sotalign_pairs.csv",
                           "--image-encoder", "py:store_encoders:image", "--text-encoder", "py:store_encoders:text",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--steps", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "kept: the complete shards in" in lines[0] and not list((tmp_path / "cache").rglob(".*tmp*"))


def test_tar_shards_brace_patterns_and_json_captions():
    assert plumbing.expand_braces("a/{00008..00010}.tar") == ["a/00008.tar", "a/00009.tar", "a/00010.tar"]
    assert plumbing.expand_braces("{x,y}/{1..2}.tar") == ["x/1.tar", "x/2.tar", "y/1.tar", "y/2.tar"]
    pairs = plumbing.read_pairs(str(TARS / "{00000..00001}.tar"))
    assert len(pairs.images) == 12 and pairs.captions[0] == ["cyclone"] and all(len(c) == 1 for c in pairs.captions)
    with plumbing.open_image(pairs.images[5]) as im:  # its caption came from its .json
        assert im.format == "JPEG" and im.size == (96, 96)
    with pytest.raises(DataError, match="tar shard not found"):
        plumbing.read_pairs(str(TARS / "{00000..00002}.tar"))


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_both_scripts_train_from_tar_shards(tmp_path):
    tars = str(TARS / "{00000..00001}.tar")
    enc = ["--image-encoder", "py:store_encoders:image", "--text-encoder", "py:store_encoders:text"]
    sma = run("sma.py", "--data", tars, *enc, "--epochs", "2", "--batch-size", "4", "--dim", "8", "--hidden", "16",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "sma"))
    assert sma.returncode == 0 and "12 entities, 12 captions" in sma.stdout, sma.stderr[-2000:]
    assert (tmp_path / "sma" / "aligner.pt").is_file()
    so_run = run("sotalign.py", "--pairs", str(TARS / "00000.tar"), "--unpaired-from", tars, *enc, "--steps", "3",
                 "--paired-batch", "4", "--unpaired-batch", "2", "--dim", "8", "--no-compile",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "so"))
    assert so_run.returncode == 0, so_run.stderr[-2000:]
    assert "6 entities, 6 captions; unpaired: 3 images, 3 texts" in so_run.stdout  # the other tar, halved
    assert (tmp_path / "so" / "aligner.pt").is_file()


def test_unpaired_halves_are_disjoint_and_skip_the_pairs():
    source = plumbing.read_pairs(str(TARS / "{00000..00001}.tar"))
    images, texts = so.halves(source, source.images[:2])
    assert len(images) == len(texts) == 5
    owner = {c[0]: image for image, c in zip(source.images, source.captions)}
    assert not {owner[t] for t in texts} & set(images) and not set(images) & set(source.images[:2])


@pytest.fixture
def coco_root(tmp_path):
    """A dataset root whose Karpathy MSCOCO test split holds 2 images, and a train2017-style pairs file of 4 images,
    2 of them the same COCO ids."""
    emoji = sorted((ROOT / "examples" / "emoji" / "images" / "noto").glob("*.png"))
    split = tmp_path / "datasets" / "mscoco_captions"
    (split / "val2014").mkdir(parents=True)
    (tmp_path / "train2017").mkdir()
    images, notes, rows = [], [], ["image,caption"]
    for i in range(4):
        name = f"{i + 1:012d}.jpg"
        Image.open(emoji[i]).convert("RGB").save(tmp_path / "train2017" / name)
        rows.append(f"train2017/{name},caption {i}")
        if i < 2:
            Image.open(emoji[i]).convert("RGB").save(split / "val2014" / f"COCO_val2014_{name}")
            images.append({"id": i + 1, "file_name": f"COCO_val2014_{name}"})
            notes.append({"id": i, "image_id": i + 1, "caption": f"caption {i}"})
    (split / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": notes}))
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.mark.parametrize("script", ["sma.py", "sotalign.py"])
def test_a_train_test_leak_is_refused_before_any_compute(coco_root, script):
    data = ["--data" if script == "sma.py" else "--pairs", str(coco_root / "pairs.csv")]
    common = [*data, "--image-encoder", "py:store_encoders:image", "--text-encoder", "py:store_encoders:text",
              "--eval", "mscoco", "--dataset-root", str(coco_root / "datasets"), "--cache-dir",
              str(coco_root / "cache"), "--out", str(coco_root / "run")]
    refused = run(script, *common)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "2 of the 4 training images are mscoco_captions test images" in refused.stderr
    assert "--exclude " + str(coco_root / "datasets" / "mscoco_captions" / "coco_test_karpathy.json") in refused.stderr
    assert not (coco_root / "cache").exists() and not (coco_root / "run").exists()  # nothing computed or written
    split = coco_root / "datasets" / "mscoco_captions" / "coco_test_karpathy.json"
    cut = run(script, *common, "--exclude", str(split), "--stop-after-steps", "1",
              "--near-copy-cosine", "1")  # stand-in encoders: features say nothing of content
    assert cut.returncode == 0 and "2 entities" in cut.stdout, cut.stderr[-2000:]
