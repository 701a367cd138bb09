"""The equal-budget comparison (scripts/compare.py) and the experiment helpers it shares with the demo and the
ablations: the shipped split, the seed override, the bundle's network rebuilt from a run's overrides, and one tiny
end-to-end comparison on the shipped cases (training, evaluate.json, baselines, sweep, panel, reports)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from agi_monai.bundle.experiment import (
    SHIPPED_TEST_CASE,
    bundle_network,
    load_generator,
    seed_overrides,
    shipped_datalist,
)
from agi_monai.bundle.run_folder import RECORD_NAME, replacing_earlier_run
from agi_monai.data import DataError, discover_cases
from agi_monai.evaluation import brain_mask, slice_protocol
from agi_monai.evaluation.tables import CASES_CSV, read_csv, write_csv
from agi_monai.networks import AGINet, ResUNet
from test_demo import assert_runs_recorded
from helpers import CPU_SCRIPT_ENV, DATA, REPO, load_script

BUNDLE = REPO / "bundles" / "brats_t1_t2_to_flair"


def test_shipped_datalist_trains_on_the_brats_cases_and_tests_on_tcga(tmp_path):
    path = shipped_datalist(DATA, ["T1", "T2", "FLAIR"], tmp_path / "datalist.json")
    datalist = json.loads(path.read_text())
    assert [c["case_id"] for c in datalist["training"]] == ["BraTS-GLI-00001-000", "aurora-example"]
    assert datalist["test"] == datalist["validation"] and [c["case_id"] for c in datalist["test"]] == ["TCGA-FG-6692"]
    held_out = datalist["test"][0]
    assert set(held_out) == {"case_id", "T1", "T2", "FLAIR"}
    assert held_out["FLAIR"] == str((DATA / SHIPPED_TEST_CASE[0] / "OtherEXampleFromTCIA_fla_bet.nii.gz").resolve())
    assert all(Path(c[k]).is_absolute() and Path(c[k]).is_file() for s in datalist.values() for c in s for k in ("T1", "T2", "FLAIR"))
    with pytest.raises(ValueError, match=r"tcga-lgg/TCGA-FG-6692: expected one case with \['T1', 'PD'\]"):
        shipped_datalist(DATA, ["T1", "PD"], tmp_path / "other.json")


def test_seed_override_replaces_the_bundles_determinism_seed(tmp_path):
    overrides = seed_overrides(BUNDLE, 7)
    assert overrides == {"seed": 7}
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    assert parser.get_parsed_content("seed") == 0
    parser.update(overrides)
    assert parser.get_parsed_content("seed") == 7
    assert "$monai.utils.set_determinism(seed=@seed)" in parser["initialize"]  # the step that seeds the run reads it
    fake = tmp_path / "bundle"
    (fake / "configs").mkdir(parents=True)
    (fake / "configs" / "train.json").write_text(json.dumps({"initialize": ["$monai.utils.set_determinism(seed=0)"]}))
    with pytest.raises(ValueError, match=r"train.json: expected a 'seed' setting"):
        seed_overrides(fake, 1)


def test_a_runs_overrides_rebuild_its_generator(tmp_path):
    overrides = {"network_def#_target_": "agi_monai.networks.ResUNet", "network_def#channels": [8, 16, 32, 64]}
    network = bundle_network(BUNDLE, overrides)
    assert type(network) is ResUNet and network.head.out_channels == 8 and network.head.in_channels == 2
    torch.manual_seed(3)
    trained = ResUNet(2, 2, 1, channels=(8, 16, 32, 64))
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    loaded = load_generator(BUNDLE, tmp_path / "model.pt", tmp_path / "overrides.json")
    assert not loaded.training
    x = torch.rand(1, 2, 32, 32)
    assert torch.equal(loaded(x), trained.eval()(x))
    with pytest.raises(DataError) as wrong_class:
        load_generator(BUNDLE, tmp_path / "model.pt", {"network_def#channels": [8, 16, 32, 64]})
    assert str(wrong_class.value) == (
        f"{tmp_path / 'model.pt'}: does not fit AGINet of this config: 130 missing (e.g. "
        "down1.0.conv1.attention.fuse.weight), 10 unexpected (e.g. down1.0.conv1.weight) (expected the weights bundle "
        "brats_t1_t2_to_flair's train.json writes (models/model.pt) in a run with the network_def overrides given "
        "here (overrides: network_def#channels=[8, 16, 32, 64]))"
    )
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'missing.pt'}: does not exist \(expected the weights "):
        load_generator(BUNDLE, tmp_path / "missing.pt", tmp_path / "overrides.json")
    with pytest.raises(ValueError, match="no such overrides file"):
        load_generator(BUNDLE, tmp_path / "model.pt", tmp_path / "missing.json")

def test_a_runs_overrides_file_merges_as_a_second_config_file_would(tmp_path):
    # train_bundle and evaluate_bundle merge overrides.json into the workflow's parser rather than list it as a config
    # file (MONAI warns about config files outside configs/); the result must be what the logged command's
    # `--config_file "['train.json', 'overrides.json']"` gives: '#' IDs set nested values, '+' keys extend
    from agi_monai.bundle.experiment import _merge_config_file

    train = REPO / "bundles" / "brats_t1_t2_to_flair" / "configs" / "train.json"
    overrides = {"network_def#channels": [8, 16, 16, 32], "+train#handlers": [{"_target_": "StatsHandler"}],
                 "+network_def": {"groups": 4}, "epochs": "$@val_interval * 2", "new_setting": "@epochs"}
    overrides_file = tmp_path / "overrides.json"
    overrides_file.write_text(json.dumps(overrides))
    merged = ConfigParser()
    merged.read_config(str(train))
    _merge_config_file(merged, overrides_file)
    as_files = ConfigParser()
    as_files.read_config([str(train), str(overrides_file)])
    assert merged.get() == as_files.get()
    assert merged["network_def"]["groups"] == 4 and merged["train#handlers"][-1] == {"_target_": "StatsHandler"}


def test_a_fresh_process_logs_its_first_training_command(tmp_path):
    """The equivalent ``monai.bundle run`` command of the first run in a process (the demo's and the comparison's
    first network) reaches the run's log: logging is set up from the bundle's logging.conf only once its
    workflow is built. A fresh interpreter, as the scripts start: pytest's own handlers would catch the line."""
    script = (
        "import sys\n"
        "from agi_monai.bundle.experiment import budget_overrides, train_bundle\n"
        "overrides = budget_overrides(sys.argv[1], iterations=1, batch_size=2, crop_size=None, device='cpu', "
        "channels=[8, 16, 16, 32], discriminator_channels=8, spatial_size=[64, 64], cache_dir=sys.argv[3])\n"
        "train_bundle(sys.argv[2], sys.argv[4], overrides)\n"
    )
    ixi = REPO / "bundles" / "ixi_t1_t2_to_pd"
    arguments = [str(DATA / "ixi-sim"), str(ixi), str(tmp_path / "cache"), str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, encoding="utf-8",
                            cwd=REPO, timeout=300, env=CPU_SCRIPT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    command = (f"training: python -m monai.bundle run --config_file \"['{ixi}/configs/train.json',"
               f"'{tmp_path}/run/overrides.json']\" --bundle_root {tmp_path}/run --logging_file "
               f"{ixi}/configs/logging.conf")
    assert [line.split(" - INFO - ", 1)[-1] for line in result.stdout.splitlines() if "training: " in line] == [command]
    # the overrides file's settings reach MONAI as overrides, not as a config file outside the bundle's configs/
    assert "Not all config files are in" not in result.stdout + result.stderr


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_removes_exactly_the_files_the_scripts_earlier_run_wrote(tmp_path):
    """The run-folder record of scripts/demo.py, compare.py and ablation.py: a rerun replaces the script's own
    earlier run; a person's files, files moved aside by the bundle, the slice cache and files changed since stay."""
    folder, lines = tmp_path / "agi_net", []
    _write(folder / "notes.txt", "a person's notes")  # a folder someone pointed the script at
    _write(folder / "models" / "model.pt", "weights trained by hand")
    with replacing_earlier_run(folder, "demo.py", say=lines.append):
        # what the bundle does in a fresh run: moves the earlier weights aside (a rename), then writes its own
        (folder / "models" / "earlier_run_1").mkdir()
        os.replace(folder / "models" / "model.pt", folder / "models" / "earlier_run_1" / "model.pt")
        for name in ("models/model.pt", "models/training_checkpoint_epoch=1.pt", "logs/events.1", "eval/cache/a.npy"):
            _write(folder / name, f"first run: {name}")
    assert lines == [
        f"demo.py: {folder} holds 2 file(s) it did not write (models/model.pt, notes.txt): none removed (a fresh "
        "bundle run moves an earlier model.pt and checkpoints to models/earlier_run_<time>/)"
    ]
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["script"] == "demo.py"
    assert [f["path"] for f in record["files"]] == [
        "logs/events.1", "models/model.pt", "models/training_checkpoint_epoch=1.pt"]
    assert record["files"][1]["size"] == len("first run: models/model.pt")

    _write(folder / "models" / "training_checkpoint_epoch=1.pt", "edited since")  # other size: not the run's any more
    with pytest.raises(RuntimeError, match="interrupted"), replacing_earlier_run(folder, "demo.py", say=lines.append):
        _write(folder / "models" / "model.pt", "second run, interrupted")
        raise RuntimeError("interrupted")
    assert lines[1] == (
        f"demo.py: replacing its earlier run in {folder}: removed the 2 file(s) it wrote (models/model.pt, "
        "logs/events.1); kept 3 other file(s) (models/earlier_run_1/model.pt, models/training_checkpoint_epoch=1.pt, "
        "notes.txt)"
    )
    # the cache stays for the next run; the emptied logs/ folder goes; the interrupted run is recorded too
    assert _files(folder).keys() - {RECORD_NAME} == {
        "notes.txt", "models/earlier_run_1/model.pt", "models/training_checkpoint_epoch=1.pt", "eval/cache/a.npy",
        "models/model.pt"}
    assert not (folder / "logs").exists()
    assert _files(folder)["models/earlier_run_1/model.pt"] == "weights trained by hand"
    assert [f["path"] for f in json.loads((folder / RECORD_NAME).read_text())["files"]] == ["models/model.pt"]

    # another script's record is none of this script's business; a record edited to point outside reaches nothing
    outside = _write(tmp_path / "outside.txt", "elsewhere")
    before = _files(folder)
    with replacing_earlier_run(folder, "compare.py", say=lines.append):
        pass
    assert _files(folder).keys() == before.keys() and lines[2].startswith(f"compare.py: {folder} holds 4 file(s)")
    stat = outside.stat()
    _write(folder / RECORD_NAME, json.dumps({"script": "demo.py", "files": [
        {"path": "../outside.txt", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}]}))
    with replacing_earlier_run(folder, "demo.py", say=lines.append):
        pass
    assert outside.read_text() == "elsewhere" and _files(folder).keys() - {RECORD_NAME} == before.keys() - {RECORD_NAME}
    _write(folder / RECORD_NAME, "{not json")
    with pytest.raises(DataError, match=rf"{folder / RECORD_NAME}: cannot be read \(JSONDecodeError: .*\(expected "
                                        r"the record demo.py writes"):
        with replacing_earlier_run(folder, "demo.py", say=lines.append):
            pass
    assert _files(folder).keys() == before.keys()

def test_the_unperturbed_check_matches_case_ids_that_look_like_numbers(tmp_path):
    """evaluate.json's per-case table read back keeps ``00042`` and ``42`` as written (they were read as the
    numbers 42 and 42.0: a KeyError), so the sweep's level 0 is checked against its case."""
    ids = ["00042", "42", "1e3"]
    write_csv([{"case_id": case, "slice2d_psnr_db": 20.0 + i} for i, case in enumerate(ids)], tmp_path / CASES_CSV)
    rows = [{"network": "AGI-Net", "perturbation": 0.0, "protocol": "slice2d", "case_id": case, "psnr_db": 20.0 + i}
            for i, case in enumerate(ids)]
    check = load_script("compare.py")._check_unperturbed
    assert check(rows, {"AGI-Net": tmp_path}) == 0.0
    with pytest.raises(RuntimeError, match="differs from evaluate.json's by 1.0000 dB"):
        check([{**rows[0], "psnr_db": 21.0}], {"AGI-Net": tmp_path})


@pytest.mark.slow
def test_compare_trains_both_networks_at_one_budget_and_reports(tmp_path):
    output = tmp_path / "compare"
    channels = [8, 16, 32, 64]
    command = [
        sys.executable, str(REPO / "scripts" / "compare.py"), "--scenarios", "brats_t1_t2_to_flair",
        "--iterations", "2", "--batch_size", "2", "--crop_size", "64", "--channels", ",".join(map(str, channels)),
        "--discriminator_channels", "8", "--protocols", "slice2d", "--sweep_kinds", "translation",
        "--sweep_maximum", "0.5", "--device", "cpu", "--progress", "False", "--output_dir", str(output),
    ]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=REPO, timeout=900, env=CPU_SCRIPT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "compare.json").read_text())
    scenario = summary["scenarios"]["brats_t1_t2_to_flair"]
    assert scenario["test_cases"] == ["TCGA-FG-6692"] and summary["seed"] == 0
    assert summary["command"].startswith("OMP_NUM_THREADS=1 python ") and "--iterations 2" in summary["command"]
    assert summary["machine"]["torch_threads"] == 1 and summary["seconds"] > 0

    # the same budget and seed for both; only the generator class differs
    runs = {name: json.loads(Path(run["overrides"]).read_text()) for name, run in scenario["training"].items()}
    differing = {k for k in runs["AGI-Net"].keys() | runs["ResUNet"].keys() if runs["AGI-Net"].get(k) != runs["ResUNet"].get(k)}
    assert differing == {"network_def#_target_"}
    assert runs["AGI-Net"]["seed"] == 0  # train.json's set_determinism(seed=@seed)
    for name, network_class in (("AGI-Net", AGINet), ("ResUNet", ResUNet)):
        run = scenario["training"][name]
        assert run["iterations"] == 2
        weights = torch.load(run["weights"], weights_only=True)
        network = network_class(2, 2, 1, channels=channels)
        network.load_state_dict(weights)
        assert run["parameters"] == sum(p.numel() for p in network.parameters())
        # evaluate.json's numbers are the table's
        per_case = read_csv(Path(scenario["evaluations"][name]) / "metrics_per_case.csv")
        assert scenario["quality"][name]["slice2d"]["psnr_db"] == pytest.approx(per_case[0]["slice2d_psnr_db"])
    assert set(scenario["quality"]) == {"AGI-Net", "ResUNet", "T1 as FLAIR", "T2 as FLAIR"}
    quality = (output / "brats_t1_t2_to_flair" / "quality.md").read_text()
    # the input-as-FLAIR baselines, computed here from the held-out case's files: each contrast / its 99.5th
    # percentile, clipped; the brain mask of the inputs; the paper's slice protocol (hand-checked in
    # test_evaluation.py). The case's contrasts share one grid, so no registration or resampling is involved.
    (held_out,) = discover_cases(DATA / SHIPPED_TEST_CASE[0], required=["T1", "T2", "FLAIR"]).cases
    volumes = {}
    for contrast in ("T1", "T2", "FLAIR"):
        raw = nib.load(held_out[contrast]).get_fdata(dtype=np.float32)
        volumes[contrast] = torch.from_numpy(np.clip(raw / np.percentile(raw, 99.5), 0, 1))
    mask = brain_mask(torch.stack([volumes["T1"], volumes["T2"]]))
    for contrast in ("T1", "T2"):
        expected = slice_protocol(volumes[contrast], volumes["FLAIR"], mask)
        measured = scenario["quality"][f"{contrast} as FLAIR"]["slice2d"]
        for metric, value in expected.metrics.items():
            assert measured[metric] == pytest.approx(value, abs=1e-3), (contrast, metric)
        assert f"| {contrast} as FLAIR | {expected.psnr_db:.2f} ± 0.00 ({expected.psnr_db:.2f}) |" in quality

    # the sweep: both networks at 0 and 0.5 px; its unperturbed level is evaluate.json's synthesis
    assert scenario["sweep"]["levels"] == [0.0, 0.5] and scenario["sweep"]["unperturbed_vs_evaluate_json_db"] < 0.01
    rows = read_csv(output / "brats_t1_t2_to_flair" / "robustness" / "translation_slice2d.csv")
    assert [(r["network"], r["perturbation"]) for r in rows] == [
        ("AGI-Net", 0.0), ("ResUNet", 0.0), ("AGI-Net", 0.5), ("ResUNet", 0.5)]
    assert [r["shift_px"] for r in rows] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    for name in ("robustness/translation_slice2d_psnr_db.png", "panel.png"):
        assert matplotlib.image.imread(output / "brats_t1_t2_to_flair" / name).ndim == 3
    results = (output / "results.md").read_text()
    assert summary["command"] in results and "### Misalignment sweep: translation" in results
    assert "| network | 0 | 0.5 |" in results
    assert all(math.isfinite(r["psnr_db"]) for r in rows)

    # each run folder records what the run wrote, which a rerun into the same folder replaces (run twice in the demo's
    # test; the same record here)
    assert_runs_recorded(output, ["brats_t1_t2_to_flair/agi_net", "brats_t1_t2_to_flair/resunet"], "compare.py")


# ------------------------------------------------------------- the script's checks, cleanup, notes and panel

def _no_scenario(monkeypatch, script):
    def refuse(*args, **kwargs):
        raise RuntimeError("a scenario ran (training)")

    monkeypatch.setattr(script, "run_scenario", refuse)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"sweep_kinds": "translaton"}, r"--sweep_kinds translaton: expected some of \['translation', 'rigid'\]"),
        ({"protocols": "slice2d,brasyn3D"}, r"--protocols slice2d,brasyn3D: expected some of"),
        ({"sweep_protocols": "brasyn3d", "sweep_slice_step": 2}, "slice_step 2"),
        ({"sweep_maximum": 1.2}, "not a whole number of steps"),
        ({"moved_input": "T1Gd"}, "--moved_input T1Gd: not an input of brats_t1_t2_to_flair"),
        ({"channels": [8, 16, 32]}, r"brats_t1_t2_to_flair: AGI-Net cannot be built with --channels 8,16,32"),
    ],
)
def test_compare_refuses_bad_arguments_before_any_training(tmp_path, monkeypatch, arguments, message):
    script = load_script("compare.py")
    _no_scenario(monkeypatch, script)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        script.main(output_dir=str(output), scenarios="brats_t1_t2_to_flair", device="cpu", iterations=2,
                    batch_size=2, crop_size=64, **{"channels": [8, 16, 32, 64], **arguments})
    assert not output.exists()


def test_compare_removes_the_earlier_runs_tables_before_training(tmp_path, monkeypatch, capsys):
    script = load_script("compare.py")
    _no_scenario(monkeypatch, script)
    output = tmp_path / "out"
    scenario = output / "brats_t1_t2_to_flair"
    earlier = [output / "results.md", output / "compare.json", scenario / "quality.md", scenario / "panel.png",
               scenario / "robustness" / "translation_slice2d.csv", scenario / "robustness" / "robustness.md",
               scenario / "robustness" / "translation_slice2d_psnr_db.png"]
    kept = [scenario / "agi_net" / "models" / "model.pt", scenario / "datalist.json"]
    for path in earlier + kept:
        _write(path, "earlier")
    with pytest.raises(RuntimeError, match="a scenario ran"):
        script.main(output_dir=str(output), scenarios="brats_t1_t2_to_flair", device="cpu", iterations=2,
                    batch_size=2, crop_size=64, channels=[8, 16, 32, 64])
    assert [p for p in earlier if p.exists()] == [] and all(p.is_file() for p in kept)
    assert "compare.py: removed the earlier run's results.md, compare.json" in capsys.readouterr().out


def test_results_state_that_a_folder_tests_on_its_training_cases(tmp_path):
    from agi_monai.evaluation.tables import FOLDER_SPLIT_NOTE, split_note

    script = load_script("compare.py")
    assert split_note(DATA / "tcga-lgg") == FOLDER_SPLIT_NOTE
    assert split_note(None) is None
    record = {"bundle": "b", "inputs": ["T1", "T2"], "target": "FLAIR", "test_cases": ["case"],
              "split_note": FOLDER_SPLIT_NOTE, "training": {}, "sweep": {"kinds": []}}
    summary = {"command": "c", "seconds": 60.0, "seed": 0,
               "machine": {"cpu": "x", "cpu_count": 1, "torch": "t", "torch_threads": 1, "gpu": None},
               "budget": {"iterations": 2, "batch_size": 2, "crop_size": 64, "learning_rate": 1e-3,
                          "channels": [8], "discriminator_channels": 8, "intensity_augmentation": 0.5}}
    text = script._results_markdown([script.ScenarioResult(record, "quality", [])], summary)
    assert f"Test case(s): case (**{FOLDER_SPLIT_NOTE}**)" in text


def test_the_panel_draws_errors_against_the_target_clipped_as_slice2d_clips_it(tmp_path, monkeypatch):
    script = load_script("compare.py")
    drawn = {}
    monkeypatch.setattr(script, "synthesis_panel", lambda **kwargs: drawn.update(kwargs) or kwargs["path"])
    generator = torch.nn.Conv2d(2, 1, 1)
    target = torch.linspace(0.0, 2.44, 16 * 16 * 4).reshape(1, 16, 16, 4)  # unclipped, as volume_dataset leaves it
    item = {"image": torch.rand(2, 16, 16, 4), "target": target, "mask": torch.ones(1, 16, 16, 4), "case_id": "c"}
    info = script.find_bundle("brats_t1_t2_to_flair")
    script._panel(item, info, {"AGI-Net": generator}, {"AGI-Net": {"protocols": {}}}, tmp_path / "panel.png",
                  torch.device("cpu"), 2)
    assert drawn["target"].max() == 1.0 and drawn["target"].min() == 0.0
