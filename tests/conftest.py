"""The tests import the scripts from the repo root and the tiny test encoders from this folder (spec
`py:tiny_encoders:text`); subprocesses they start inherit both through PYTHONPATH."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for folder in (TESTS, ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
