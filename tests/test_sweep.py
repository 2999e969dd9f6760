"""sweep.py end to end on tiny random encoders: a 2-method x 2-budget x 2-seed sweep writes its rows, table and plot,
and a cut sweep (--stop-after-runs, then a torn last line as kill -9 leaves) resumes without redoing finished runs."""
import csv
import json
import os
import shutil
from pathlib import Path

import pytest

import sweep

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 training entities (absolute paths), their subgroups, 8 held-out entities and a zero-shot folder whose
    classes are the training entities' subgroups (one held-out image each: the mechanics, not the scores)."""
    d = tmp_path_factory.mktemp("sweep_data")
    rows = list(csv.reader(open(EMOJI / "train.csv")))[1:]
    images = list(dict.fromkeys(r[0] for r in rows))[:24]
    with open(d / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"]] + [[str(EMOJI / i), c] for i, c in rows if i in images])
    sub = {r["image"]: r["subgroup"] for r in csv.DictReader(open(EMOJI / "subgroups.csv"))}
    with open(d / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "subgroup"]] + [[str(EMOJI / i), sub[i]] for i in images if i in sub])
    held = list(csv.reader(open(EMOJI / "heldout.csv")))[1:]
    keep = list(dict.fromkeys(r[0] for r in held))[:8]
    with open(d / "heldout.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"]] + [[str(EMOJI / i), c] for i, c in held if i in keep])
    for k, s in enumerate(sorted({sub[i] for i in images if i in sub})):
        (d / "zs" / s).mkdir(parents=True)
        shutil.copy(EMOJI / keep[k % len(keep)], d / "zs" / s / f"{k}.png")
    return d


def runs_in(out):
    return [r for r in map(json.loads, open(f"{out}.jsonl")) if r["stage"] != "session"]


def argv(d, out, *more):
    grid = {"flqmi": {"lr": [1e-3], "steps": [3, 6], "tau": [0.07]}, "sotalign": {"lr": [1e-3], "steps": [3],
                                                                                   "lambda_ot": [1.0]}}
    return ["--data", str(d / "train.csv"), "--heldout", f"csv:{d / 'heldout.csv'},folder:{d / 'zs'}",
            "--val-classes", str(d / "classes.csv"), "--image-encoder", "timm-random:test_vit",
            "--text-encoder", "py:tiny_encoders:text", "--methods", "flqmi,sotalign", "--budgets", "25%,50%",
            "--seeds", "0,1", "--claim-seeds", "", "--dim", "16", "--hidden", "32", "--batch-size", "8",
            "--cache-dir", str(d / "cache"), "--out", str(out), "--grid", json.dumps(grid), *more]


def test_sweep_rows_table_plot_and_resume(tiny, tmp_path):
    out = tmp_path / "sw"
    sweep.main(argv(tiny, out, "--stop-after-runs", "3"))
    first = runs_in(out)
    assert len(first) == 3 and not Path(f"{out}.md").exists()
    with open(f"{out}.jsonl", "a") as f:
        f.write('{"key": "torn')  # what kill -9 can leave mid-write
    sweep.main(argv(tiny, out))
    rows = runs_in(out)
    assert rows[:3] == first  # finished runs were kept, not redone
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    # 2 methods x 2 budgets: flqmi's 2 configs + sotalign's 1 selected on seed 0, then each method's chosen
    # config(s) (1 or 2: one per validation signal) on both seeds
    sel = [r for r in rows if r["stage"] == "select"]
    assert len(sel) == 2 * (2 + 1) and all({"zs_acc1", "R@1"} <= set(r["val"]) for r in sel)
    runs = [r for r in rows if r["stage"] == "run"]
    for m in ("flqmi", "sotalign"):
        for b in ("25%", "50%"):
            mine = [r for r in runs if r["method"] == m and r["budget"] == b]
            assert {r["seed"] for r in mine} == {0, 1}
            assert all({"zeroshot", "retrieval"} <= {s for r in mine if r["seed"] == seed for s in r["selected_for"]}
                       for seed in (0, 1))
    r = runs[0]
    assert r["n_paired"] in (5, 10) and {"zs_acc1", "R@1", "i2t_R@1", "t2i_R@1", "gap"} <= set(r["heldout"])
    assert len(r["heldout"]["hits"]["i2t"]) == 8 and set(r["heldout"]["hits"]["zs"]) <= {"0", "1"}
    table = Path(f"{out}.md").read_text()
    assert "| flqmi |" in table and "| sotalign − " not in table and "±" in table
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert "wall" in table and "over 2 invocation(s)" in table  # the session rows: the time of every invocation
    sweep.main(argv(tiny, out))  # a finished sweep reruns nothing
    assert runs_in(out) == rows
    table = Path(f"{out}.md").read_text()
    Path(f"{out}.md").unlink()
    sweep.main(argv(tiny, out, "--report-only"))  # the report alone, from the JSON lines
    assert runs_in(out) == rows and Path(f"{out}.md").read_text() == table


def test_claim_cell_runs_both_losses_at_each_selected_config(tiny, tmp_path):
    out = tmp_path / "claim"
    more = {"--methods": "multipos,flqmi", "--budgets": "50%", "--seeds": "0", "--claim-seeds": "0,1",
            "--grid": json.dumps({m: {"lr": [1e-3], "steps": [2], "tau": [0.05, 0.2]} for m in ("flqmi", "multipos")})}
    args = argv(tiny, out, "--claim-budgets", "50%")
    for flag, value in more.items():  # override argv's values
        args[args.index(flag) + 1] = value
    sweep.main(args)
    claim = [r for r in runs_in(out) if r["stage"] == "claim"]
    # per config source (multipos's and flqmi's selection; one run set if they chose the same): 2 seeds x M 1, 5 x 2
    assert len(claim) in (8, 16) and {r["config"]["M"] for r in claim} == {1, 5}
    for r in claim:  # both losses at the same lr, steps and fixed tau
        twin = [q for q in claim if q["method"] != r["method"] and q["seed"] == r["seed"]
                and sweep.shared(q["config"]) == sweep.shared(r["config"]) and q["config"]["M"] == r["config"]["M"]]
        assert len(twin) == 1 and r["config"]["learn_tau"] is False
    assert "### SMA's claim" in Path(f"{out}.md").read_text()


@pytest.fixture(scope="module")
def artists(tmp_path_factory):
    """The emoji set's layout in small: 12 training entities with their two other artists' drawings
    (--depictions), 6 validation and 6 held-out entities, each as retrieval by the training artists and by
    OpenMoji (absolute paths)."""
    d = tmp_path_factory.mktemp("sweep_artists")

    def first(name, n, out):
        rows = list(csv.reader(open(EMOJI / name)))[1:]
        keep = list(dict.fromkeys(r[0] for r in rows))[:n]
        with open(d / out, "w", newline="") as f:
            csv.writer(f).writerows([["image", "caption"]] + [[str(EMOJI / r[0]), r[1]] for r in rows if r[0] in keep])
        return keep
    train = first("train.csv", 12, "train.csv")
    with open(d / "depictions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "depiction"]] + [[str(EMOJI / r["image"]), str(EMOJI / r["depiction"])]
                                                            for r in csv.DictReader(open(EMOJI / "depictions.csv"))
                                                            if r["image"] in train])
    for name in ("val.csv", "val_openmoji.csv", "heldout.csv", "heldout_openmoji.csv"):
        first(name, 6, name)
    return d


def test_depictions_validation_tasks_and_the_unseen_artist(artists, tmp_path):
    """SMA's views are the entity's drawings (K = 3), selection uses the validation tasks of their own, every
    held-out task is scored under its tag, and the claim cell runs K = 1 and K = 3 with a K = 3 − K = 1 table."""
    d, out = artists, tmp_path / "art"
    grid = {m: {"lr": [1e-3], "steps": [2], "tau": [0.1]} for m in ("flqmi", "multipos")}
    sweep.main(["--data", str(d / "train.csv"), "--depictions", str(d / "depictions.csv"), "--views", "3",
                "--val-tasks", f"csv:{d / 'val.csv'},csv:{d / 'val_openmoji.csv'}",
                "--heldout", f"csv:{d / 'heldout.csv'},csv:{d / 'heldout_openmoji.csv'}",
                "--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text",
                "--methods", "multipos,flqmi", "--budgets", "100%", "--seeds", "0", "--claim-seeds", "0",
                "--claim-budgets", "100%", "--claim-views", "1,3", "--dim", "16", "--hidden", "32",
                "--batch-size", "4", "--cache-dir", str(d / "cache"), "--out", str(out), "--grid", json.dumps(grid)])
    rows = runs_in(out)
    assert all(r["n_paired"] == 12 for r in rows)  # --val-tasks: every --data entity trains
    run = next(r for r in rows if r["stage"] == "run")
    tag = f":csv:{d / 'heldout_openmoji.csv'}"  # the second retrieval task: its name is not the first's + a suffix
    assert {"R@1", "i2t_R@1", "R@1" + tag} <= set(run["heldout"]) and len(run["heldout"]["hits"]) == 4
    claim = [r for r in rows if r["stage"] == "claim"]
    assert {r["config"]["K"] for r in claim} == {1, 3} and {r["config"]["M"] for r in claim} == {1, 5}
    table = Path(f"{out}.md").read_text()
    assert "### K = 3 − K = 1 views" in table and "validation tasks" in table
