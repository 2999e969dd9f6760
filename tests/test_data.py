"""The pairs-file contract (README "Data format"): formats accepted, and every kind of bad input stopped with an
error that names the file and the row, before any training starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sma import DataError, read_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    for name, colour in [("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path


def write(folder, text, name="pairs.csv"):
    path = folder / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_comma_csv_groups_rows_of_one_image_into_an_entity(folder):
    pairs = read_pairs(write(folder, "image,caption\na.png,red square\nb.png,blue square\na.png,a red tile\n"))
    assert pairs.images == [str(folder / "a.png"), str(folder / "b.png")]  # resolved against the CSV's folder
    assert pairs.captions == [["red square", "a red tile"], ["blue square"]]
    assert pairs.skipped == []


def test_open_clip_tab_convention_and_key_overrides(folder):
    tsv = write(folder, "title\tfilepath\nred square\ta.png\n", "pairs.tsv")
    assert read_pairs(tsv).captions == [["red square"]]
    custom = write(folder, "txt;img\nblue;b.png\n", "custom.csv")
    pairs = read_pairs(custom, image_key="img", caption_key="txt", sep=";")
    assert pairs.images == [str(folder / "b.png")] and pairs.captions == [["blue"]]


BAD = {  # file text -> (row named in the error, problem named in the error)
    "missing column": ("image,caption\na.png,red\nb.png\n", "row 3", "columns"),
    "empty caption": ("image,caption\na.png,red\nb.png,  \n", "row 3", "empty caption"),
    "missing image": ("image,caption\na.png,red\nnope.png,blue\n", "row 3", "image not found"),
    "unreadable image": ("image,caption\na.png,red\nbroken.png,red\n", "row 3", "unreadable image"),
    "not UTF-8": (b"image,caption\na.png,red\nb.png,caf\xe9\n", "row 3", "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_error_names_file_row_and_problem(folder, case):
    text, row, problem = BAD[case]
    path = write(folder, text)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    message = str(err.value)
    assert str(path) in message and f"{row}:" in message and problem in message, message


@pytest.mark.parametrize("case", sorted(BAD))
def test_skip_bad_rows_counts_every_skip(folder, case):
    text, row, problem = BAD[case]
    pairs = read_pairs(write(folder, text), skip_bad_rows=True)
    assert len(pairs.skipped) == 1 and pairs.skipped[0].startswith(row) and problem in pairs.skipped[0]


def test_missing_header_column_names_the_columns_found(folder):
    with pytest.raises(DataError, match=r"row 1: header \['img', 'text'\]"):
        read_pairs(write(folder, "img,text\na.png,red\n"))


@pytest.mark.parametrize("script", ["sma.py", "sotalign.py"])
def test_cli_stops_before_training_with_the_row(folder, tmp_path, script):
    bad = write(folder, "image,caption\na.png,red\nb.png,\n")
    flag = "--data" if script == "sma.py" else "--pairs"
    proc = subprocess.run([sys.executable, str(ROOT / script), flag, str(bad), "--out", str(tmp_path / "run"),
                           "--image-encoder", "timm-random:test_vit", "--text-encoder", "py:tiny_encoders:text"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one line, no traceback
    assert f"{bad}, row 3: empty caption" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before any training
