"""The losses and the solver a user is most likely to copy work pasted alone into a fresh module, with only the
imports docs/USAGE.md ("Paste one loss") names: no globals of their script attached."""
import inspect
import re
from pathlib import Path

import pytest
import torch

import sma
import sotalign

ROOT = Path(__file__).resolve().parents[1]


def pasted_from_docs():
    """{function: (its source file, the functions pasted with it, the imports)} as docs/USAGE.md lists them."""
    text = (ROOT / "docs" / "USAGE.md").read_text()
    section = text[text.index("Paste one loss\n"):]
    rows = re.findall(r"^\| `(\w+)\.py` \| `(\w+)` \| ([^|]*) \| `([^`]*)` \|$", section, re.M)
    assert rows, "docs/USAGE.md: the 'Paste one loss' table is missing"
    return {name: (module, re.findall(r"`(\w+)`", helpers), imports.replace("; ", "\n")) for module, name, helpers,
            imports in rows}


def paste(module, names, imports):
    """A fresh module holding just `imports` and the source of `names` (helpers first)."""
    code = imports + "\n\n" + "\n\n".join(inspect.getsource(getattr(module, n)) for n in names)
    namespace = {}
    exec(compile(code, f"<pasted {names[-1]}>", "exec"), namespace)
    return namespace


def example_inputs(name):
    g = torch.Generator().manual_seed(0)
    if name in sma.SET_LOSSES:
        zi = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
        zt = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
        mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
        return (zi, zt, mask, torch.tensor(10.0))
    if name == "sinkhorn_log":
        return (torch.rand(5, 4, generator=g, dtype=torch.float64), 0.1)
    if name == "klot":
        return (torch.rand(5, 4, generator=g, dtype=torch.float64), torch.rand(5, 4, generator=g, dtype=torch.float64))
    raise AssertionError(f"no example inputs for {name}")


@pytest.mark.parametrize("name", sorted(pasted_from_docs()))
def test_function_pasted_alone_gives_the_same_result(name):
    module_name, helpers, imports = pasted_from_docs()[name]
    module = {"sma": sma, "sotalign": sotalign}[module_name]
    fresh = paste(module, [*helpers, name], imports)
    mine, theirs = fresh[name](*example_inputs(name)), getattr(module, name)(*example_inputs(name))
    first = (lambda out: out[0] if isinstance(out, tuple) else out)
    assert torch.equal(first(mine), first(theirs))
