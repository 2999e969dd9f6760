"""plumbing.py (readers, encoders, heads, files, flags, training helpers) is what sma.py, sotalign.py and evaluate.py
import: they hold their methods and redefine none of it. This checks that, the line budget, and the encoders."""
import ast
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def shared_names():
    """The functions, classes and constants that plumbing.py defines."""
    tree = ast.parse((ROOT / "plumbing.py").read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
        {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


@pytest.mark.parametrize("name", ["sma.py", "sotalign.py", "evaluate.py"])
def test_scripts_import_the_plumbing_and_redefine_none_of_it(name):
    import importlib
    tree = ast.parse((ROOT / name).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & shared_names(), f"{name} redefines {defined & shared_names()}: use plumbing.py's"
    module, plumbing = importlib.import_module(name[:-3]), importlib.import_module("plumbing")
    for used in ("DataError", "read_pairs", "load_encoder", "atomic_save"):
        assert getattr(module, used) is getattr(plumbing, used)  # one class, one function: no drifting copies


@pytest.mark.parametrize("name", ["sma.py", "sotalign.py"])
def test_training_scripts_stay_under_the_line_budget(name):
    assert len((ROOT / name).read_text().splitlines()) < 1000, f"{name} must stay under 1,000 lines"


def test_real_offline_encoders_give_meaningful_features():
    """The demo's encoders load from pip with no hub access, and their features carry meaning."""
    import torch.nn.functional as F
    from PIL import Image

    from plumbing import load_encoder
    text = load_encoder("offline:all-minilm-l6-v2", "text")
    z = text.encode(["a red apple", "an apple, red and round", "a jet aeroplane in the sky"])
    assert z.shape == (3, 384) and torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2  # paraphrases are closer than unrelated text
    image = load_encoder("offline:efficientnet-lite0", "image")
    folder = ROOT / "examples" / "emoji" / "images" / "noto"
    views = [image.transform(Image.open(folder / f"{h}.png")) for h in ("1f34e", "1f34f", "2708")]  # 2 apples, plane
    f = F.normalize(image.encode(torch.stack(views)), dim=-1)
    assert f.shape == (3, 1280) and f[0] @ f[1] > f[0] @ f[2]


def test_a_cpu_image_batch_is_forwarded_in_chunks_with_the_same_features(monkeypatch):
    """On a CPU, Encoder.encode forwards CPU_IMAGE_BATCH images at a time (bench/cpu_encoding_cpu.md): each chunk is
    one forward call, the features equal one call on the whole batch, inside keep_freed_memory as outside, and a
    list batch (a py: encoder's own input) goes over whole."""
    import plumbing
    calls = []
    encoder = plumbing.Encoder("test", "image", 4, lambda x: calls.append(len(x)) or x.flatten(1)[:, :4] * 2)
    batch = torch.randn(19, 3, 2, 2)
    whole = encoder.forward(batch).float()
    calls.clear()
    with plumbing.keep_freed_memory(), plumbing.keep_freed_memory():  # nested: the outer one restores
        chunked = encoder.encode(batch)
    assert calls == [8, 8, 3] and torch.equal(chunked, whole)
    assert plumbing._KEEPING == [0]
    monkeypatch.setattr(plumbing, "CPU_IMAGE_BATCH", 0)  # 0: never split
    calls.clear()
    assert torch.equal(encoder.encode(batch), whole) and calls == [19]
    listed = plumbing.Encoder("test", "image", 1, lambda x: torch.ones(len(x), 1))
    assert listed.encode(["a"] * 20).shape == (20, 1)


def test_unknown_spec_and_undownloadable_encoder_name_the_offline_specs():
    from plumbing import load_encoder
    with pytest.raises(ValueError, match="unknown image encoder spec"):
        load_encoder("nope:x", "image")
    with pytest.raises(RuntimeError, match="offline:efficientnet-lite0"):
        load_encoder("hf:no-such-org/no-such-model-here", "text")  # HF_HUB_OFFLINE=1: nothing can download
    from plumbing import DataError
    with pytest.raises(DataError, match=r"py:no_such_module:text: cannot import no_such_module.text"):
        load_encoder("py:no_such_module:text", "text")  # a user error (one line, exit 2 from the CLI)
    with pytest.raises(DataError, match=r"cannot import tiny_encoders.nope"):
        load_encoder("py:tiny_encoders:nope", "text")


TWO_RANKS = '''
import json, os, sys, torch
from plumbing import Gather, leave, setup
rank, world, device = setup("cpu")
import timm  # noqa: E402  imports torch._dynamo after the group exists, as loading an encoder does
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
torch.manual_seed(0)
head, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
ddp = DDP(head)  # kept: its reducer averages the gradients in backward
z = Gather.apply(ddp(x.view(world, 4, 4)[rank]))  # this rank's half of the batch, gathered whole
(z.square().sum() + z.sum() ** 2).backward()  # a loss of the whole batch, not a sum over rows
del ddp, z  # as when train() returns: the scripts call leave() after it
leave(world)
gloo = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:  # one file each: printed lines interleave
    json.dump({"threads": [n for n in gloo if "gloo" in n], "grad": head.weight.grad.flatten().tolist()}, f)
'''


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from /proc (Linux)")
def test_two_ranks_get_the_one_process_gradient_and_leave_no_gloo_thread(tmp_path):
    """Gather + DDP give every rank the one-process gradient of a loss over the whole batch. After leave() no gloo
    worker thread is left, though torch._dynamo was imported after setup (see plumbing.setup): one that outlived
    Python's shutdown aborted 1 two-process run in 12."""
    import json
    import subprocess
    import sys
    (tmp_path / "two.py").write_text(TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(tmp_path / "two.py"),
                        str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(0)
    head, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    z = head(x)
    (z.square().sum() + z.sum() ** 2).backward()
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["threads"] == [], f"rank {rank}: gloo threads left after leave(): {seen['threads']}"
        assert torch.allclose(torch.tensor(seen["grad"]), head.weight.grad.flatten(), atol=1e-5)
