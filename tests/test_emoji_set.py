"""The shipped example set (examples/emoji, built by examples/make_emoji.py): every file the tasks and scripts read
loads, the 8 evaluate.py tasks resolve, the entity splits are disjoint, variants of one emoji share a side and
OpenMoji is in no training file."""
import csv
import sys
from pathlib import Path

import evaluate as ev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import make_emoji  # noqa: E402  (the set's builder: its family rules)

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "examples" / "emoji"


def entity(path):
    return Path(path).stem  # images/<artist>/<entity id>.png


def column(name, col="image"):
    with open(EMOJI / name, encoding="utf-8", newline="") as f:
        return [r[col] for r in csv.DictReader(f)]


def test_the_eight_tasks_read_and_the_splits_are_disjoint():
    args = ev.Args(aligner="-", tasks="emoji_all,emoji_val")
    tasks = ev.resolve_tasks("emoji_all,emoji_val")
    assert len(tasks) == 8 and list(ev.resolve_tasks("emoji")) == ["emoji_zeroshot", "emoji_retrieval"]
    entities = {}
    for name, task in tasks.items():
        data, skipped = ev.read_task(name, task, args)
        assert skipped is None, skipped
        files = data.files
        assert all(Path(p).is_file() for p in files)
        if task.kind == ev.CLS:  # 58 subgroup classes, each with prompts from the shipped templates
            assert len(data.classnames) == len(data.images.classes) == 58 and len(data.templates) == 4
            assert max(data.images.labels) < 58
        else:  # one depiction per entity, several descriptions each
            assert len(data.images) == len(set(map(entity, files))) and min(map(len, data.captions)) >= 2
        assert all(("openmoji" in p) == name.endswith("_openmoji") for p in files)
        entities.setdefault("val" if "_val_" in name else "heldout", set()).update(map(entity, files))
    train = set(map(entity, column("train.csv"))) | set(map(entity, column("depictions.csv", "depiction")))
    assert len(train) == 945 and len(entities["val"]) == 206 and len(entities["heldout"]) == 399
    assert not train & entities["val"] and not train & entities["heldout"] and not entities["val"] & entities["heldout"]
    # families (make_emoji.families): no code-point family crosses the split, e.g. person / man / woman frowning
    side = {make_emoji.code_key(e): s for s, es in (("train", train), *entities.items()) for e in es}
    for s, es in (("train", train), *entities.items()):
        assert all(side[make_emoji.code_key(e)] == s for e in es)
    assert make_emoji.code_key("1f64d-200d-2642") == make_emoji.code_key("1f64d")  # man frowning, person frowning
    training_files = [*column("train.csv"), *column("depictions.csv", "depiction"), *column("sotalign_pairs.csv"),
                      *column("unpaired_images.csv")]
    assert not [p for p in training_files if "openmoji" in p]  # the style-shift artist is never trained on
    assert {Path(p).parts[1] for p in column("depictions.csv", "depiction")} == {"twemoji", "fluent"}
