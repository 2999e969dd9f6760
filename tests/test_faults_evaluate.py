"""A fault generator for evaluate.py (issue 25): a TABLE of mutations of its inputs (folder: and csv: tasks, the
CLIP-benchmark layouts of test_evaluate_faults.py, templates, class names, captions, --output, the feature cache,
the aligner), each applied to a fresh copy of a clean world and run through the real entry point (evaluate.cli;
the command itself in a subprocess for a FIFO and for open_clip weights that cannot be downloaded). Every row
asserts: one line, no traceback, the exit status, nothing earlier lost (every file that was there is unchanged, the
clean task beside the damaged one scores as in a clean run) and, where evaluate.py recovers, the clean numbers.
A new fault kind is a new row. Tiny deterministic encoders (test_evaluate_faults.tiny) keep the module fast."""
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
import evaluate as ev  # noqa: E402
from plumbing import atomic_save, head_state, make_head  # noqa: E402
from test_evaluate_faults import jpg, make_sets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = "py:test_evaluate_faults:tiny"
BENCH = tuple(ev.CLIP14)  # the CLIP-benchmark layouts (test_evaluate_faults.make_sets), each a victim below


# ---------------------------------------------------------------------------- the clean world
def make_world(w: Path):
    """w/folder (a folder: task, 3 classes, templates.txt), w/pairs (a csv: task, 3 images x 2 captions),
    w/datasets/<each clip14 set> (test_evaluate_faults' tiny real layouts), w/aligner.pt."""
    for c, name in enumerate(("red_car", "blue_bus", "green_tree")):
        for k in range(2):
            jpg(w / "folder" / name / f"{k}.jpg", 3 * c + k)
    (w / "folder" / "templates.txt").write_text("a photo of a {}.\n{} in a picture\n")
    rows = ["image,caption"]
    for k in range(3):
        jpg(w / "pairs" / "images" / f"{k}.jpg", 5 + k)
        rows += [f"images/{k}.jpg,thing number {k}", f"images/{k}.jpg,another view {k}"]
    (w / "pairs" / "pairs.csv").write_text("\n".join(rows) + "\n")
    sizes = make_sets(w / "datasets")
    torch.manual_seed(0)
    ckpt = {"format": "aligner/1", "method": "test", "image_encoder": SPEC, "text_encoder": SPEC, "args": {},
            "metrics": {}, "logit_scale": 10.0, "logit_bias": None}
    for m, dim in (("image", 192), ("text", 256)):
        ckpt[f"{m}_head"] = head_state(make_head("mlp", dim, 16), "mlp", dim, 16)
    atomic_save(ckpt, w / "aligner.pt")
    return {n: sizes[n] for n in BENCH}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    return w, make_world(w)


def tiny_sets(sizes, mp):
    """The benchmark tasks' known sizes set to the fixture's (6 captions per retrieval set), torchvision's md5
    checks reduced to "the file exists" (as test_evaluate_faults' `sets`)."""
    import torchvision.datasets as tvd
    for name, count in sizes.items():
        task = ev.TASKS[name]
        mp.setitem(ev.TASKS, name, dataclasses.replace(task, n_images=count, n_texts=6 if task.n_texts else 0))
    for module in (tvd.cifar, tvd.stl10, tvd.flowers102):
        mp.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def bench_sizes(pristine, monkeypatch):
    tiny_sets(pristine[1], monkeypatch)


@pytest.fixture
def alarm():
    """A hang (a FIFO read) fails the row after 60 s instead of stalling the suite."""
    def fail(*_):
        raise TimeoutError("evaluate.py hung")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def task_spec(victim, w):
    return {"folder": f"folder:{w / 'folder'}", "csv": f"csv:{w / 'pairs' / 'pairs.csv'}"}.get(victim, victim)


def run(w, victim, flags=(), output=None, beside=""):
    """evaluate.cli on `victim`, then the task `beside` if given -> (status, the JSON it wrote or None)."""
    tasks = task_spec(victim, w) + (f",{beside}" if beside else "")
    argv = ["--aligner", str(w / "aligner.pt"), "--tasks", tasks, "--dataset-root", str(w / "datasets"),
            "--cache-dir", str(w / "cache"), "--output", str(output or w / "eval.json"), "--workers", "0",
            "--device", "cpu", *flags]
    status = ev.cli(argv)
    out = Path(output or w / "eval.json")
    try:  # never opened unless a regular file: a FIFO --output would block this read
        return status, json.loads(out.read_text()) if out.is_file() else None
    except ValueError:  # a refused --output that holds something else
        return status, None


def witness(src):
    """The clean task every row runs after its victim: the pristine world's csv: task."""
    return f"csv:{src / 'pairs' / 'pairs.csv'}"


def metrics(out):
    return {r["dataset"]: r.get("metrics") for r in out["results"]}


@pytest.fixture(scope="module")
def clean(pristine, tmp_path_factory):
    """The clean numbers of every victim and of the witness, from one run on an untouched copy."""
    src, sizes = pristine
    w = tmp_path_factory.mktemp("clean")
    for name in ("folder", "pairs", "datasets"):
        shutil.copytree(src / name, w / name, symlinks=True)
    shutil.copy(src / "aligner.pt", w / "aligner.pt")
    mp = pytest.MonkeyPatch()
    tiny_sets(sizes, mp)
    try:
        tasks = ",".join(task_spec(v, w) for v in ("folder", "csv", *BENCH)) + f",{witness(src)}"
        argv = ["--aligner", str(w / "aligner.pt"), "--tasks", tasks, "--dataset-root", str(w / "datasets"),
                "--cache-dir", str(w / "cache"), "--output", str(w / "eval.json"), "--workers", "0", "--device", "cpu"]
        assert ev.cli(argv) == 0
    finally:
        mp.undo()
    out = json.loads((w / "eval.json").read_text())
    by = {r["dataset"].replace(str(w), "W"): r for r in out["results"]}
    assert all("metrics" in r for r in by.values()), by
    return {v: by[task_spec(v, Path("W"))]["metrics"] for v in ("folder", "csv", *BENCH)} | {
        "witness": by[witness(src)]["metrics"]}


# ---------------------------------------------------------------------------- the mutations
def fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def dangling(path):
    path.unlink()
    path.symlink_to(path.with_name("gone.jpg"))


def rewrite(path, f):
    path.write_text(f(path.read_text()))


def rewrite_bytes(path, f):
    path.write_bytes(f(path.read_bytes()))


def coco_caption(value):
    def mutate(w):
        path = w / "datasets" / "mscoco_captions" / "coco_test_karpathy.json"
        ann = json.loads(path.read_text())
        ann["annotations"][1]["caption"] = value
        path.write_text(json.dumps(ann))
    return mutate


def edit_aligner(w, f):
    ckpt = torch.load(w / "aligner.pt", weights_only=True)
    f(ckpt)
    atomic_save(ckpt, w / "aligner.pt")


def results_file(fmt="evaluate/1"):
    """An earlier results file of evaluate.py holding one task, "earlier_task" (fmt None: before "format" existed)."""
    def mutate(w):
        row = {"dataset": "earlier_task", "task": ev.CLS, "model": "m", "language": "en", "n_images": 2,
               "metrics": {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5}}
        old = {"format": fmt, "model": "test:x", "identity": "sha256:0", "results": [row], "mean": {}}
        if fmt is None:
            del old["format"], old["identity"]
        (w / "eval.json").write_text(json.dumps(old))
    return mutate


def disk_full(match):
    """atomic_write's last step, os.replace of its temporary file onto a path containing `match`, fails as a full
    disk does (a rename of evaluate.py's own, such as a backup put back, goes through)."""
    def patch(mp):
        real = os.replace

        def replace(src, dst, *a, **k):
            if match in str(dst) and "tmp" in Path(src).name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *a, **k)
        mp.setattr(os, "replace", replace)
    return patch


def raises(where, exc, only=None):
    """A bug: ev.<where> raises `exc` (for calls whose first string argument contains `only`)."""
    def patch(mp):
        real = getattr(ev, where)

        def broken(*a, **k):
            if only is None or any(isinstance(x, (str, list)) and only in str(x) for x in a):
                raise exc
            return real(*a, **k)
        mp.setattr(ev, where, broken)
    return patch


def damage_cache(kind):
    def mutate(w):
        for f in (w / "cache" / "eval").glob("*_folder-image-*.pt"):
            if kind == "truncated":
                f.write_bytes(f.read_bytes()[:100])
            else:  # a folder where the cache file goes
                f.unlink()
                f.mkdir()
    return mutate


@dataclasses.dataclass
class Fault:
    id: str
    victim: str  # "folder", "csv" or a benchmark task
    mutate: Callable = None  # (world) -> None, on the row's fresh copy
    expect: str = "skip"  # skip (exit 2 under --strict) | refuse (exit 2, before any compute) | recover | partial
    says: str = ""  # what the one line holds
    flags: tuple = ()
    patch: Callable = None  # (monkeypatch) -> None: a fault the file system or a bug makes
    output: str = ""  # --output, relative to the world ("" = eval.json)
    warm: bool = False  # start from a feature cache: a clean run in the same world first
    not_says: tuple = ()


CAL = "datasets/caltech101/caltech101/101_ObjectCategories"
TABLE = [
    # -- item 2: every stage of a task inside its guard; the JSON is written even when the victim comes first
    Fault("dangling symlink image", "folder", lambda w: dangling(w / "folder" / "red_car" / "0.jpg"),
          says="red_car/0.jpg: a dangling symlink"),
    Fault("FIFO named .jpg (folder)", "folder", lambda w: fifo(w / "folder" / "blue_bus" / "1.jpg"),
          says="blue_bus/1.jpg: a FIFO, not a regular file"),
    Fault("FIFO named .jpg (flickr30k)", "flickr30k", lambda w: fifo(w / "datasets" / "flickr30k" / "2.jpg"),
          says="2.jpg: a FIFO"),
    Fault("FIFO as the split file", "flickr30k",
          lambda w: fifo(w / "datasets" / "flickr30k" / "flickr30k_test_karpathy.txt"), says="a FIFO"),
    Fault("folder named .jpg among the images", "folder", lambda w: (w / "folder" / "red_car" / "x.jpg").mkdir(),
          expect="recover"),
    Fault("truncated JPEG", "folder", lambda w: (w / "folder" / "red_car" / "1.jpg").write_bytes(b"\xff\xd8\xff"),
          says="red_car/1.jpg: cannot read the image"),
    Fault("missing image (csv)", "csv", lambda w: (w / "pairs" / "images" / "1.jpg").unlink(),
          says="image not found"),
    Fault("bug while encoding", "folder", patch=raises("encode_images", RuntimeError("kaput"), only="folder:"),
          says="unexpected RuntimeError: kaput (a bug"),
    Fault("bug while scoring", "folder", patch=raises("classification_metrics", ZeroDivisionError("zero")),
          says="unexpected ZeroDivisionError: zero"),
    Fault("bug while listing", "folder", patch=raises("check_files", KeyError("k"), only="red_car"),
          says="unexpected KeyError: 'k'"),
    Fault("a row the JSON cannot hold", "folder",
          patch=lambda mp, f=ev.no_nan: mp.setattr(ev, "no_nan", lambda m: {**f(m), "odd": {1}} if "acc1" in m
                                                    else f(m)),
          says="unexpected TypeError"),
    # -- item 4: outputs that cannot destroy
    Fault("--output x.txt", "folder", expect="refuse", output="x.txt", says="not a .json name"),
    Fault("--output the aligner", "folder", expect="refuse", output="aligner.pt", says="not a .json name"),
    Fault("--output a folder", "folder", lambda w: (w / "out.json").mkdir(), expect="refuse", output="out.json",
          says="a folder, not a regular file"),
    Fault("--output a FIFO", "folder", lambda w: fifo(w / "out.json"), expect="refuse", output="out.json",
          says="a FIFO"),
    Fault("--output a text file", "folder", lambda w: (w / "notes.json").write_text("my notes\n"), expect="refuse",
          output="notes.json", says="holds something other than evaluate.py's results"),
    Fault("--output another JSON", "folder", lambda w: (w / "m.json").write_text('{"args": {}, "metrics": {}}'),
          expect="refuse", output="m.json", says="holds something other"),
    Fault("--output an empty file", "folder", lambda w: (w / "e.json").write_bytes(b""), expect="refuse",
          output="e.json", says="holds something other"),
    Fault("--output an earlier results file: backup", "folder", results_file(), expect="recover"),
    Fault("--output an earlier results file, old format: backup", "folder", results_file(fmt=None),
          expect="recover"),
    Fault("disk full writing the results", "folder", results_file(), expect="refuse",
          patch=disk_full("eval.json"), says="No space left on device", not_says=("--out ", "--resume")),
    Fault("disk full writing the cache", "folder", expect="recover", patch=disk_full("/cache/"),
          says="features not cached (No space left on device)", not_says=("--out ", "--resume")),
    Fault("--cache-dir is a file", "folder", lambda w: (w / "cache").write_text("x"), expect="refuse",
          says="--cache-dir"),
    Fault("cache file cut short", "folder", damage_cache("truncated"), expect="recover", warm=True,
          says="cannot read the cache"),
    Fault("cache file is a folder", "folder", damage_cache("folder"), expect="recover", warm=True,
          says="features not cached (Is a directory)"),
    Fault("aligner cut short", "folder", lambda w: (w / "aligner.pt").write_bytes(b"PK\x03\x04"), expect="refuse",
          says="--aligner"),
    Fault("aligner without its image head", "folder", lambda w: edit_aligner(w, lambda c: c.pop("image_head")),
          expect="refuse", says="an incomplete aligner checkpoint (KeyError: 'image_head')"),
    Fault("a training checkpoint as --aligner", "folder", lambda w: edit_aligner(w, lambda c: c.update(format="x")),
          expect="refuse", says="not an aligner checkpoint"),
    Fault("--tasks names an unknown task", "nope", expect="refuse", says="unknown task 'nope'"),
    # -- item 1: one boundary per input
    Fault("COCO caption null", "mscoco_captions", coco_caption(None), says="annotation 1 (id 1): caption None"),
    Fault("COCO caption numeric", "mscoco_captions", coco_caption(7), says="caption 7, not a non-empty string"),
    Fault("COCO caption empty", "mscoco_captions", coco_caption(" "), says="--skip-bad-rows"),
    Fault("COCO null caption, skipped and partial", "mscoco_captions", coco_caption(None), expect="partial",
          flags=("--skip-bad-rows", "--partial"), says="skipped 1 bad rows"),
    Fault("flickr30k empty caption", "flickr30k",
          lambda w: rewrite(w / "datasets" / "flickr30k" / "flickr30k_test_karpathy.txt",
                            lambda t: t.replace("picture 1", "")), says="row 5: empty caption"),
    Fault("flickr30k empty caption, skipped and partial", "flickr30k",
          lambda w: rewrite(w / "datasets" / "flickr30k" / "flickr30k_test_karpathy.txt",
                            lambda t: t.replace("picture 1", "")), expect="partial",
          flags=("--skip-bad-rows", "--partial")),
    Fault("csv empty caption", "csv", lambda w: rewrite(w / "pairs" / "pairs.csv", lambda t: t.replace(
        "another view 2", "")), says="empty caption"),
    Fault("empty templates.txt", "folder", lambda w: (w / "folder" / "templates.txt").write_text("\n"),
          says="templates.txt: no templates"),
    Fault("template without {}", "folder", lambda w: (w / "folder" / "templates.txt").write_text("{}\na photo\n"),
          says="templates.txt, line 2: template 'a photo' has no {}"),
    Fault("--templates an empty file", "folder", lambda w: (w / "t.txt").write_text(""),
          flags=("--templates", "t.txt"), says="no templates"),
    Fault("every class folder empty", "folder",
          lambda w: [f.unlink() for f in (w / "folder").glob("*/*.jpg")], says="no images found"),
    Fault("--partial with 0 images", "imagenet1k",
          lambda w: [f.unlink() for f in (w / "datasets" / "imagenet1k" / "val").glob("*/*.JPEG")],
          flags=("--partial",), says="no images found"),
    Fault("duplicate class names (folders)", "folder", lambda w: shutil.copytree(
        w / "folder" / "red_car", w / "folder" / "red car"), says="are both named 'red car'"),
    Fault("duplicate class names (classnames.txt)", "folder",
          lambda w: (w / "folder" / "classnames.txt").write_text("bus\ncar\nbus\n"), says="both named 'bus'"),
    Fault("hidden folder in a folder: task", "folder", lambda w: shutil.copytree(
        w / "folder" / "red_car", w / "folder" / ".ipynb_checkpoints"), says="a hidden folder, not a class"),
    Fault("caltech101 folder missing, stray added", "caltech101",
          lambda w: os.rename(w / CAL / "lotus", w / CAL / "lotus_flower"), flags=("--partial",),
          says="missing ['lotus'], unexpected ['lotus_flower']"),
    Fault("caltech101 .ipynb_checkpoints", "caltech101", lambda w: (w / CAL / ".ipynb_checkpoints").mkdir(),
          says="a hidden folder, e.g. Jupyter's"),
    Fault("imagenet val/.ipynb_checkpoints", "imagenet1k",
          lambda w: (w / "datasets" / "imagenet1k" / "val" / ".ipynb_checkpoints").mkdir(),
          says="val/.ipynb_checkpoints (not a class folder; a hidden folder", not_says=("Delete val/",)),
    Fault("imagenet a class folder missing", "imagenet1k",
          lambda w: shutil.rmtree(w / "datasets" / "imagenet1k" / "val" / "n00000007"), flags=("--partial",),
          says="missing ['n00000007']"),
    Fault("macOS ._ file in a class folder", "folder",
          lambda w: (w / "folder" / "red_car" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07"),
          says="red_car/._0.jpg: a hidden file"),
    Fault("Jupyter copies inside a class folder", "folder", lambda w: shutil.copytree(
        w / "folder" / "red_car", w / "folder" / "red_car" / ".ipynb_checkpoints"), says="in a hidden folder"),
    Fault("--tasks folder: names a file", "folder", lambda w: (shutil.rmtree(w / "folder"), (w / "folder").write_text(
        "x")), says="is a file, not a folder"),
    Fault("templates.txt is a folder", "folder", lambda w: ((w / "folder" / "templates.txt").unlink(),
                                                          (w / "folder" / "templates.txt").mkdir()),
          says="templates.txt: a folder, not a regular file"),
    Fault("classnames.txt is a FIFO", "folder", lambda w: fifo(w / "folder" / "classnames.txt"),
          says="classnames.txt: a FIFO"),
    Fault("csv: an image is a FIFO", "csv", lambda w: fifo(w / "pairs" / "images" / "2.jpg"), says="2.jpg"),
    Fault("flickr30k line without an image", "flickr30k",
          lambda w: rewrite(w / "datasets" / "flickr30k" / "flickr30k_test_karpathy.txt", lambda t: t + "oops\n"),
          says="row 8: not `<image>.jpg,<caption>`"),
    Fault("COCO caption of an unknown image", "mscoco_captions",
          lambda w: rewrite(w / "datasets" / "mscoco_captions" / "coco_test_karpathy.json",
                            lambda t: t.replace('"image_id": 2, "id": 21', '"image_id": 9, "id": 21')),
          says="annotation 5 (id 21): image_id 9 is not in `images`"),
    Fault("cifar10 test batch cut short", "cifar10",
          lambda w: (w / "datasets" / "cifar10" / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04"),
          says="cifar10: cannot read it"),
    Fault("cifar10 test batch is a FIFO", "cifar10", lambda w: fifo(
        w / "datasets" / "cifar10" / "cifar-10-batches-py" / "test_batch"), says="test_batch: a FIFO"),
    Fault("cifar100 meta missing", "cifar100", lambda w: (w / "datasets" / "cifar100" / "cifar-100-python" /
                                                          "meta").unlink(), says="cannot read it"),
    Fault("stl10 images cut short", "stl10", lambda w: rewrite_bytes(
        w / "datasets" / "stl10" / "stl10_binary" / "test_X.bin", lambda b: b[:1000]), says="cannot read it"),
    Fault("food101 split names a missing image", "food101", lambda w: (
        w / "datasets" / "food101" / "food-101" / "images" / "dish_1" / "101.jpg").unlink(),
        says="dish_1/101.jpg: missing"),
    Fault("pets image is a FIFO", "pets", lambda w: fifo(w / "datasets" / "pets" / "oxford-iiit-pet" / "images" /
                                                        "breed4_1.jpg"), says="breed4_1.jpg: a FIFO"),
    Fault("flowers labels damaged", "flowers", lambda w: (w / "datasets" / "flowers" / "flowers-102" /
                                                          "imagelabels.mat").write_bytes(b"MATLAB"),
          says="cannot read it"),
    Fault("dtd image a dangling symlink", "dtd", lambda w: dangling(
        w / "datasets" / "dtd" / "dtd" / "dtd" / "images" / "texture03" / "texture03_0001.jpg"),
        says="texture03_0001.jpg: a dangling symlink"),
    Fault("fgvc_aircraft label of an unknown variant", "fgvc_aircraft", lambda w: rewrite(
        w / "datasets" / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt",
        lambda t: t.replace("0002 Plane 7", "0002 Plane 700")), says="cannot read it"),
    Fault("cars annotations missing", "cars", lambda w: (w / "datasets" / "cars" / "stanford_cars" /
                                                         "cars_test_annos_withlabels.mat").unlink(),
          says="cannot read it"),
    Fault("sun397 Jupyter copies", "sun397", lambda w: shutil.copytree(
        w / "datasets" / "sun397" / "SUN397" / "a" / "place_001", w / "datasets" / "sun397" / "SUN397" / "a" /
        "place_001" / ".ipynb_checkpoints"), says="place_001/.ipynb_checkpoints (a hidden folder"),
]


def snapshot(w):
    """{path: sha1} of every file under w but the cache: what a run must leave as it was."""
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in w.rglob("*")
            if p.is_file() and not p.is_symlink() and "cache" not in p.relative_to(w).parts and not p.is_fifo()}


@pytest.mark.parametrize("fault", TABLE, ids=[f.id for f in TABLE])
def test_fault(fault: Fault, pristine, clean, bench_sizes, alarm, tmp_path, monkeypatch, capsys):
    src, _ = pristine
    w = tmp_path
    for name in ("folder", "pairs"):
        shutil.copytree(src / name, w / name)
    if fault.victim in BENCH:
        shutil.copytree(src / "datasets" / fault.victim, w / "datasets" / fault.victim)
    shutil.copy(src / "aligner.pt", w / "aligner.pt")
    monkeypatch.chdir(w)
    if fault.warm:
        assert run(w, fault.victim)[0] == 0 and list((w / "cache" / "eval").glob("*_folder-image-*.pt"))
        (w / "eval.json").unlink()
    if fault.mutate:
        fault.mutate(w)
    before = snapshot(w)
    if fault.patch:
        fault.patch(monkeypatch)
    output = w / (fault.output or "eval.json")
    flags = (*fault.flags, "--strict") if fault.expect == "skip" else fault.flags
    status, out = run(w, fault.victim, flags, output, witness(src))
    std, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith(("[evaluate]", "error:", "warning:"))]
    assert "Traceback" not in err + std, err[-3000:]
    said = [ln for ln in lines + std.splitlines() if fault.says in ln]
    assert (said or not fault.says) and all(len(ln) < 2000 for ln in lines), (fault.says, lines)
    assert not any(bad in err for bad in fault.not_says), lines
    victim = task_spec(fault.victim, w)
    after = snapshot(w)
    if fault.expect == "refuse":
        assert status == 2 and sum(ln.startswith("error:") for ln in lines) == 1, lines
        assert after == before  # nothing overwritten: not the output, not the aligner, not the data
        if fault.patch is None:  # refused before any compute
            assert not (w / "cache" / "eval").exists() or not any((w / "cache" / "eval").iterdir())
        return
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed <= {output} and out is not None, changed  # only the results file was written
    if output in before:  # an earlier results file: kept whole as the backup the new file names
        assert out["earlier"] and hashlib.sha1(Path(out["earlier"]).read_bytes()).hexdigest() == before[output]
        assert [r["dataset"] for r in out["results"]] == [victim, witness(src)]  # this run only, never merged
    assert metrics(out)[witness(src)] == clean["witness"]  # the clean task beside it: intact
    row = next(r for r in out["results"] if r["dataset"] == victim)
    if fault.expect == "skip":
        assert status == 2 and "metrics" not in row and fault.says in row["skipped"] and "\n" not in row["skipped"]
        assert sum(ln.startswith(f"[evaluate] skipped {victim}: ") for ln in lines) == 1, lines
        assert lines[-1].startswith("error: --strict: 1 of 2 tasks skipped")
    elif fault.expect == "partial":
        assert status == 0 and row.get("partial") and "metrics" in row
    else:  # recovers: the clean numbers
        assert status == 0 and row["metrics"] == clean[fault.victim], row


def test_a_rerun_that_reproduces_the_earlier_results_leaves_no_backup(pristine, tmp_path, capsys):
    src, _ = pristine
    shutil.copytree(src / "folder", tmp_path / "folder")
    shutil.copy(src / "aligner.pt", tmp_path / "aligner.pt")
    (status, first), (again, second) = run(tmp_path, "folder"), run(tmp_path, "folder")
    assert status == again == 0 and second["earlier"] is None and not list(tmp_path.glob("eval.*.json"))
    assert [r["metrics"] for r in first["results"]] == [r["metrics"] for r in second["results"]]
    assert first["identity"] == "sha256:" + hashlib.sha256((src / "aligner.pt").read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the command itself
def test_command_line_fifo_and_dangling_symlink_one_line_each(pristine, tmp_path):
    """The real command (no patches, a subprocess with a timeout): a FIFO and a dangling symlink among the images of
    the first two tasks cost those tasks only; the JSON holds the third; --strict exits 2; no traceback."""
    src, _ = pristine
    for name in ("a", "b"):
        shutil.copytree(src / "folder", tmp_path / name)
    fifo(tmp_path / "a" / "red_car" / "0.jpg")
    dangling(tmp_path / "b" / "blue_bus" / "1.jpg")
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--aligner", str(src / "aligner.pt"), "--tasks",
           f"folder:{tmp_path / 'a'},folder:{tmp_path / 'b'},csv:{src / 'pairs' / 'pairs.csv'}", "--cache-dir",
           str(tmp_path / "cache"), "--output", str(tmp_path / "e.json"), "--workers", "0", "--device", "cpu",
           "--strict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("[evaluate] skipped")]
    assert len(skipped) == 2 and "a FIFO" in skipped[0] and "a dangling symlink" in skipped[1], skipped
    out = json.loads((tmp_path / "e.json").read_text())
    assert [("metrics" in r) for r in out["results"]] == [False, False, True]


def test_open_clip_weights_that_cannot_be_downloaded_are_one_line(pristine, tmp_path):
    """--model ViT-B-32 --pretrained openai on a machine without the weights and without the hub: each task is one
    skip line naming the encoder and the fix (was a 27-line chained traceback); exit 0, 2 with --strict."""
    src, _ = pristine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", "ViT-B-32", "--pretrained", "openai", "--tasks",
           f"folder:{src / 'folder'},csv:{src / 'pairs' / 'pairs.csv'}", "--cache-dir", str(tmp_path / "cache"),
           "--output", str(tmp_path / "e.json"), "--workers", "0", "--device", "cpu", "--strict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3 and all("cannot load the image encoder 'openclip:ViT-B-32:openai'" in ln
                                   for ln in lines[:2]), lines
    assert lines[-1].startswith("error: --strict: 2 of 2 tasks skipped")
