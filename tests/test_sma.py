"""SMA's mechanics: the feature cache (reuse, invalidation, resumed extraction), the data plan, checkpoint resume to
identical weights, the NaN stop, 2-process DDP against 1 process, and the real command end to end on the example
data (then --resume, then evaluate.py on the export). Tiny random encoders wherever real ones are not the point."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import plumbing
import sma

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sma_cache")


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    """The first 24 entities of the emoji training set (1 to 6 captions each), with absolute image paths."""
    path, seen = tmp_path_factory.mktemp("sma_data") / "pairs.csv", []
    with open(EMOJI / "train.csv") as f, open(path, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["image", "caption"])
        for image, caption in list(csv.reader(f))[1:]:
            if image not in seen and len(seen) < 24:
                seen.append(image)
            if image in seen:
                w.writerow([str(EMOJI / image), caption])
    return path


def argv(csv_path, cache_dir, out, *more):
    return ["--data", str(csv_path), *TINY, "--cache-dir", str(cache_dir), "--out", str(out), "--dim", "32",
            "--hidden", "64", "--batch-size", "8", "--epochs", "4", "--log-every", "1", "--lr", "1e-3", *more]


def final_state(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


# ---------------------------------------------------------------- feature cache
def test_cache_is_reused_and_invalidated_by_a_changed_input(tiny_csv, cache_dir, tmp_path, monkeypatch):
    args = sma.parse_args(argv(tiny_csv, cache_dir, tmp_path))
    pairs = sma.read_pairs(args.data)
    first = sma.features(pairs, args)
    assert first["image"].shape == (24, 2, 128) and len(first["text"]) == first["counts"].sum()
    monkeypatch.setattr(sma, "load_encoder", lambda *a: pytest.fail("cache miss: an encoder was loaded"))
    assert torch.equal(sma.features(pairs, args)["image"].tensor(), first["image"].tensor())  # reused
    key, text_key = sma.cache_key(pairs, args, "image"), sma.cache_key(pairs, args, "text")
    for change in (dict(views=3), dict(aug_seed=1), dict(image_encoder="timm-random:other")):
        assert sma.cache_key(pairs, sma.Args(**{**vars(args), **change}), "image") != key, change
    assert sma.cache_key(pairs, sma.Args(**{**vars(args), "text_encoder": "py:x:y"}), "text") != text_key
    data = tmp_path / "pairs.csv"  # one caption more, and one image file rewritten
    data.write_text(tiny_csv.read_text() + f"{pairs.images[0]},one more caption\n")
    assert sma.cache_key(sma.read_pairs(data), args, "text") != text_key
    image = tmp_path / "copy.png"
    shutil.copy(pairs.images[0], image)
    data.write_text(tiny_csv.read_text().replace(pairs.images[0], str(image)))
    key2 = sma.cache_key(sma.read_pairs(data), args, "image")
    image.write_bytes(Path(pairs.images[1]).read_bytes())
    assert sma.cache_key(sma.read_pairs(data), args, "image") != key2


def test_depictions_make_the_image_set_of_an_entity(tiny_csv, cache_dir, tmp_path):
    """--depictions: an entity's views are its drawings by several artists (clean), then augmentations of them in
    turn; the entities without a listed depiction keep view 0 clean + augmented views; a bad row is one DataError."""
    pairs = sma.read_pairs(tiny_csv)
    rows = {r["image"]: [] for r in csv.DictReader(open(EMOJI / "depictions.csv"))}
    for r in csv.DictReader(open(EMOJI / "depictions.csv")):
        rows[r["image"]].append(r["depiction"])
    first = pairs.images[0]
    others = [str(EMOJI / d) for d in rows[str(Path(first).relative_to(EMOJI))]]  # twemoji, fluent
    dep = tmp_path / "depictions.csv"
    dep.write_text("image,depiction\n" + "".join(f"{first},{d}\n" for d in others))
    K3 = sma.features(pairs, sma.parse_args(argv(tiny_csv, cache_dir, tmp_path, "--views", "3", "--depictions",
                                                 str(dep))))
    assert K3["image"].shape == (24, 3, 128)
    K3 = {"image": K3["image"].tensor().float()}  # the store's float16 rows
    enc = sma.load_encoder("timm-random:test_vit", "image", "cpu")
    clean = [enc.encode(enc.transform(sma.open_image(p).convert("RGB"))[None])[0] for p in [first, *others]]
    for k in range(3):  # entity 0: its three artists' drawings, each clean
        assert torch.allclose(K3["image"][0, k], clean[k], rtol=2e-3, atol=1e-3)  # float16 storage
    plain = sma.features(pairs, sma.parse_args(argv(tiny_csv, cache_dir, tmp_path, "--views", "3")))
    plain = {"image": plain["image"].tensor().float()}
    assert torch.equal(K3["image"][1:], plain["image"][1:])  # the others: unchanged (clean + 2 augmented views)
    assert not torch.allclose(plain["image"][0, 1], clean[1], atol=1e-3)
    dep.write_text("image,depiction\nnot-an-entity.png," + others[0] + "\n")
    with pytest.raises(sma.DataError, match="row 2: image 'not-an-entity.png' is no entity's image"):
        sma.image_sets(pairs, str(dep))


def test_interrupted_extraction_resumes_where_it_stopped(tiny_csv, tmp_path, monkeypatch):
    args = sma.parse_args(argv(tiny_csv, tmp_path / "cache", tmp_path) + ["--extract-batch-size", "8"])
    pairs = sma.read_pairs(args.data)
    load, calls = sma.load_encoder, []

    def counting(fail_after):
        def loader(spec, modality, device):
            enc = load(spec, modality, device)
            forward = enc.forward

            def counted(batch):
                calls.append(modality)
                if modality == "image" and calls.count("image") > fail_after:
                    raise KeyboardInterrupt("simulated kill")
                return forward(batch)
            enc.forward = counted
            return enc
        return loader
    monkeypatch.setattr(plumbing, "SHARD_ROWS", 8)  # 24 entities: 3 shards of 2 batches of 4 images (8 views)
    monkeypatch.setattr(sma, "load_encoder", counting(fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        sma.features(pairs, args)
    assert len(list((tmp_path / "cache").glob("sma-image-*/0*.npy"))) == 1  # the shard in flight is lost
    calls.clear()
    monkeypatch.setattr(sma, "load_encoder", counting(fail_after=99))
    resumed = sma.features(pairs, args)
    assert calls.count("image") == 4  # only the 2 missing shards
    assert not list((tmp_path / "cache").rglob(".*.tmp*"))
    monkeypatch.setattr(sma, "load_encoder", load)
    fresh = sma.features(pairs, sma.Args(**{**vars(args), "cache_dir": str(tmp_path / "fresh")}))
    assert torch.equal(resumed["image"].tensor(), fresh["image"].tensor())  # bit-identical to an uncut extraction


def test_batch_plan_samples_captions_without_truncating_and_is_a_function_of_seed_and_step():
    counts = torch.tensor([6, 1, 3, 5, 6, 2])
    mask = torch.arange(6) < counts[:, None]
    plans = [sma.batch_plan(step, 0, 6, 3, 5, 2, mask) for step in range(40)]
    used = {}
    for ent, slots, pick_v, pick_t in plans:
        real = mask[ent[:, None], slots]  # (B, M)
        assert torch.equal(real.sum(1), counts[ent].clamp(max=5))  # at most M real captions, real ones first
        assert torch.equal(real, real.sort(1, descending=True).values)
        assert (pick_t < real.sum(1)).all() and (pick_v < 2).all()
        for e, row, r in zip(ent.tolist(), slots.tolist(), real.tolist()):
            assert len(set(row)) == len(row)
            used.setdefault(e, set()).update(s for s, ok in zip(row, r) if ok)
    assert used[0] == set(range(6)) and used[4] == set(range(6))  # every caption is drawn over the steps
    again = sma.batch_plan(17, 0, 6, 3, 5, 2, mask)
    assert all(torch.equal(a, b) for a, b in zip(again, plans[17]))
    epoch = torch.cat([plans[0][0], plans[1][0]])
    assert sorted(epoch.tolist()) == list(range(6))  # one epoch sees each entity once


# ---------------------------------------------------------------- checkpoints
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_csv, cache_dir, tmp_path, capsys):
    sma.main(argv(tiny_csv, cache_dir, tmp_path / "full", "--ckpt-every", "3"))
    sma.main(argv(tiny_csv, cache_dir, tmp_path / "cut", "--ckpt-every", "3", "--stop-after-steps", "8"))
    assert final_state(tmp_path / "cut")["step"] == 6 and not (tmp_path / "cut" / "aligner.pt").exists()
    sma.main(argv(tiny_csv, cache_dir, tmp_path / "cut", "--ckpt-every", "3", "--resume"))
    assert "resumed" in capsys.readouterr().out
    full, cut = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    assert full["step"] == cut["step"] == 12
    for k, v in full["model"].items():
        assert torch.allclose(v, cut["model"][k], rtol=0, atol=1e-6), k
    a = torch.load(tmp_path / "cut" / "aligner.pt", weights_only=True)
    assert a["format"] == "aligner/1" and a["method"] == "sma" and a["image_head"]["in_dim"] == 128
    head = evaluate.head_from_state(a["text_head"])
    assert torch.equal(head.state_dict()["0.weight"], cut["model"]["text_head.0.weight"])
    with pytest.raises(sma.DataError, match=r"--lr 0\.001 \(now 0\.002\)"):
        sma.main(argv(tiny_csv, cache_dir, tmp_path / "cut", "--resume", "--lr", "2e-3"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_csv, cache_dir, tmp_path, monkeypatch):
    calls, flqmi = [], sma.flqmi

    def poisoned(*a, **k):
        calls.append(1)
        loss, parts = flqmi(*a, **k)
        return (loss * float("nan") if len(calls) == 5 else loss), parts
    monkeypatch.setitem(sma.SET_LOSSES, "flqmi", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss nan .* at step 5; .*step 4\)"):
        sma.main(argv(tiny_csv, cache_dir, tmp_path, "--ckpt-every", "2"))
    state = final_state(tmp_path)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "aligner.pt").exists()


# ---------------------------------------------------------------- two processes
def losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([\d.]+)", stdout, re.M)]


def test_two_processes_give_the_same_losses_and_weights_as_one(tiny_csv, cache_dir, tmp_path):
    """torchrun (gloo): features sharded and gathered, heads under DDP, embeddings gathered for the set loss."""
    one = subprocess.run([sys.executable, "sma.py", *argv(tiny_csv, cache_dir, tmp_path / "one")], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sma.py",
                          *argv(tiny_csv, tmp_path / "cache2", tmp_path / "two")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "features: 48 images" in two.stdout  # extracted by the two ranks, not read from the cache
    key = sma.cache_key(sma.read_pairs(tiny_csv), sma.parse_args(argv(tiny_csv, cache_dir, tmp_path)), "image")
    cached = [plumbing.Store(d / f"sma-image-{key}").tensor() for d in (cache_dir, tmp_path / "cache2")]
    assert torch.equal(cached[0], cached[1])  # shard j is encoded in the same batches whichever rank encodes it
    l1, l2 = losses(one.stdout), losses(two.stdout)
    assert len(l1) == len(l2) == 12 and l1 == pytest.approx(l2, abs=2e-4)  # printed with 4 decimals
    a, b = final_state(tmp_path / "one")["model"], final_state(tmp_path / "two")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


# ---------------------------------------------------------------- end to end
def test_real_command_on_the_example_data_then_resume_then_evaluate(cache_dir, tmp_path):
    """`python sma.py --data examples/emoji/train.csv ...` (tiny encoders, a few steps), cut short, resumed with
    --eval emoji, and its export evaluated again by evaluate.py."""
    command = [sys.executable, "sma.py", "--data", "examples/emoji/train.csv", *TINY, "--cache-dir", str(cache_dir),
               "--out", str(tmp_path), "--epochs", "3", "--batch-size", "256", "--dim", "64", "--hidden", "128",
               "--ckpt-every", "4"]
    cut = subprocess.run(command + ["--stop-after-steps", "5"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "945 entities" in cut.stdout and "stopping after step 5" in cut.stdout
    has_evaluate = (ROOT / "evaluate.py").is_file()
    resumed = subprocess.run(command + ["--resume"] + (["--eval", "emoji"] if has_evaluate else []), cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and "step 9/9" in resumed.stdout
    tail = resumed.stdout.strip().splitlines()[-1]
    assert tail.startswith("sma flqmi | seed 0 | 9 steps | final loss"), tail
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["args"]["loss"] == "flqmi" and manifest["versions"]["torch"] and manifest["metrics"]["step"] == 9
    if not has_evaluate:
        pytest.skip("evaluate.py is not there yet: training, resume and export checked, evaluation not")
    assert "R@1" in tail and "acc1" in tail
    ev = subprocess.run([sys.executable, "evaluate.py", "--aligner", str(tmp_path / "aligner.pt"), "--tasks",
                         "emoji", "--output", str(tmp_path / "again.json"), "--cache-dir", str(cache_dir)],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    first, again = (json.loads((tmp_path / n).read_text()) for n in ("eval.json", "again.json"))
    assert {r["dataset"] for r in again["results"]} == {"emoji_zeroshot", "emoji_retrieval"}
    assert [r["metrics"] for r in first["results"]] == [r["metrics"] for r in again["results"]]


def test_tau_sets_the_initial_temperature_and_fixed_tau_keeps_it(tmp_path):
    """--tau is the initial tau = 1 / logit scale; --fixed-tau: not learned (sweep.py selects it instead)."""
    g = torch.Generator().manual_seed(0)
    feats = {"image": torch.randn(16, 2, 8, generator=g), "text": torch.randn(32, 6, generator=g),
             "counts": torch.full((16,), 2)}
    for tau0, fixed in ((0.2, True), (0.2, False), (0.005, True)):  # a fixed tau below CLIP's clamp stays too
        args = sma.Args(data="-", loss="infonce", tau=tau0, fixed_tau=fixed, dim=4, hidden=8, epochs=3, batch_size=8,
                        lr=1e-2, out=str(tmp_path), device="cpu", log_every=10 ** 9, ckpt_every=10 ** 9)
        assert 1 / sma.Heads(8, 6, args).logit_scale.exp().item() == pytest.approx(tau0)
        model, _ = sma.train(args, feats, 0, 1, "cpu", log=lambda *a: None)
        tau = 1 / model.logit_scale.exp().item()
        assert tau == pytest.approx(tau0) if fixed else abs(tau - tau0) > 1e-3
    assert 1 / sma.Heads(8, 6, sma.Args(loss="siglip")).logit_scale.exp().item() == pytest.approx(0.05)  # default
