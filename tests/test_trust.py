"""Trust (issue 9): a run never loses or silently corrupts a result, and a user error is one clear line.

Every refused command below must exit with status 2, print one line on stderr that names the flag or the file and the
fix, print no traceback, and leave the --out folder of a finished run byte-identical (every file hashed). Unreadable
caches are recomputed with a warning. One finished run per script is built once for the module (tiny random encoders,
a few steps) and reused by the tests."""
import csv
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import plumbing
import sma
import sotalign

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text", "--dim", "16"]


def run(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def refused(proc, *names):
    """Status 2, one line on stderr naming each of `names`, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_pairs(path, n_entities):
    """The first n_entities of the emoji training set (1 to 6 captions each), absolute image paths."""
    seen = []
    with open(EMOJI / "train.csv") as f, open(path, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["image", "caption"])
        for image, caption in list(csv.reader(f))[1:]:
            if image not in seen and len(seen) < n_entities:
                seen.append(image)
            if image in seen:
                w.writerow([str(EMOJI / image), caption])
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run of each script (aligner.pt, checkpoint.pt, manifest.json; sotalign also teacher.pt), and the
    commands that made them."""
    root = tmp_path_factory.mktemp("trust")
    data, cache = write_pairs(root / "pairs.csv", 12), root / "cache"
    cmd = {"sma": ["sma.py", "--data", data, *TINY, "--hidden", "32", "--batch-size", "4", "--epochs", "2",
                   "--cache-dir", cache, "--out", root / "sma"],
           "sotalign": ["sotalign.py", "--pairs", data, *TINY, "--paired-batch", "4", "--steps", "3",
                        "--cache-dir", cache, "--out", root / "sotalign"]}
    for name, argv in cmd.items():
        proc = run(*argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (root / name / "aligner.pt").is_file() and (root / name / "manifest.json").is_file()
    return root, data, cache, cmd


def unchanged(folder, before):
    assert digest(folder) == before, f"{folder} changed"


# ---------------------------------------------------------------- results are never lost
@pytest.mark.parametrize("script, more, flag", [("sma", ["--epochs", "0"], "--epochs"),
                                                ("sotalign", ["--steps", "0", "--epochs", "0"], "--epochs")])
def test_zero_epochs_is_refused_at_parse_time_and_the_run_is_untouched(done, script, more, flag):
    root, _, _, cmd = done
    before = digest(root / script)
    refused(run(*cmd[script], *more), flag, ">= 1")
    unchanged(root / script, before)


@pytest.mark.parametrize("script", ["sma", "sotalign"])
def test_the_same_command_twice_is_refused_and_overwrite_is_the_explicit_way(done, script, tmp_path):
    root, _, _, cmd = done
    before = digest(root / script)
    refused(run(*cmd[script]), root / script, "finished run", "--overwrite")
    unchanged(root / script, before)
    copy = tmp_path / script
    shutil.copytree(root / script, copy)
    (copy / "eval.json").write_text("{}")  # scores of the replaced run must not stay beside the new aligner
    proc = run(*cmd[script][:-1], copy, "--overwrite", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(copy / "aligner.pt", weights_only=True)["args"]["seed"] == 1 and not (copy / "eval.json").exists()


@pytest.mark.parametrize("script, change", [("sma", ["--lr", "2e-3"]), ("sotalign", ["--teacher", "procrustes"])])
def test_a_refused_resume_rewrites_nothing(done, script, change):
    """Today's failure: the manifest (and sotalign's teacher.pt) were rewritten before the refusal."""
    root, _, _, cmd = done
    before = digest(root / script)
    line = refused(run(*cmd[script], "--resume", *change), root / script / "checkpoint.pt", change[0],
                   "another --out")
    assert "(now " in line
    unchanged(root / script, before)


@pytest.mark.parametrize("script", ["sma", "sotalign"])
def test_resume_on_a_truncated_checkpoint_names_it_and_rewrites_nothing(done, script, tmp_path):
    root, _, _, cmd = done
    copy = tmp_path / script
    shutil.copytree(root / script, copy)
    ckpt = copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    before = digest(copy)
    refused(run(*cmd[script][:-1], copy, "--resume"), ckpt, "cannot read", "start over")
    unchanged(copy, before)


def test_a_started_run_is_not_restarted_without_resume_or_overwrite(done, tmp_path):
    root, _, _, cmd = done
    copy = tmp_path / "started"
    copy.mkdir()
    shutil.copy(root / "sma" / "checkpoint.pt", copy)
    refused(run(*cmd["sma"][:-1], copy), "started run", "--resume")
    assert digest(copy).keys() == {"checkpoint.pt"}


def test_an_unknown_eval_task_is_refused_before_training(done, tmp_path):
    root, _, _, cmd = done
    refused(run(*cmd["sma"][:-1], tmp_path / "new", "--eval", "emjoi"), "unknown task 'emjoi'")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- caches: an unreadable one is recomputed
@pytest.mark.parametrize("script, pattern", [("sma", "sma-image-*/0*.npy"),
                                             ("sotalign", "sotalign-pairs-image-*/0*.npy")])
def test_a_truncated_feature_cache_is_recomputed_with_a_warning(done, script, pattern, tmp_path):
    root, _, cache, cmd = done
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    bad = next(copy.glob(pattern))
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    argv = [str(copy) if str(a) == str(cache) else a for a in cmd[script][:-1]]
    proc = run(*argv, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {bad}: damaged" in proc.stderr and "recomputing shard 0" in proc.stderr
    assert bad.read_bytes() == good  # the shard recomputed, bit for bit
    assert (tmp_path / "out" / "aligner.pt").is_file()


def test_unreadable_part_and_eval_cache_files_read_as_missing(tmp_path, capsys):
    part = tmp_path / "sma-x.image.part0of1.pt"
    part.write_bytes(b"\x80\x02 cut short")
    assert torch.equal(plumbing.read_cache(part, torch.zeros(0, 3)), torch.zeros(0, 3))
    assert f"cannot read the cache {part}" in capsys.readouterr().err
    assert evaluate.cached(part, lambda: torch.ones(2)).tolist() == [1, 1]  # evaluate's cache: recomputed, rewritten
    assert torch.load(part, weights_only=True).tolist() == [1, 1]


def test_atomic_save_leaves_no_temporary_file_when_the_write_fails(tmp_path):
    (tmp_path / "keep.pt").write_bytes(b"old")
    with pytest.raises(Exception):
        sma.atomic_save({"f": lambda: 0}, tmp_path / "keep.pt")  # a lambda cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"] and (tmp_path / "keep.pt").read_bytes() == b"old"


# ---------------------------------------------------------------- user errors: one line, status 2
@pytest.mark.parametrize("script, argv, names", [
    ("sma", ["--batch-size", "0"], ["--batch-size", ">= 2"]),
    ("sma", ["--batch-size", "1"], ["--batch-size", ">= 2"]),
    ("sma", ["--lr", "-1"], ["--lr", "> 0"]),
    ("sma", ["--eta", "-5"], ["--eta", "> 0"]),
    ("sma", ["--lr", "nan"], ["--lr"]),
    ("sma", ["--loss", "nope"], ["--loss", "flqmi"]),
    ("sma", ["--views", "0"], ["--views"]),
    ("sotalign", ["--unpaired-batch", "0"], ["--unpaired-batch", ">= 2"]),
    ("sotalign", ["--paired-batch", "0"], ["--paired-batch", ">= 2"]),
    ("sotalign", ["--eps", "-0.1"], ["--eps", "> 0"]),
    ("sotalign", ["--eps-teacher", "0"], ["--eps-teacher", "> 0"]),
    ("sotalign", ["--head-layers", "3"], ["--head-layers"]),
    ("sotalign", ["--unpaired-images", "x"], ["--unpaired-texts"]),
    ("evaluate", ["--aligner", "a.pt", "--batch-size", "0"], ["--batch-size"]),
    ("evaluate", ["--tasks", "emoji"], ["--aligner"]),
])
def test_bad_flags_are_refused_at_parse_time_in_one_line(script, argv, names, capsys):
    module = {"sma": sma, "sotalign": sotalign, "evaluate": evaluate}[script]
    required = {"sma": ["--data", "x.csv"], "sotalign": ["--pairs", "x.csv"], "evaluate": []}[script]
    with pytest.raises(SystemExit) as stop:
        module.parse_args(required + argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "--help" in err, err
    assert all(n in err for n in names), err


@pytest.mark.parametrize("script, flag", [("sma.py", "--data"), ("sotalign.py", "--pairs")])
def test_a_missing_required_flag_is_one_line_on_the_command_line(script, flag):
    refused(run(script), flag, "required")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(done):
    root, data, _, _ = done
    refused(run("sma.py", "--data", data, "--device", "cuda"), "--device", "no CUDA GPU", "--device cpu")


@pytest.mark.parametrize("script", ["sma", "sotalign"])
def test_bad_data_is_one_line_naming_file_row_and_fix(script, tmp_path):
    bad = tmp_path / "bad.csv"
    noto = EMOJI / "images" / "noto"
    bad.write_text(f"image,caption\n{noto / '1f34e.png'},an apple\n{noto / '1f34f.png'},\n")
    refused(run(f"{script}.py", "--data" if script == "sma" else "--pairs", bad, "--out", tmp_path / "out"),
            f"{bad}, row 3: empty caption", "--skip-bad-rows")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_an_out_or_cache_folder_that_is_a_file_or_read_only_is_refused_first(done, flag, tmp_path):
    root, data, _, _ = done
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for where in (a_file, a_file / "sub", Path("/proc/trust_test")):  # /proc: read-only even for root
        refused(run("sma.py", "--data", data, *TINY, flag, where, *(["--out", tmp_path / "o"] if flag != "--out"
                                                                    else [])), flag, where, "writable folder")
    assert a_file.read_text() == "not a folder" and not (tmp_path / "o").exists()


def test_data_that_cannot_train_is_refused_with_the_reason(tmp_path):
    one = write_pairs(tmp_path / "one.csv", 1)
    refused(run("sma.py", "--data", one, *TINY, "--out", tmp_path / "a"), one, "1 entity", "at least 2")
    refused(run("sotalign.py", "--pairs", one, *TINY, "--out", tmp_path / "b"), "--pairs", "1 entity", "at least 2")
    texts = tmp_path / "t.txt"
    texts.write_text("just one text\n")
    two = write_pairs(tmp_path / "two.csv", 2)
    refused(run("sotalign.py", "--pairs", two, "--unpaired-images", two, "--unpaired-texts", texts, *TINY, "--out",
                tmp_path / "c"), "--unpaired-texts", "1 item")
    assert not any((tmp_path / d).exists() for d in "abc")


# ---------------------------------------------------------------- evaluate.py
def test_evaluate_csv_tasks_take_the_training_flags_and_a_bad_task_keeps_the_others(done, tmp_path):
    root, data, cache, _ = done
    bad = tmp_path / "bad.csv"
    rows = data.read_text().splitlines()
    bad.write_text("\n".join(rows[:4] + [rows[4].split(",")[0] + ","] + rows[5:]) + "\n")  # row 5: empty caption
    tsv = tmp_path / "renamed.tsv"
    tsv.write_text("\n".join(r.replace(",", "\t", 1) for r in ["img,text"] + rows[1:]) + "\n")
    out = tmp_path / "eval.json"
    argv = ["--aligner", root / "sma" / "aligner.pt", "--cache-dir", cache, "--output", out, "--workers", "0"]
    proc = run("evaluate.py", *argv, "--tasks", f"csv:{bad},csv:{tmp_path / 'missing.csv'},csv:{data}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert "metrics" in results[2] and "metrics" not in results[0] and "metrics" not in results[1]
    assert f"{bad}, row 5: empty caption" in results[0]["skipped"] and "--skip-bad-rows" in results[0]["skipped"]
    assert "missing.csv" in results[1]["skipped"]
    proc = run("evaluate.py", *argv, "--tasks", f"csv:{bad},csv:{tsv}", "--skip-bad-rows", "--image-key", "img",
               "--caption-key", "text", "--sep", "\t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [("metrics" in r) for r in json.loads(out.read_text())["results"]] == [False, True]  # csv:bad: no column
    proc = run("evaluate.py", *argv, "--tasks", f"csv:{bad}", "--skip-bad-rows")
    assert proc.returncode == 0 and "skipped 1 bad rows" in proc.stdout, proc.stderr[-3000:]


def test_evaluate_user_errors_are_one_line(done, tmp_path):
    root, _, _, _ = done
    refused(run("evaluate.py", "--aligner", tmp_path / "nope.pt", "--tasks", "emoji", "--cache-dir", tmp_path),
            tmp_path / "nope.pt", "aligner.pt")
    refused(run("evaluate.py", "--aligner", root / "sma" / "checkpoint.pt", "--cache-dir", tmp_path), "not an aligner")
    refused(run("evaluate.py", "--aligner", root / "sma" / "aligner.pt", "--tasks", "nope", "--cache-dir", tmp_path),
            "unknown task 'nope'")


# ---------------------------------------------------------------- long captions
def test_captions_longer_than_the_token_limit_are_counted_once(capsys):
    enc = sma.load_encoder("py:tiny_encoders:text", "text")
    enc.encode(["short", "word " * 300, "also short"])
    enc.encode(["word " * 200])
    assert capsys.readouterr().err == ""  # said once, when the run is done with the encoder
    del enc
    gc.collect()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 4 texts were longer than 128 tokens" in err[0], err


# ---------------------------------------------------------------- --help
@pytest.mark.parametrize("script, required", [("sma", {"--data"}), ("sotalign", {"--pairs"}), ("evaluate", set())])
def test_help_shows_one_default_per_flag_and_marks_the_required_ones(script, required, capsys):
    module = {"sma": sma, "sotalign": sotalign, "evaluate": evaluate}[script]
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    entries, flags = {}, {"--" + f.name.replace("_", "-") for f in dataclasses.fields(module.Args)}
    for line in options.splitlines()[1:]:
        first = line.strip().split(" ")[0].rstrip(",")
        if line.startswith("  --"):
            current = first
            entries[current] = line
        elif line.startswith("  -h"):
            current = None
        elif current:
            entries[current] += " " + line.strip()
    assert set(entries) == flags
    for flag, entry in entries.items():
        entry = " ".join(entry.split())
        bool_flag = entry.startswith(f"{flag}, --no-")
        if flag in required:
            assert entry.count("(required)") == 1 and "default" not in entry, entry
        else:
            assert entry.count("(default") == 1 and "True:" not in entry, entry
        assert bool_flag == isinstance(next(f.default for f in dataclasses.fields(module.Args)
                                            if "--" + f.name.replace("_", "-") == flag), bool), entry
    usage = " ".join(text[:text.index("options:")].split())
    for flag in required:
        assert f"[{flag} " not in usage and flag in usage  # argparse: required, so not in brackets
