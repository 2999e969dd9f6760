"""Copying a method works as README.md ("Copy a method") says: the files it names, alone in an empty folder, run the
method's tiny end-to-end command there; evaluate.py joins them for --eval."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
EMOJI = ROOT / "examples" / "emoji"
TINY = ["--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text"]
# What README.md tells a user to copy for each method (checked against the README below).
COPY = {"sma": ["sma.py", "plumbing.py"], "sotalign": ["sotalign.py", "plumbing.py"]}


def copied(folder: Path, names) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(ROOT / name, folder / name)
    return folder


def run_alone(folder: Path, *argv):
    """Run in `folder` with only the tests' tiny encoders importable besides it (not the repository root)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """12 emoji entities as pairs (absolute paths), 16 unpaired images, 40 unpaired texts."""
    folder = tmp_path_factory.mktemp("copy_data")
    with open(EMOJI / "train.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    images = list(dict.fromkeys(image for image, _ in rows))
    keep = set(images[:12])
    with open(folder / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([str(EMOJI / image), caption] for image, caption in rows if image in keep)
    (folder / "images.csv").write_text("image\n" + "".join(f"{EMOJI / image}\n" for image in images[12:28]))
    (folder / "texts.txt").write_text("".join(f"{caption}\n" for _, caption in rows[-40:]))
    return folder


def test_readme_names_the_files_to_copy():
    readme = (ROOT / "README.md").read_text()
    for names in COPY.values():
        assert " ".join(names) in readme, f"README.md should tell users to copy {' '.join(names)}"


def test_sma_copied_alone_trains_and_exports(tmp_path, tiny_data):
    folder = copied(tmp_path / "mine", COPY["sma"])
    assert run_alone(folder, "sma.py", "--help").returncode == 0
    proc = run_alone(folder, "sma.py", "--data", tiny_data / "pairs.csv", *TINY, "--out", "run", "--dim", "16",
                     "--hidden", "32", "--batch-size", "6", "--epochs", "2", "--log-every", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (folder / "run" / "aligner.pt").is_file()


def test_sotalign_copied_alone_trains_and_exports(tmp_path, tiny_data):
    folder = copied(tmp_path / "mine", COPY["sotalign"])
    assert run_alone(folder, "sotalign.py", "--help").returncode == 0
    proc = run_alone(folder, "sotalign.py", "--pairs", tiny_data / "pairs.csv", "--unpaired-images",
                     tiny_data / "images.csv", "--unpaired-texts", tiny_data / "texts.txt", *TINY, "--out", "run",
                     "--dim", "16", "--paired-batch", "6", "--unpaired-batch", "8", "--steps", "3", "--log-every", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (folder / "run" / "aligner.pt").is_file() and (folder / "run" / "teacher.pt").is_file()


def test_evaluate_copied_beside_a_method_imports_without_its_data_folder(tmp_path):
    """evaluate.py reads the CLIP-benchmark names on first use, not at import: --eval csv:/folder: tasks work
    without data/clip_benchmark/ beside it."""
    folder = copied(tmp_path / "mine", COPY["sma"] + ["evaluate.py"])
    proc = run_alone(folder, "-c", "import evaluate; print(sorted(evaluate.resolve_tasks('emoji')))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_alone(folder, "evaluate.py", "--help").returncode == 0


@pytest.mark.parametrize("method", ["sma", "sotalign"])
def test_eval_without_evaluate_beside_the_script_is_one_line_before_any_compute(tmp_path, tiny_data, method):
    folder = copied(tmp_path / "mine", COPY[method])
    data = ["--data" if method == "sma" else "--pairs", tiny_data / "pairs.csv"]
    proc = run_alone(folder, f"{method}.py", *data, *TINY, "--out", "run", "--eval", "emoji")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--eval needs evaluate.py beside {method}.py" in lines[0]
    assert not (folder / "run").exists() and not (folder / ".cache").exists()
