"""README command 1, run as written (plus a temporary --out): it trains on the shipped emoji set with the real
offline encoders and must beat chance by a wide margin on the held-out splits."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"


def readme_demo_command():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    line = next(l for l in block.splitlines() if "sma.py" in l and not l.startswith("#"))
    return shlex.split(line.split("&&")[-1])  # the part after `pip install -r requirements.txt &&`


def chance_levels():
    classes = [row.split(",")[1] for row in (EMOJI / "zeroshot" / "heldout.csv").read_text().splitlines()[1:]]
    sizes = [classes.count(c) for c in set(classes)]
    n_heldout = len({row.split(",")[0] for row in (EMOJI / "heldout.csv").read_text().splitlines()[1:]})
    return max(sizes) / sum(sizes), 1 / n_heldout


def test_readme_demo_trains_exports_and_beats_chance(tmp_path):
    command = readme_demo_command()
    assert command[:2] == ["python", "sma.py"] and "offline:efficientnet-lite0" in command
    proc = subprocess.run([sys.executable, *command[1:], "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("aligner.pt", "checkpoint.pt", "manifest.json", "eval.json"):
        assert (tmp_path / name).is_file(), name
    aligner = torch.load(tmp_path / "aligner.pt", weights_only=True)
    assert aligner["format"] == "aligner/1" and aligner["image_encoder"] == "offline:efficientnet-lite0"
    results = {r["dataset"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    zeroshot_chance, retrieval_chance = chance_levels()
    acc1 = results["emoji_zeroshot"]["metrics"]["acc1"]
    r1 = results["emoji_retrieval"]["metrics"]
    print(f"acc1 {acc1:.3f} (chance {zeroshot_chance:.3f}); i2t R@1 {r1['i2t_R@1']:.3f}, t2i R@1 {r1['t2i_R@1']:.3f} "
          f"(chance {retrieval_chance:.4f})")
    assert acc1 > 2 * zeroshot_chance
    assert min(r1["i2t_R@1"], r1["t2i_R@1"]) > 10 * retrieval_chance
    # the printed held-out scores end the run
    tail = proc.stdout.strip().splitlines()[-1]
    assert "R@1" in tail and "acc1" in tail, tail


def test_no_file_refers_to_notes_outside_the_repository():
    """The method notes live in docs/: a reference to the notes' old folder beside the repository would be dead in a
    clone."""
    needle = "shared" + "/"  # spelt so that this file does not match itself
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".txt", ".csv", ".json") and p.is_file()
             and not {".venv", ".cache", ".git", "runs", "datasets", "results"} & set(p.relative_to(ROOT).parts)]
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not bad, bad
    for name in ("SMA.md", "SOTAlign.md", "EVALUATION.md", "BASELINES.md"):
        assert (ROOT / "docs" / name).is_file(), name
