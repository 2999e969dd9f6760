"""Pasting is true as written: every loss, teacher and solver whose docstring ends with "Paste with: <helpers>;
import <modules>." runs pasted into a fresh module with exactly those helpers and that import statement, nothing more,
and gives the result of the script's own function."""
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

import sma
import sotalign

MODULES = {"sma": sma, "sotalign": sotalign}
# Every loss of both scripts, the teachers and the solver: each must say what it pastes with.
EXPECTED = {"sma": ["smax", "contrastive", "flqmi", "cover", "flvmi", "gcmi", "logdetmi", "multipos", "infonce",
                    "siglip", "divergence"],
            "sotalign": ["cca", "procrustes", "ridge", "csa", "score_weighted", "teacher_similarity", "sinkhorn_log",
                         "klot", "siglip", "infonce", "structure", "Lion"]}


def paste_line(obj) -> tuple:
    """(helpers, import statement) from the docstring's "Paste with: ..." line."""
    m = re.search(r"Paste with: (.*?)\.(?:\"\"\"|$|\s*$)", " ".join(inspect.getdoc(obj).split()))
    assert m, f"{obj.__name__}: its docstring does not say what it pastes with"
    said = m.group(1)
    if said == "nothing else":
        return [], ""
    helpers, _, imports = said.rpartition("; ") if "; " in said else ("", "", said)
    return [h.strip() for h in helpers.split(",") if h.strip()], imports


def example_inputs(module_name, name):
    g = torch.Generator().manual_seed(0)
    zi = F.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
    zt = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    x, y = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    X, Y = torch.randn(12, 6, generator=g), torch.randn(12, 5, generator=g)
    K = torch.rand(5, 4, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(8, 3)
    head.score_weights = torch.rand(3, generator=g)
    table = {
        ("sma", "smax"): (torch.randn(3, 4, generator=g),),
        ("sma", "contrastive"): (torch.randn(4, 4, generator=g),),
        ("sma", "cover"): (zi, zt, mask, torch.tensor(10.0)),
        ("sma", "infonce"): (x, y, torch.tensor(10.0)),
        ("sma", "siglip"): (x, y, torch.tensor(10.0), torch.tensor(-1.0)),
        ("sotalign", "siglip"): (x, y, torch.tensor(10.0), torch.tensor(-1.0)),
        ("sotalign", "infonce"): (x, y, torch.tensor(10.0)),
        ("sotalign", "structure"): (X[:5], x),
        ("sotalign", "sinkhorn_log"): (K, 0.1),
        ("sotalign", "klot"): (K, torch.rand(5, 4, generator=g, dtype=torch.float64)),
        ("sotalign", "score_weighted"): (head, x[:, :3]),
        ("sotalign", "teacher_similarity"): ((head, torch.nn.Linear(8, 3)), x, y),
    }
    if module_name == "sma" and name in ("flqmi", "flvmi", "gcmi", "logdetmi", "multipos", "divergence"):
        return (zi, zt, mask, torch.tensor(10.0))
    if module_name == "sotalign" and name in ("cca", "procrustes", "ridge", "csa"):
        return (X, Y)
    return table.get((module_name, name))


def first(out):
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, dict):
        return out["W_x"]
    return out


@pytest.mark.parametrize("module_name, name", [(m, n) for m, names in EXPECTED.items() for n in names])
def test_pasted_alone_with_what_its_docstring_names_gives_the_same_result(module_name, name):
    module = MODULES[module_name]
    helpers, imports = paste_line(getattr(module, name))
    code = (imports + "\n\n" if imports else "") + "\n\n".join(
        inspect.getsource(getattr(module, n)) for n in [*helpers, name])
    namespace = {}
    exec(compile(code, f"<pasted {name}>", "exec"), namespace)
    if name == "Lion":  # an optimiser: one step on the same parameters
        p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        for param, cls in ((p, namespace["Lion"]), (q, module.Lion)):
            param.grad = torch.tensor([1.0, -2.0, 0.5])
            cls([param], lr=0.1, weight_decay=0.01).step()
        assert torch.equal(p, q)
        return
    inputs = example_inputs(module_name, name)
    torch.manual_seed(0)
    mine = first(namespace[name](*inputs))
    torch.manual_seed(0)
    theirs = first(getattr(module, name)(*inputs))
    assert torch.equal(mine, theirs)
