"""sweep.py end to end on tiny random encoders: a 2-method x 2-budget x 2-seed sweep writes its rows, table and plot,
and a cut sweep (--stop-after-runs, then a torn last line as kill -9 leaves) resumes without redoing finished runs.
Then, with no training: the verdict rule, the entity + seed bootstrap against a brute-force enumeration and known
cases, and the grid-edge rule on fake scorers."""
import csv
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

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
            "--cache-dir", str(d / "cache"), "--out", str(out), "--grid", json.dumps(grid), "--edge-rounds", "0",
            *more]


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
            "--edge-rounds": "1",
            "--grid": json.dumps({m: {"lr": [1e-3], "steps": [2], "tau": [0.05, 0.2]} for m in ("flqmi", "multipos")})}
    args = argv(tiny, out, "--claim-budgets", "50%")
    for flag, value in more.items():  # override argv's values
        args[args.index(flag) + 1] = value
    sweep.main(args)
    # the grid-edge rule: both taus tried are edges, so each choice got (at most, --edge-rounds 1) one more select run
    # one step past it on the tau ladder, at seed 0
    extra = [r for r in runs_in(out) if r["stage"] == "select" and r["config"]["tau"] not in (0.05, 0.2)]
    assert extra and all(r["config"]["tau"] in (0.02, 0.5) and r["seed"] == 0 for r in extra)
    assert len(extra) <= 4  # 2 methods x 2 signals
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


# ---------------------------------------------------------------------------- the rule for the words
def test_verdict_words():
    v = sweep.verdict
    assert v(0.1, 2.0) == "better" and v(-2.0, -0.1) == "worse"
    assert v(0.1, 2.0, claim=1) == "confirmed" and v(-2.0, -0.1, claim=1) == "refuted"
    assert v(0.1, 2.0, claim=-1) == "refuted" and v(-2.0, -0.1, claim=-1) == "confirmed"
    # as printed: a bound shown as +0.0 or -0.0 does not exclude 0, whichever side it came from
    assert v(0.04, 1.2, claim=1) == v(-0.03, 1.2, claim=1) == "tie within ±1.2"
    assert v(0.05, 1.2, claim=1) == "confirmed"  # printed +0.1
    assert v(-1.5, 1.5) == "tie within ±1.5" and v(-0.2, 1.6) == "not resolved" and v(-0.3, 0.2) == "tie within ±0.3"
    assert v(0.0, 0.0) == "tie within ±0.0"  # the K = M = 1 sanity cell
    assert v(-0.2, 1.6, tie=2.0) == "tie within ±1.6"
    with pytest.raises(ValueError):
        v(1.0, -1.0)
    assert sweep.mdd80({"se": 0.01}) == pytest.approx(2.8)  # (1.96 + 0.84) SE, in points


# ---------------------------------------------------------------------------- the entity + seed bootstrap
def brute_force_bootstrap(D, ent, E):
    """Every resample of E entities and S seeds with replacement, equally likely, from the definition (loops):
    (mean, std) of the statistic mean over the drawn seeds of (sum of the drawn entities' item differences / their
    item count)."""
    S = len(D)
    items = {e: [n for n in range(len(ent)) if ent[n] == e] for e in range(E)}
    stats = []
    for es in itertools.product(range(E), repeat=E):
        for ss in itertools.product(range(S), repeat=S):
            per_seed = []
            for s in ss:
                num = sum(D[s][n] for e in es for n in items[e])
                per_seed.append(num / sum(len(items[e]) for e in es))
            stats.append(sum(per_seed) / S)
    m = sum(stats) / len(stats)
    return m, math.sqrt(sum((x - m) ** 2 for x in stats) / len(stats))


def test_entity_seed_bootstrap_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ent = torch.tensor([0, 0, 1, 2, 2, 2])  # 3 entities with 2, 1, 3 items
    D = (torch.rand(2, 6, generator=g, dtype=torch.float64) > 0.5).double() - (
        torch.rand(2, 6, generator=g, dtype=torch.float64) > 0.5).double()  # (S, N) hits a − b on 2 seeds
    mean, std = brute_force_bootstrap(D.tolist(), ent.tolist(), 3)
    r = sweep.entity_seed_bootstrap([(1.0, D, ent)], 3, n_boot=100_000, seed=1)
    assert r["diff"] == pytest.approx(D.mean().item())
    assert r["se"] == pytest.approx(std, rel=0.02)
    assert r["lo"] <= mean <= r["hi"] and (r["entities"], r["seeds"], r["items"]) == (3, 2, 6)


def test_entity_bootstrap_known_cases():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, generator=g, dtype=torch.float64)
    # one seed, one item per entity: the bootstrap SE of a mean, sqrt(population variance / n)
    r = sweep.entity_seed_bootstrap([(1.0, d[None], torch.arange(50))], 50, n_boot=40_000)
    assert r["se"] == pytest.approx((d.var(unbiased=False) / 50).sqrt().item(), rel=0.03)
    # three identical drawings per entity: the same interval exactly (an image-level one would shrink by sqrt(3))
    r3 = sweep.entity_seed_bootstrap([(1.0, d.repeat_interleave(3)[None], torch.arange(50).repeat_interleave(3))],
                                     50, n_boot=40_000)
    assert (r3["lo"], r3["hi"]) == pytest.approx((r["lo"], r["hi"]), abs=1e-12)
    # every entity moves with the seed alone: the interval is that of the seed means, sqrt(var(seed means) / S)
    delta = torch.tensor([-0.2, 1.0, 1.5, -1.0, 1.0], dtype=torch.float64)  # the per-seed differences
    r = sweep.entity_seed_bootstrap([(1.0, delta[:, None].expand(5, 40), torch.arange(40))], 40, n_boot=40_000)
    assert r["se"] == pytest.approx((delta.var(unbiased=False) / 5).sqrt().item(), rel=0.03)


def test_bootstrap_reads_runs_pairs_seeds_and_recomputes_r1():
    """sweep.bootstrap on hand-made rows: seeds paired across the methods (a seed only one ran is dropped), R@1 as
    (i2t + t2i) / 2 with each caption resampled with its image."""
    def row(method, seed, i2t, t2i, zs):
        return {"stage": "run", "method": method, "budget": "5%", "seed": seed, "config": {},
                "selected_for": ["zeroshot", "retrieval"],
                "heldout": {"hits": {"i2t": i2t, "t2i": t2i, "zs": zs}}}
    results = type("R", (), {})()
    results.rows = [row("a", 0, "110", "10011", "111000"), row("a", 1, "100", "11011", "110000"),
                    row("b", 0, "100", "10001", "011000"), row("b", 1, "000", "10011", "000000"),
                    row("b", 2, "111", "11111", "111111")]  # seed 2: b only
    ret = {"text_image": torch.tensor([0, 0, 1, 2, 2])}
    r = sweep.bootstrap(results, "a", "b", "5%", "R@1", ret)
    r1 = {("a", 0): (2 / 3 + 3 / 5) / 2, ("a", 1): (1 / 3 + 4 / 5) / 2, ("b", 0): (1 / 3 + 2 / 5) / 2,
          ("b", 1): (0 + 3 / 5) / 2}
    assert r["diff"] == pytest.approx((r1["a", 0] - r1["b", 0] + r1["a", 1] - r1["b", 1]) / 2)
    assert (r["entities"], r["seeds"]) == (3, 2)
    zs = {"entity": torch.tensor([0, 0, 0, 1, 1, 1])}  # two entities, three drawings each
    r = sweep.bootstrap(results, "a", "b", "5%", "zs_acc1", zs)
    assert r["diff"] == pytest.approx((1 / 6 + 2 / 6) / 2) and r["entities"] == 2
    with pytest.raises(sweep.UserError, match="changed since the sweep ran"):
        sweep.bootstrap(results, "a", "b", "5%", "zs_acc1", {"entity": torch.tensor([0, 1])})


def test_task_index_groups_the_emoji_drawings_into_entities():
    idx = sweep.task_index("emoji_zeroshot,emoji_retrieval")
    zs, ret = idx["zs_acc1"], idx["R@1"]
    assert len(zs["entity"]) == 1071 and int(zs["entity"].max()) + 1 == 357
    assert torch.bincount(zs["entity"]).tolist() == [3] * 357  # each emoji: three drawings
    assert ret["n_images"] == 399 and len(ret["text_image"]) == 4608


# ---------------------------------------------------------------------------- the grid-edge rule
def scorer(best, log=None):
    """A fake validation score, peaked at `best` (log distance per setting), recording what it was asked."""
    def score(c):
        if log is not None:
            log.append(dict(c))
        return -sum(abs(math.log(c[k] / v)) if v else c[k] for k, v in best.items())
    return score


def grid(**values):
    return [dict(zip(values, v)) for v in itertools.product(*values.values())]


def test_grid_edge_rule_extends_until_interior():
    log = []
    best, info = sweep.select(grid(lr=[1e-3, 3e-3], tau=[0.05, 0.1, 0.2]), scorer({"lr": 0.03, "tau": 0.5}, log),
                              {"lr": sweep.EDGE["lr"], "tau": sweep.EDGE["tau"]})
    assert best == {"lr": 0.027, "tau": 0.5}
    assert info["lr"] == {"tried": [0.001, 0.003, 0.009, 0.027, 0.081], "chosen": 0.027, "mark": "interior"}
    assert info["tau"] == {"tried": [0.05, 0.1, 0.2, 0.5, 1.0], "chosen": 0.5, "mark": "interior"}
    for c in log[6:]:  # every extension moves one setting past the edge, the others held at the chosen values
        assert sum(c[k] not in (0.003, 0.2, 0.009, 0.027, 0.5) for k in c) <= 1
    assert len(log) == len({json.dumps(c, sort_keys=True) for c in log})  # nothing scored twice


def test_grid_edge_rule_stops_at_hard_bounds():
    steps = sweep.select(grid(steps=[50, 150]), lambda c: c["steps"], {"steps": sweep.EDGE["steps"]})
    assert steps[0] == {"steps": sweep.STEP_CAP} and steps[1]["steps"]["mark"] == "bound"
    assert steps[1]["steps"]["tried"] == [50, 150, 300, 600, 1200]  # STEP_CAP
    assert all(isinstance(v, int) for v in steps[1]["steps"]["tried"])
    lam = sweep.select(grid(lambda_ot=[1e-4, 1e-2]), lambda c: -c["lambda_ot"], {"lambda_ot": sweep.EDGE["lambda_ot"]})
    assert lam[0] == {"lambda_ot": 0.0} and lam[1]["lambda_ot"]["mark"] == "bound"  # lambda = 0 ends the descent
    reg = sweep.select(grid(reg=[0.0, 1e-3, 0.01]), lambda c: -c["reg"], {"reg": sweep.EDGE["reg"]})
    assert reg[0] == {"reg": 0.0} and reg[1]["reg"] == {"tried": [0.0, 1e-3, 0.01], "chosen": 0.0, "mark": "bound"}
    assert sweep.next_value(sweep.EDGE["tau"], 1.0, up=True) is None
    assert sweep.next_value(sweep.EDGE["tau"], 0.07, up=False) == 0.05  # off the ladder: the next one on it


def test_grid_edge_rule_read_back_and_round_cap():
    table = {json.dumps(c, sort_keys=True): -abs(c["lr"] - 0.01) for c in grid(lr=[1e-3, 3e-3])}
    best, info = sweep.select(grid(lr=[1e-3, 3e-3]), lambda c: table.get(json.dumps(c, sort_keys=True)),
                              {"lr": sweep.EDGE["lr"]})  # the report: a config not run is not run now
    assert best == {"lr": 3e-3} and info["lr"]["mark"] == "edge"
    best, info = sweep.select(grid(lr=[1e-3, 3e-3]), scorer({"lr": 1.0}), {"lr": sweep.EDGE["lr"]}, rounds=1)
    assert best == {"lr": 9e-3} and info["lr"]["mark"] == "edge"  # out of rounds: still on the edge, marked
    # ties keep the first tried (grid order, then extensions); a setting with one value tried is not tuned
    best, info = sweep.select(grid(lr=[1e-3, 3e-3, 1e-2], steps=[300]), lambda c: 0.0,
                              {"lr": sweep.EDGE["lr"], "steps": sweep.EDGE["steps"]})
    assert best == {"lr": 1e-3, "steps": 300} and "steps" not in info
    assert info["lr"] == {"tried": [0.000333, 0.001, 0.003, 0.01], "chosen": 0.001, "mark": "interior"}
