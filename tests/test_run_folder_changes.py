"""A run folder's recorded file changed since the run is kept by the rerun, also when its size is unchanged.

``agi_monai.bundle.run_folder.replacing_earlier_run`` records each file a script's run wrote (path, size,
modification time) and removes on the next run only those still as the run left them. A file rewritten with other
content of the same length (weights fine-tuned in place, a table corrected by hand), or one only touched, is not
what the run left: it stays, and the rerun's line names it as kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agi_monai.bundle.run_folder import RECORD_NAME, replacing_earlier_run


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _recorded(folder: Path) -> dict[str, dict]:
    return {entry["path"]: entry for entry in json.loads((folder / RECORD_NAME).read_text())["files"]}


def test_a_rewritten_or_touched_file_of_the_same_size_is_kept_and_named(tmp_path):
    folder, lines = tmp_path / "agi_net", []
    first = {
        "models/model.pt": "weights of the first run",
        "results.csv": "case,psnr\nA,30.0\n",
        "logs/events.1": "first run's events",
    }
    with replacing_earlier_run(folder, "demo.py", say=lines.append):
        for name, text in first.items():
            _write(folder / name, text)
    recorded = _recorded(folder)
    assert sorted(recorded) == sorted(first) and lines == []

    # rewritten in place with other content of the same length, at a later time
    model = folder / "models" / "model.pt"
    model.write_text("weights fine-tuned later")
    assert len("weights fine-tuned later") == len(first["models/model.pt"])
    stat = model.stat()
    assert stat.st_size == recorded["models/model.pt"]["size"]
    if stat.st_mtime_ns == recorded["models/model.pt"]["mtime_ns"]:  # a coarse file-system clock: a later time
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    # only touched: same content and size, another modification time
    table = folder / "results.csv"
    os.utime(table, ns=(table.stat().st_atime_ns, recorded["results.csv"]["mtime_ns"] + 2_000_000_000))
    assert table.stat().st_size == recorded["results.csv"]["size"]

    with replacing_earlier_run(folder, "demo.py", say=lines.append):
        _write(folder / "logs" / "events.2", "second run's events")
    assert lines == [
        f"demo.py: replacing its earlier run in {folder}: removed the 1 file(s) it wrote (logs/events.1); "
        "kept 2 other file(s) (models/model.pt, results.csv)"
    ]
    assert model.read_text() == "weights fine-tuned later"
    assert table.read_text() == first["results.csv"]
    assert not (folder / "logs" / "events.1").exists()
    # the kept files are no longer the script's: the rerun's record lists only what it wrote itself
    assert sorted(_recorded(folder)) == ["logs/events.2"]
