"""A bundle training killed with SIGKILL mid-epoch resumes from its last checkpoint (issue #7 item 6).

``ixi_t1_t2_to_pd``'s train.json on the shipped simulated IXI subject, tiny widths, 64x64 slices, 3 epochs of 2
iterations, run by ``python -m monai.bundle run`` in a subprocess. The run is killed (SIGKILL: no handler, no
cleanup) as soon as the epoch-1 training checkpoint is in place, i.e. during epoch 2. Then: no partial or temporary
file is left in ``models/`` (the checkpoint savers write to a temporary file and rename it), the checkpoint loads with
``weights_only=True`` and holds epoch 1's state; a rerun with ``--resume_ckpt latest`` restores it, continues at
epoch 2 / iteration 3 and ends at iteration 6 with only the newest training checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agi_monai.data import DataError
from agi_monai.engines import hold_checkpoint_folder
from helpers import REPO, SUBPROCESS_ENV

BUNDLE = REPO / "bundles" / "ixi_t1_t2_to_pd"
EPOCHS, ITERATIONS_PER_EPOCH = 3, 2


def train_command(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
        "--bundle_root", str(root), "--dataset_dir", str(REPO / "tests" / "data" / "ixi-sim"),
        "--epochs", str(EPOCHS), "--val_interval", str(ITERATIONS_PER_EPOCH), "--batch_size", "2", "--num_workers", "0",
        "--spatial_size", "[64,64]", "--network_def#channels", "[8,16,16,32]", "--discriminator_def#channels", "8", *extra,
    ]


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_from_its_last_checkpoint(tmp_path):
    models = tmp_path / "models"
    first = models / "training_checkpoint_epoch=1.pt"
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        process = subprocess.Popen(train_command(tmp_path), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env=SUBPROCESS_ENV)
        try:
            deadline = time.monotonic() + 300
            while not first.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert first.exists(), f"no epoch-1 checkpoint (exit {process.poll()}):\n{log.read_text()[-3000:]}"
            # the running training holds its models/ folder: a second run there is refused (here, in this process)
            with pytest.raises(DataError, match="is in use by another training run"):
                hold_checkpoint_folder(models)
            os.kill(process.pid, signal.SIGKILL)  # during epoch 2: no chance to clean up or finish a file
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    text = log.read_text()
    assert not (models / "training_checkpoint_epoch=2.pt").exists()  # killed before epoch 2 completed

    # only complete files: the best generator and epoch 1's training checkpoint, no temporary file beside them
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", first.name, "training_runs.json"]
    state = torch.load(first, weights_only=True)
    assert state["trainer"]["iteration"] == ITERATIONS_PER_EPOCH  # Ignite keeps the iteration; the epoch follows
    assert {"generator", "discriminator", "g_optimizer", "d_optimizer", "best_model_ranking"} <= set(state)
    torch.load(models / "model.pt", weights_only=True)

    resumed = subprocess.run(train_command(tmp_path, "--resume_ckpt", "latest"), cwd=REPO, capture_output=True, text=True,
                             timeout=600, env=SUBPROCESS_ENV)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-4000:]
    assert f"Restored all variables from {first}" in text
    assert f"Epoch: 2/{EPOCHS}, Iter: 1/{ITERATIONS_PER_EPOCH}" in text and f"Epoch: 1/{EPOCHS}" not in text
    assert sorted(p.name for p in models.iterdir()) == [
        "model.pt", f"training_checkpoint_epoch={EPOCHS}.pt", "training_runs.json"]
    # the list of runs says what produced the files: the killed run, then the one resuming from its checkpoint
    runs = json.loads((models / "training_runs.json").read_text())["runs"]
    assert [run["settings"]["resume_from"] for run in runs] == ["", str(first)]
    assert [run["first_iteration"] for run in runs] == [1, ITERATIONS_PER_EPOCH + 1]
    assert "--resume_ckpt latest" in runs[1]["command"] and runs[0]["networks"]["generator"]["class"] == (
        "agi_monai.networks.nets.resunet.AGINet")
    final = torch.load(models / f"training_checkpoint_epoch={EPOCHS}.pt", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * ITERATIONS_PER_EPOCH
    # training went on from epoch 1's weights: the generator differs from the killed run's checkpoint
    assert any(not torch.equal(final["generator"][k], state["generator"][k]) for k in state["generator"])
