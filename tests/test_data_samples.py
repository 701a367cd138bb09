"""The shipped samples are the files their provenance table lists, byte for byte, within budget."""

import hashlib
import re
from pathlib import Path

import pytest
from helpers import DATA

SHARED = Path(__file__).parents[2] / "shared" / "data"
ROW = re.compile(r"^\| `(?P<path>[^`]+)` \|.*\| (?P<bytes>\d+) \| `(?P<sha256>[0-9a-f]{64})` \|")
BUDGET_BYTES = 42_000_000  # the 40 MB (MiB) budget, with room for the README itself


def _table() -> dict[str, tuple[int, str]]:
    rows = (ROW.match(line) for line in (DATA / "README.md").read_text(encoding="utf-8").splitlines())
    return {row["path"]: (int(row["bytes"]), row["sha256"]) for row in rows if row}


def test_every_shipped_file_is_listed_with_its_checksum():
    table = _table()
    shipped = {
        str(path.relative_to(DATA))
        for path in DATA.rglob("*")
        if path.is_file() and path != DATA / "README.md" and path.parent.name != "licenses"
    }
    assert shipped == set(table)
    for name, (size, digest) in table.items():
        content = (DATA / name).read_bytes()
        assert len(content) == size, name
        assert hashlib.sha256(content).hexdigest() == digest, name


def test_licence_files_and_budget():
    assert (
        (DATA / "licenses" / "BrainLesion-tutorials-LICENSE.txt").read_text(encoding="utf-8").startswith("MIT License")
    )
    assert (DATA / "ixi-sim" / "README.md").read_text(encoding="utf-8").startswith("# ixi-sim: SIMULATED")
    assert sum(path.stat().st_size for path in DATA.rglob("*") if path.is_file()) < BUDGET_BYTES


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this clone")
def test_samples_are_identical_to_the_shared_copies():
    for name, (_, digest) in _table().items():
        assert hashlib.sha256((SHARED / name).read_bytes()).hexdigest() == digest, name
