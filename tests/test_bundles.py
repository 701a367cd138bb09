"""The scenario bundles (issue #5): generated from the template, configs that parse and import, metadata on
MONAI's schema, network in/out, folder inference with a bad case, TorchScript export, 2-iteration training,
resume and evaluation on the shipped real data (tiny-width overrides; real widths are the defaults).

CLI runs go through ``python -m monai.bundle`` in subprocesses, exactly as a user types them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pydoc import locate
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.handlers import StatsHandler, ValidationHandler
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.bundle.properties import InferProperties, TrainProperties
from monai.utils.enums import BundleProperty, BundlePropertyConfig
from monai.utils import optional_import

from agi_monai.bundle import (
    FolderSynthesis, NonFiniteTrainingError, StopOnNonFiniteTraining, TrainingSummary, check_command_line, load_split,
    loss_terms, rank_handlers, report_failures,
)
from agi_monai.data import Failure, nifti_is_complete, synthetic_description
from agi_monai.networks import AGINet
from helpers import DATA, REPO, SUBPROCESS_ENV, load_script

BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "_template" / "schemas" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "774785636fa303916a6a438655fd47fcbc7c0e16a66200f13278cd55ff91ab17"
ENV = SUBPROCESS_ENV  # one OpenMP thread per process (helpers says why)
TINY = ["--network_def#channels", "[8,16,16,32]"]
TINY_D = ["--discriminator_def#channels", "8"]


GENERATOR = load_script("generate_bundles.py")
SCENARIOS = {s.name: s for s in GENERATOR.SCENARIOS}
CONFIGS = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")


def _configs(name: str, config: str) -> list[str]:
    """The files a config is run with: evaluate and multi_gpu_train override train.json."""
    folder = BUNDLES / name / "configs"
    base = [] if config in ("train.json", "inference.json") else [str(folder / "train.json")]
    return [*base, str(folder / config)]


def _bundle(name: str, command: str, configs: list[str], *args: str, timeout: int = 600, status: int = 0) -> str:
    """``python -m monai.bundle <command>`` (e.g. ``run``, ``run training``) from the repository root; returns
    stdout+stderr, fails with it when the exit status is not ``status``."""
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", *command.split(), "--config_file", config_file, *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == status, f"{' '.join(cmd)} exited with {result.returncode}:\n{output[-6000:]}"
    return output


# ---------------------------------------------------------------------------------------------- generation


def test_committed_bundles_equal_what_the_generator_writes():
    assert sorted(p.name for p in BUNDLES.iterdir() if p.is_dir() and p.name not in ("_template", "brats_segmentation")) == sorted(SCENARIOS)
    assert GENERATOR.differences() == [], "run: python scripts/generate_bundles.py"
    for name in SCENARIOS:
        files = {str(p.relative_to(BUNDLES / name)) for p in (BUNDLES / name).rglob("*") if p.is_file()}
        assert files == set(GENERATOR.TEMPLATE_FILES), f"{name}: files not written by the generator"


@pytest.mark.parametrize("device, slices", [("$torch.device('cpu')", 2), ("cpu", 2), ("cuda", 16),
                                            ("$torch.device('cuda:1')", 16)])
def test_inference_slices_per_batch_follow_the_device(device, slices):
    # 2 on a CPU, where 16 was not faster and took 1.3 GiB more (docs/benchmarks.md); MONAI Label sets `device` as a
    # string, the bundle's own default is a torch.device
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "brats_t1_t2_to_flair" / "configs" / "inference.json"))
    parser["device"] = device
    assert parser.get_parsed_content("slices_per_batch") == slices


def test_scenario_table_is_the_papers():
    table = {(s.family, s.inputs, s.target, s.spatial_size) for s in SCENARIOS.values() if s.spatial_dims == 2}
    assert len(table) == 10
    # and the paper's 3D experiment (Section 4.3.7, Table 10), the 2D bundle's scenario in 3D
    (three_d,) = [s for s in SCENARIOS.values() if s.spatial_dims == 3]
    assert (three_d.family, three_d.inputs, three_d.target) == ("BraTS", ("T1", "T2", "FLAIR"), "T1Gd")
    assert ("IXI", ("T1", "T2"), "PD", 256) in table and ("BraTS", ("T1", "T2", "FLAIR"), "T1Gd", 240) in table
    for scenario in SCENARIOS.values():
        assert scenario.target not in scenario.inputs
        assert scenario.spatial_size == {"IXI": 256, "BraTS": 240}[scenario.family]


# ------------------------------------------------------------------------------------------ configs parse


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _references(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)
    elif isinstance(node, str) and node[:1] in "$@":
        yield from re.findall(r"@([\w#]+)", node)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_config_parses_and_every_target_imports(name, config):
    parser = ConfigParser()
    parser.read_config(_configs(name, config))
    parser.parse()
    locator = ComponentLocator()
    for target in set(_targets(parser.get())):
        assert locator.get_component_module_name(target) or locate(target) is not None, (
            f"{name}/{config}: _target_ {target} does not import"
        )
    for reference in set(_references(parser.get())):
        assert reference in parser, f"{name}/{config}: @{reference} is not defined"
    scenario = SCENARIOS[name]
    assert parser["inputs"] == list(scenario.inputs) and parser["target"] == scenario.target
    assert parser["network_def"]["_target_"] == "agi_monai.networks.AGINet"
    assert parser["network_def"]["in_channels"] == len(scenario.inputs)
    if config != "inference.json":
        for kept in ("train#trainer#max_epochs", "train#dataset#data", "train#handlers", "validate#dataset#data"):
            assert kept in parser, f"{name}/{config}: MONAI Label overrides {kept}"
        assert parser["discriminator_def"]["in_channels"] == len(scenario.inputs) + 1
    assert "network" in parser and "run" in parser
    # the properties MONAI's ConfigWorkflow requires of a train / infer bundle (MONAI Label, Deploy)
    properties = InferProperties if config == "inference.json" else TrainProperties
    for prop in properties.values():
        if prop.get(BundleProperty.REQUIRED):
            assert prop[BundlePropertyConfig.ID].replace("::", "#") in parser, f"{name}/{config}: {prop}"


def test_paper_training_settings():
    parser = ConfigParser()
    parser.read_config(_configs("ixi_t1_t2_to_pd", "train.json"))
    assert parser["epochs"] * parser["val_interval"] == 120_000
    assert parser["batch_size"] == 16 and parser["learning_rate"] == 1e-4 and parser["l1_weight"] == 100.0
    assert parser["g_optimizer"]["betas"] == [0.5, 0.999] == parser["d_optimizer"]["betas"]
    assert parser["discriminator_def"]["_target_"] == "monai.networks.nets.PatchDiscriminator"
    assert parser["adversarial_loss"]["_target_"] == "agi_monai.engines.BCEWithLogitsAdversarialLoss"


# ----------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_metadata_describes_the_scenario(name):
    scenario = SCENARIOS[name]
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    assert set(schema["required"]) <= set(meta)
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    for tensor in (image, pred):
        assert set(schema["$defs"]["tensor"]["required"]) <= set(tensor)
        assert tensor["format"] == "magnitude" and tensor["value_range"] == [0, 1] and tensor["dtype"] == "float32"
    assert image["num_channels"] == len(scenario.inputs)
    assert image["channel_def"] == {str(i): c for i, c in enumerate(scenario.inputs)}
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": scenario.target}
    # the pins are the project's own (environment.yml), so they install together
    pins = dict(re.findall(r"^\s*- ([\w-]+)==(\S+)", (REPO / "environment.yml").read_text(), re.M))
    packages = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], **meta["required_packages_version"]}
    for package, version in pins.items():
        if package in packages:
            assert packages[package] == version, f"{name}: {package} {packages[package]} but environment.yml pins {version}"
    assert {"monai", "torch", "pytorch-ignite", "nibabel", "SimpleITK"} <= set(pins) & set(packages)


@pytest.mark.skipif(not optional_import("jsonschema")[1], reason="jsonschema is not installed (MONAI's verify_metadata needs it)")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_verify_metadata(name):
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=str(BUNDLES / name / "configs" / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_SHA256,
        hash_type="sha256",
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_verify_net_in_out(name):
    from monai.bundle import verify_net_in_out

    folder = BUNDLES / name / "configs"
    verify_net_in_out(
        net_id="network_def", meta_file=str(folder / "metadata.json"), config_file=str(folder / "inference.json"),
        device="cpu", n=2,
    )


# --------------------------------------------------------------------------------------- command line

MONAI_BUNDLE_MAIN = str(Path(importlib.util.find_spec("monai.bundle.__main__").origin))


def test_misspelled_override_is_refused_before_any_work(tmp_path):
    """``--epoch 1`` for ``--epochs``: MONAI adds a key nothing reads, and the run trained its 60 epochs. Now the
    first initialize step names it, with the setting it resembles, before the dataset is even listed."""
    name = "ixi_t1_t2_to_pd"
    output = _bundle(name, "run", _configs(name, "train.json"), "--bundle_root", str(tmp_path), "--dataset_dir",
                     str(DATA), "--epoch", "1", *TINY, status=1)
    configs = BUNDLES / name / "configs" / "train.json"
    message = (f"ValueError: command line: --epoch is not a setting of {configs} (did you mean --epochs?). MONAI would "
               "add it as a new key that nothing reads.")
    # MONAI's traceback ends with "Failed to evaluate ConfigExpression"; ours names the cause after it
    assert output.rstrip().splitlines()[-1] == f"monai.bundle run failed: {message}", output[-3000:]
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


def test_a_failed_run_ends_with_its_cause(capsys):
    from agi_monai.bundle.command_line import _report_cause_last
    from agi_monai.data import DataError

    hook_before = sys.excepthook
    report_failures()
    assert sys.excepthook is hook_before  # set only in `python -m monai.bundle` itself (the --epoch test), not here
    printed = []
    hook = _report_cause_last(lambda *exc_info: printed.append(exc_info[0]))
    try:
        try:
            raise DataError("/data/case-t1.nii.gz", "is empty", "a NIfTI image")
        except DataError as error:
            raise RuntimeError("Failed to instantiate component 'agi_monai.bundle.load_split'") from error
    except RuntimeError as error:
        hook(type(error), error, error.__traceback__)
    assert printed == [RuntimeError]  # the traceback first, as before
    assert capsys.readouterr().err.splitlines()[-1] == (
        "monai.bundle run failed: /data/case-t1.nii.gz: is empty (expected a NIfTI image)")
    hook(KeyboardInterrupt, KeyboardInterrupt(), None)  # Ctrl-C: the traceback only
    assert printed == [RuntimeError, KeyboardInterrupt] and capsys.readouterr().err == ""


def test_command_line_check_accepts_what_monai_and_the_configs_define(tmp_path):
    name = "brats_t1_t2_to_flair"
    train, evaluate = _configs(name, "evaluate.json")
    both = f"['{train}','{evaluate}']"
    accepted = [
        ["run", "training", "--config_file", train, "--epochs", "1", "--network_def#channels", "[8,16,16,32]"],
        ["run", "--run_id=evaluating", f"--config_file={both}", "--validate#datalist#split", "test", "--protocols",
         "['slice2d']"],  # a key only evaluate.json has, '=' forms
        ["run", "--config_file", train, "--tracking", "mlflow", "--experiment_name", "x", "--amp"],  # a bare flag
        ["run", "--config_file", train, "--workflow_name", "ConfigWorkflow", "--workflow_type", "train"],  # MONAI's
        ["run", "--config-file", train, "-bundle-root", "b", "--val_interval", "-1", "--", "--trace"],  # Fire's forms
        ["verify_metadata", "--meta_file", "m.json", "--filepath", "schema.json"],  # no config file: nothing to check
    ]
    for arguments in accepted:
        check_command_line([MONAI_BUNDLE_MAIN, *arguments])
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": train, "my_root": "/data"}))
    check_command_line([MONAI_BUNDLE_MAIN, "run", "--args_file", str(args_file), "--my_root", "/other"])
    # Not `python -m monai.bundle` (a workflow run from Python, e.g. by MONAI Label): not checked.
    check_command_line(["/usr/bin/pytest", "--epoch", "1", "--config_file", train])


def test_command_line_check_names_every_unknown_override():
    name = "brats_t1_t2_to_flair"
    train = _configs(name, "train.json")[0]
    with pytest.raises(ValueError) as raised:
        check_command_line([MONAI_BUNDLE_MAIN, "run", "--config_file", train, "--val-intervall", "5", "--foo#bar", "3",
                            "--experiment_name", "x"])  # a tracking setting without --tracking
    assert str(raised.value) == (
        f"command line: --val_intervall is not a setting of {train} (did you mean --val_interval?); --foo#bar is not "
        f"a setting of {train} (the bundle's docs/README.md lists its settings); --experiment_name is not a setting of "
        f"{train} (the bundle's docs/README.md lists its settings). MONAI would add it as a new key that nothing reads."
    )


def test_command_line_check_refuses_a_truth_value_fire_reads_as_a_string():
    train, evaluate = _configs("brats_t1_t2_to_flair", "evaluate.json")
    both = f"['{train}','{evaluate}']"
    # (None: a bare flag, which Fire reads as True; MONAI's expressions and references are for it to evaluate)
    for accepted in ("False", "True", "0", "1", None, "$torch.cuda.is_available()", "@amp"):
        check_command_line([MONAI_BUNDLE_MAIN, "run", "--config_file", both, "--brain_mask",
                            *([accepted] if accepted else [])])
    check_command_line([MONAI_BUNDLE_MAIN, "run", "--config_file", both, "--amp", "False",
                        "--train#dataloader#shuffle", "True"])
    with pytest.raises(ValueError) as raised:
        check_command_line([MONAI_BUNDLE_MAIN, "run", "--config_file", both, "--brain_mask", "false", "--compile",
                            "maybe", "--amp", "false", "--train#dataloader#shuffle", "no", "--epoch", "1"])
    spelling = "the command line reads Python's spelling only, so {} would stay a string, which counts as true"
    assert str(raised.value) == (
        f"command line: --epoch is not a setting of {train} + {evaluate} (did you mean --epochs?). MONAI would add it "
        f"as a new key that nothing reads. --brain_mask false: {spelling.format(repr('false'))} (expected True or "
        f"False); --compile maybe is not True or False; --amp false: {spelling.format(repr('false'))} (expected True "
        f"or False); --train#dataloader#shuffle no: {spelling.format(repr('no'))} (expected True or False)."
    )


def test_resunet_baseline_is_one_override_away():
    from monai.bundle import verify_net_in_out

    folder = BUNDLES / "ixi_t1_t2_to_pd" / "configs"
    override = {"network_def#_target_": "agi_monai.networks.ResUNet"}
    verify_net_in_out(
        net_id="network_def", meta_file=str(folder / "metadata.json"), config_file=str(folder / "inference.json"),
        device="cpu", n=2, **override,
    )
    parser = ConfigParser()
    parser.read_config(str(folder / "train.json"))
    parser.update(override)
    assert type(parser.get_parsed_content("network_def")).__name__ == "ResUNet"


# -------------------------------------------------------------------------------------------- the helpers


def test_load_split_folder_without_datalist_uses_every_case(caplog):
    cases = load_split(DATA / "ixi-sim", "validation", ["T1", "T2", "PD"])
    assert [c["case_id"] for c in cases] == ["IXI901-SIM-0001"]
    assert "has no datalist.json" in caplog.text


def test_load_split_reads_a_datalist_split(tmp_path):
    case = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
    files = {c: str(next(case.glob(f"*-{t}.nii.gz"))) for c, t in [("T1", "t1n"), ("T2", "t2w"), ("FLAIR", "t2f")]}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [files], "test": []}))
    assert len(load_split(tmp_path, "training", ["T1", "T2", "FLAIR"])) == 1
    assert load_split(tmp_path / "datalist.json", "test", ["T1"]) == []


def test_loss_terms_and_rank_handlers(monkeypatch):
    output = {"pred": torch.zeros(2, 1, 4, 4), "loss": 3.0, "g_loss": 3.0, "d_loss": 0.5}
    assert loss_terms(output) == {"g_loss": 3.0, "d_loss": 0.5} == loss_terms([output, output])
    # multi_gpu_train.json's train handlers: all on rank 0, only the validation and the non-finite stop elsewhere
    validation = ValidationHandler(1, validator=None)
    stop, stats = StopOnNonFiniteTraining({"generator": torch.nn.Linear(1, 1)}, "models"), StatsHandler()
    assert rank_handlers([stats, validation, stop]) == [stats, validation, stop]  # no process group: one process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    assert rank_handlers([stats, validation, stop]) == [validation, stop]


def test_folder_synthesis_reports_any_error_and_goes_on(tmp_path):
    from monai.data import Dataset
    from monai.inferers import SimpleInferer

    class Network(torch.nn.Module):
        def forward(self, x):  # fails on the second case, as a CUDA out-of-memory error would
            if x.shape[-1] == 3:
                raise RuntimeError("out of memory")
            return x[:, :1]

    written = []
    cases = [{"case_id": "a", "image": torch.rand(2, 8, 8, 4)}, {"case_id": "b", "image": torch.rand(2, 8, 8, 3)}]
    summary = FolderSynthesis(
        Dataset(cases), Network(), SimpleInferer(), lambda item: written.append(item["pred"].shape), tmp_path, "PD",
        skipped=[Failure("c", "missing T2")], progress=False,
    )()
    assert written == [(1, 8, 8, 4)] and summary.written == [tmp_path / "a_PD.nii.gz"]
    assert [str(f) for f in summary.failures] == ["c: missing T2", "b: RuntimeError: out of memory"]
    assert str(summary).splitlines()[0] == f"synthesized 1 of 3 cases into {tmp_path}, 2 failed"
    # inference.json's exit_on_failure: every case is still run and written, then exit status 1 (a scheduler's
    # signal); none when every case was written
    written.clear()
    with pytest.raises(SystemExit) as stopped:
        FolderSynthesis(Dataset(cases), Network(), SimpleInferer(), lambda item: written.append(item["pred"].shape),
                        tmp_path, "PD", progress=False, exit_on_failure=True)()
    assert stopped.value.code == 1 and written == [(1, 8, 8, 4)]
    summary = FolderSynthesis(Dataset(cases[:1]), Network(), SimpleInferer(), lambda item: None, tmp_path, "PD",
                              progress=False, exit_on_failure=True)()
    assert summary.written == [tmp_path / "a_PD.nii.gz"] and summary.failures == []


def test_folder_synthesis_without_overwrite_keeps_outputs_already_present_and_says_so(tmp_path, capsys):
    from monai.data import Dataset
    from monai.inferers import SimpleInferer

    class FirstChannel(torch.nn.Module):
        def forward(self, x):
            return x[:, :1]

    def synthesized(path, by):  # a NIfTI marked as every synthesis marks its output, saying which run wrote it
        image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
        image.header["descrip"] = synthetic_description("PD", ["T1", "T2"], by)
        nib.save(image, path)

    def written_by(path):
        return np.asarray(nib.load(path).header["descrip"]).item().decode().rsplit(" by ", 1)[1]

    def write(item):  # the file the bundle's SaveImaged writes, under the name FolderSynthesis expects
        synthesized(tmp_path / f"{item['case_id']}_PD.nii.gz", "this run")

    def run(cases, **kwargs):
        summary = FolderSynthesis(Dataset(cases), FirstChannel(), SimpleInferer(), write, tmp_path, "PD", **kwargs)()
        printed = capsys.readouterr()
        return summary, printed.out.splitlines(), printed.err

    cases = [{"case_id": c, "image": torch.rand(2, 8, 8, 4)} for c in ("a", "b", "c")]
    synthesized(tmp_path / "b_PD.nii.gz", "an earlier run")
    summary, out, bar = run(cases, overwrite=False)
    assert summary.written == [tmp_path / "a_PD.nii.gz", tmp_path / "c_PD.nii.gz"]
    assert summary.present == [tmp_path / "b_PD.nii.gz"] and summary.failures == []
    assert written_by(tmp_path / "b_PD.nii.gz") == "an earlier run"
    assert out == [f"synthesized 2 of 3 cases into {tmp_path}, 1 already present (skipped), 0 failed"]
    assert "3/3 [" in bar and bar.rstrip().endswith("1 already present (skipped), 0 failed]"), bar

    # a SliceInferer's case shows a bar over its slices too (before: a case of minutes left the bar at 0/1)
    from monai.inferers import SliceInferer

    summary = FolderSynthesis(Dataset(cases[:1]), FirstChannel(), SliceInferer(roi_size=(8, 8), sw_batch_size=3,
                              spatial_dim=2), write, tmp_path / "slices", "PD")()
    assert summary.written == [tmp_path / "slices" / "a_PD.nii.gz"]
    bar = capsys.readouterr().err
    assert "\ra:   0%|          | 0/4 [" in bar and "slice/s]" in bar, bar  # drawn, then cleared (leave=False)
    from agi_monai.engines.inference import infer_case

    batches = []  # what the bar is updated with: each batch's slices
    infer_case(FirstChannel(), SliceInferer(roi_size=(8, 8), sw_batch_size=3, spatial_dim=2), cases[0]["image"],
               on_batch=batches.append)
    assert batches == [3, 1]

    # a rerun over the same folder: every output is there, nothing is read or written, and the bar and line say so
    summary, out, bar = run(cases, overwrite=False)
    assert summary.written == [] and len(summary.present) == 3
    assert out == [f"synthesized 0 of 3 cases into {tmp_path}, 3 already present (skipped), 0 failed"]
    # (and no count-only bar "0case [...]"; a rate like "21076.90case/s" is not one)
    assert "3/3 [" in bar and bar.rstrip().endswith("3 already present (skipped), 0 failed]")
    assert not re.search(r"\b0case\b(?!/s)", bar), bar
    assert written_by(tmp_path / "b_PD.nii.gz") == "an earlier run"
    summary, out, _ = run(cases[1:2], progress=False)  # the default, as MONAI's SaveImage: replaced
    assert summary.written == [tmp_path / "b_PD.nii.gz"] and written_by(tmp_path / "b_PD.nii.gz") == "this run"
    assert out == [f"synthesized 1 of 1 cases into {tmp_path}, 0 failed"]

    # a file there that no synthesis wrote (an acquired scan named like the output) is neither kept as a result nor
    # replaced, with or without overwrite: the case fails, naming it
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), tmp_path / "b_PD.nii.gz")
    acquired = (tmp_path / "b_PD.nii.gz").read_bytes()
    for overwrite in (False, True):
        summary, out, _ = run(cases[1:2], overwrite=overwrite, progress=False)
        assert summary.written == summary.present == [] and (tmp_path / "b_PD.nii.gz").read_bytes() == acquired
        assert out[1] == (f"  - b: {tmp_path / 'b_PD.nii.gz'}: exists and was not written by a synthesis (its NIfTI "
                          "header is not marked SYNTHETIC), so it is left as it was (expected another --output_dir, or "
                          "that file moved away)")

    # an output of ours cut short from outside (its header still marked) is not "present": it is written again
    earlier = nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 32), dtype=np.float32), np.eye(4))
    earlier.header["descrip"] = synthetic_description("PD", ["T1", "T2"], "an earlier run")
    nib.save(earlier, tmp_path / "b_PD.nii.gz")
    whole = (tmp_path / "b_PD.nii.gz").read_bytes()
    (tmp_path / "b_PD.nii.gz").write_bytes(whole[: len(whole) // 2])  # its header still reads SYNTHETIC
    assert not nifti_is_complete(tmp_path / "b_PD.nii.gz") and nifti_is_complete(tmp_path / "a_PD.nii.gz")
    summary, out, bar = run(cases, overwrite=False)
    assert summary.written == [tmp_path / "b_PD.nii.gz"] and len(summary.present) == 2
    assert written_by(tmp_path / "b_PD.nii.gz") == "this run"

    # cases left out before the run count in the bar as in the summary line (before: "2/2 ... 1 failed" beside
    # "synthesized 2 of 3 cases")
    for path in tmp_path.glob("*_PD.nii.gz"):
        path.unlink()
    summary, out, bar = run(cases[:2], skipped=[Failure("d", "missing T2")])
    assert out[0] == f"synthesized 2 of 3 cases into {tmp_path}, 1 failed"
    assert "3/3 [" in bar and bar.rstrip().endswith("1 failed]"), bar

    # every case left out before the run (the CLI's existing outputs, discovery's bad cases): no bar over nothing
    summary, out, bar = run([], skipped=[Failure("d", "missing T2")])
    assert bar == "" and out == [f"synthesized 0 of 1 cases into {tmp_path}, 1 failed", "  - d: missing T2"]


# ------------------------------------------------------------------------------- inference and export


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory):
    """A bundle root holding an untrained tiny-width generator as ``models/model.pt`` (the training output's format)."""
    root = tmp_path_factory.mktemp("brats_t1_t2_flair_to_t1gd")
    (root / "models").mkdir()
    torch.manual_seed(0)
    network = AGINet(in_channels=3, channels=[8, 16, 16, 32])
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def test_inference_writes_each_case_on_its_input_grid_and_reports_a_bad_case(untrained_bundle, tmp_path):
    good = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
    cases = tmp_path / "cases"
    (cases / "good").mkdir(parents=True)
    for f in good.iterdir():  # as a registration tool writes them: "aligned to another file", no qform
        image = nib.load(f)
        image.set_sform(image.affine, code=2)
        image.set_qform(image.affine, code=0)
        nib.save(image, cases / "good" / f.name)
    (cases / "bad").mkdir()
    for f in good.glob("*-t2[wf].nii.gz"):
        (cases / "bad" / f.name.replace("BraTS-GLI-00001-000", "BraTS-GLI-99999-000")).symlink_to(f)
    truncated = gzip.compress((good / "BraTS-GLI-00001-000-t1n.nii.gz").read_bytes())[:5000]
    (cases / "bad" / "BraTS-GLI-99999-000-t1n.nii.gz").write_bytes(truncated)
    output = tmp_path / "out"
    name = "brats_t1_t2_flair_to_t1gd"
    log = _bundle(  # `run evaluating`: the model zoo's run ID for inference, an alias of `run`
        name, "run evaluating", _configs(name, "inference.json"), "--bundle_root", str(untrained_bundle),
        "--dataset_dir", str(cases), "--output_dir", str(output), *TINY, "--report_path", str(tmp_path / "report.json"),
        status=1,  # 1: a case failed
    )
    assert "synthesized 1 of 2 cases" in log and "1 failed" in log and "Traceback" not in log
    assert "BraTS-GLI-99999-000: " in log and "t1n.nii.gz" in log
    report = json.loads((tmp_path / "report.json").read_text())  # for a pipeline, written before the exit status
    assert report["counts"] == {"cases": 2, "written": 1, "present": 0, "failed": 1}
    assert [(case["case_id"], case["status"]) for case in report["cases"]] == [
        ("BraTS-GLI-00001-000", "written"), ("BraTS-GLI-99999-000", "failed")]
    assert sorted(p.name for p in output.iterdir()) == ["BraTS-GLI-00001-000_T1Gd.nii.gz"]  # no partial file
    written = nib.load(output / "BraTS-GLI-00001-000_T1Gd.nii.gz")
    reference = nib.load(good / "BraTS-GLI-00001-000-t2w.nii.gz")  # T2: the reference input's grid
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 0)  # the inputs'
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0
    assert written.header["descrip"].item() == b"SYNTHETIC T1Gd from T1,T2,FLAIR by brats_t1_t2_flair_to_t1gd"


def test_inference_keeps_slices_larger_than_spatial_size_whole(untrained_bundle, tmp_path):
    """inference.json pads and never crops: with --spatial_size [64,64] the 240x240 BraTS slices are synthesized
    whole (a crop left everything outside the central 64x64 as zeros), the same as at the bundle's own 240x240."""
    name, dataset = "brats_t1_t2_flair_to_t1gd", tmp_path / "cases"
    case = dataset / "BraTS-GLI-00001-000"
    case.mkdir(parents=True)
    for file in (DATA / "brats2023-gli" / case.name).glob("*-t[12]*.nii.gz"):  # 8 slices of 240x240 are enough
        nib.save(nib.load(file).slicer[:, :, 70:78], case / file.name)
    written = {}
    for size in ("[64,64]", "[240,240]"):
        output = tmp_path / size.strip("[]").replace(",", "x")
        _bundle(
            name, "run", _configs(name, "inference.json"), "--bundle_root", str(untrained_bundle), "--dataset_dir",
            str(dataset), "--output_dir", str(output), "--spatial_size", size, *TINY,
        )
        written[size] = nib.load(output / "BraTS-GLI-00001-000_T1Gd.nii.gz")
    small, full = (np.asarray(image.dataobj) for image in written.values())
    assert small.shape == full.shape == (240, 240, 8)
    outside = np.ones(small.shape[:2], bool)
    outside[88:152, 88:152] = False  # the central 64x64 a crop kept
    assert np.count_nonzero(small[outside]) > 0.1 * small[outside].size
    np.testing.assert_allclose(small, full, atol=1e-5)


def test_inference_warns_about_a_case_on_another_spacing_than_the_training_data(untrained_bundle, tmp_path):
    from agi_monai.data import spacing_mismatch

    case = DATA / "brats2023-gli" / "BraTS-GLI-00001-000"
    fine = tmp_path / "cases" / "fine"  # the same voxels on a 0.5 mm grid: a finer scan than the 1 mm training data
    fine.mkdir(parents=True)
    for file in case.glob("*-t[12]*.nii.gz"):
        image = nib.load(file).slicer[:, :, 70:78]
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([0.5, 0.5, 1.0, 1.0]) @ image.affine), fine / file.name)
    name = "brats_t1_t2_flair_to_t1gd"
    log = _bundle(
        name, "run", _configs(name, "inference.json"), "--bundle_root", str(untrained_bundle), "--dataset_dir",
        str(tmp_path / "cases"), "--output_dir", str(tmp_path / "out"), *TINY,
    )
    assert ("BraTS-GLI-00001-000: in-plane spacing 0.5 x 0.5 mm, the bundle's training data 1 x 1 mm: the network "
            "sees the anatomy at another scale") in log
    assert (tmp_path / "out" / "BraTS-GLI-00001-000_T1Gd.nii.gz").is_file()  # synthesized all the same
    image = MetaTensor(torch.zeros(1, 8, 8, 2), affine=torch.diag(torch.tensor([0.8, 1.2, 3.0, 1.0])))
    assert spacing_mismatch(image, [1.0, 1.0]) is None and spacing_mismatch(image, None) is None  # within 25 %
    assert "0.8 x 1.2 mm" in spacing_mismatch(image, [0.5, 0.5])


def test_inference_with_weights_of_other_widths_names_the_file(untrained_bundle, tmp_path):
    name = "brats_t1_t2_flair_to_t1gd"  # untrained_bundle's model.pt has widths (8, 16, 16, 32); no TINY override here
    weights = untrained_bundle / "models" / "model.pt"
    before = weights.read_bytes()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(name, "inference.json")[0],
           "--bundle_root", str(untrained_bundle), "--dataset_dir", str(DATA / "brats2023-gli"),
           "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert (
        f"{weights}: does not fit AGINet of this config: 136 tensor(s) of another shape (e.g. head.weight "
        "(8, 3, 3, 3) in the file, (64, 3, 3, 3) here) (expected the weights this bundle's train.json writes "
        "(models/model.pt), of a run with the same network_def)"
    ) in result.stderr, result.stderr[-3000:]
    assert weights.read_bytes() == before and not (tmp_path / "out").exists()


def test_export_torchscript_loads_in_a_fresh_process(untrained_bundle):
    name = "brats_t1_t2_flair_to_t1gd"
    folder = BUNDLES / name / "configs"
    ts = untrained_bundle / "models" / "model.ts"
    result = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", str(ts),
            "--ckpt_file", str(untrained_bundle / "models" / "model.pt"), "--meta_file", str(folder / "metadata.json"),
            "--config_file", str(folder / "inference.json"), "--bundle_root", str(untrained_bundle), *TINY,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    check = (
        "import torch, agi_monai\n"  # registers the compiled op the TorchScript file calls
        f"ts = torch.jit.load({str(ts)!r})\n"
        "x = torch.rand(2, 3, 48, 40)\n"
        "with torch.no_grad(): a = ts(x)\n"
        "from agi_monai.networks import AGINet\n"
        "net = AGINet(in_channels=3, channels=[8, 16, 16, 32]).eval()\n"
        f"net.load_state_dict(torch.load({str(untrained_bundle / 'models' / 'model.pt')!r}, weights_only=True))\n"
        "with torch.no_grad(): b = net(x)\n"
        "assert a.shape == (2, 1, 48, 40), a.shape\n"
        "torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    fresh = subprocess.run([sys.executable, "-c", check], cwd="/", capture_output=True, text=True, timeout=300, env=ENV)
    assert fresh.returncode == 0 and fresh.stdout.strip().endswith("ok"), fresh.stderr[-4000:]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_bundle_exports_to_torchscript(name, tmp_path):
    from monai.bundle import ckpt_export

    scenario = SCENARIOS[name]
    network = AGINet(scenario.spatial_dims, in_channels=len(scenario.inputs), channels=[8, 16, 16, 32])
    torch.save(network.state_dict(), tmp_path / "model.pt")
    folder = BUNDLES / name / "configs"
    ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(folder / "metadata.json"), config_file=str(folder / "inference.json"),
        bundle_root=str(tmp_path), **{"network_def#channels": [8, 16, 16, 32]},
    )
    x = torch.rand(1, len(scenario.inputs), 32, 24, *[16] * (scenario.spatial_dims - 2))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(tmp_path / "model.ts")(x), network.eval()(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ training, evaluate


def _train_args(root: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--epochs", "1", "--val_interval", "2",
        "--batch_size", "2", "--num_workers", "0", "--spatial_size", "[64,64]", *TINY, *TINY_D, *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dataset, resume",
    [("ixi_t1_t2_to_pd", DATA / "ixi-sim", True), ("brats_t1_t2_to_flair", DATA / "brats2023-gli", False)],
)
def test_two_iterations_train_resume_and_evaluate(name, dataset, resume, tmp_path):
    pytest.importorskip("agi_monai.engines")
    # `run training` / `run evaluating`: the model zoo's run IDs, aliases of `run` (the resume below uses `run`)
    log = _bundle(name, "run training", _configs(name, "train.json"), *_train_args(tmp_path, dataset))
    assert "val_psnr" in log
    assert re.search(r"validation: \[\d+/\d+\]", log), log[-3000:]  # the validator's own progress bar
    models = tmp_path / "models"
    summary = re.search(r"training done: iterations 1-2 of 2 \(epoch 1 of 1\) in .*; best val_psnr (\S+): (\S+);", log)
    assert summary and summary.group(2) == str(models / "model.pt"), log[-3000:]
    best = torch.load(models / "model.pt", weights_only=True)  # the generator's state only
    AGINet(in_channels=2, channels=[8, 16, 16, 32]).load_state_dict(best)
    (first,) = models.glob("training_checkpoint_*.pt")
    state = torch.load(first, weights_only=True)
    assert {"generator", "discriminator", "g_optimizer", "d_optimizer", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2

    if resume:  # a second epoch continues at iteration 2 and ends at 4 (resume is the same for every bundle)
        _resume(name, dataset, tmp_path, first)

    log = _bundle(name, "run evaluating", _configs(name, "evaluate.json"), *_train_args(tmp_path, dataset))
    assert "evaluating: [1/1]" in log, log[-3000:]  # one case: a bar over cases
    # evaluate.json: one row per test case (the folder's one case), both protocols, a summary stating each protocol
    scenario = SCENARIOS[name]
    (case,) = load_split(dataset, "test", [*scenario.inputs, scenario.target])
    lines = (tmp_path / "eval" / "metrics_per_case.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert [row["case_id"] for row in rows] == [case["case_id"]]
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert set(summary["protocols"]) == {"slice2d", "brasyn3d"} and summary["failed"] == [] and summary["cases"] == 1
    for protocol, entry in summary["protocols"].items():
        assert entry["protocol"]["data_range"] == 1.0 and entry["protocol"]["mask"] == "brain mask"
        for metric in ("psnr_db", "ssim_pct", "mae_x100"):
            value = float(rows[0][f"{protocol}_{metric}"])
            assert np.isfinite(value) and entry["metrics"][metric]["mean"] == value
            assert f"{protocol}_{metric}: " in log  # StatsHandler printed the means
    assert "| PSNR (dB) |" in (tmp_path / "eval" / "metrics_summary.md").read_text()


def _resume(name: str, dataset: Path, tmp_path: Path, first: Path) -> None:
    models = tmp_path / "models"
    best_before = (models / "model.pt").read_bytes()
    first_ranking = torch.load(first, weights_only=True)["best_model_ranking"]["_saved"]
    assert len(first_ranking) == 1  # (score, name) of the best generator so far, saved as models/model.pt
    # "latest" finds the newest training checkpoint of models/ (here the only one, epoch 1)
    # what an interrupted run logged after that checkpoint (its iterations 3-4, then lost): the resumed run's logging
    # of those iterations replaces it in TensorBoard (purge_step) instead of zig-zagging beside it
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "eval")) as lost:
        for step in (3, 4):
            lost.add_scalar("g_loss", 999.0, step)
    # with a lower --learning_rate (the advice after a divergence): this run's, not the checkpoint's optimizer state's
    log = _bundle(
        name, "run", _configs(name, "train.json"),
        *_train_args(tmp_path, dataset, "--epochs", "2", "--resume_ckpt", "latest", "--learning_rate", "5e-05"),
    )
    assert f"Restored all variables from {first}" in log
    assert "Epoch: 2/2, Iter: 1/2" in log and "Epoch: 1/2" not in log
    for optimizer in ("g_optimizer", "d_optimizer"):
        assert f"{optimizer}: learning rate 5e-05, this run's, instead of the checkpoint's 0.0001" in log, log[-3000:]
        groups = torch.load(models / "training_checkpoint_epoch=2.pt", weights_only=True)[optimizer]["param_groups"]
        assert [group["lr"] for group in groups] == [5e-05]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    g_loss = [(event.step, event.value) for event in events.Scalars("g_loss")]
    assert [step for step, _ in g_loss] == [1, 2, 3, 4] and 999.0 not in [value for _, value in g_loss], g_loss
    assert "training done: iterations 3-4 of 4 (epoch 2 of 2)" in log
    # the earlier run's checkpoint is superseded (n_saved=1), not left beside the new one
    assert sorted(p.name for p in models.glob("training_checkpoint_*.pt")) == ["training_checkpoint_epoch=2.pt"]
    resumed = torch.load(models / "training_checkpoint_epoch=2.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 4
    # model.pt was replaced only if the second validation beat the restored best score
    (best_score, _), = first_ranking
    (new_score, _), = resumed["best_model_ranking"]["_saved"]
    assert new_score >= best_score
    assert ((models / "model.pt").read_bytes() == best_before) == (new_score == best_score)


@pytest.mark.slow
def test_training_whose_weights_become_non_finite_stops_and_keeps_the_last_checkpoint(tmp_path):
    # a real run on real slices, then a resume whose generator objective is infinite (l1_weight inf): its first
    # step makes the generator's weights NaN; the run must stop there, before epoch 2's validation and checkpoint
    name, dataset = "brats_t1_t2_to_flair", DATA / "brats2023-gli"
    _bundle(name, "run", _configs(name, "train.json"), *_train_args(tmp_path, dataset))
    models = tmp_path / "models"
    checkpoint = models / "training_checkpoint_epoch=1.pt"
    saved = {path.name: path.read_bytes() for path in models.glob("*.pt")}
    assert set(saved) == {checkpoint.name, "model.pt"}
    log = _bundle(
        name, "run", _configs(name, "train.json"),
        *_train_args(tmp_path, dataset, "--epochs", "2", "--resume_ckpt", "latest", "--l1_weight", "$float('inf')"),
        status=1,
    )
    last = log.strip().splitlines()[-1]
    assert last.startswith(
        "monai.bundle run failed: NonFiniteTrainingError: training stopped at iteration 3 of 4 (epoch 2 of 2): the "
        "losses are not finite (g_loss inf"
    ), log[-3000:]
    assert "and the weights of the generator ('" in last and "discriminator (" not in last  # its loss was finite
    assert last.endswith(
        f"Nothing of epoch 2 was validated or saved; --resume_ckpt latest continues from {checkpoint}. "
        "A lower --learning_rate usually avoids this"
    ), last
    assert "training done" not in log
    assert {path.name: path.read_bytes() for path in models.glob("*.pt")} == saved  # nothing written over


def test_non_finite_training_guard_tolerates_a_skipped_step_and_stops_on_non_finite_weights(tmp_path, caplog):
    from ignite.engine import Engine, Events
    from monai.handlers import from_engine

    network = torch.nn.Linear(2, 1)
    losses = {2: float("inf"), 3: float("nan"), 5: float("inf")}  # 2-3: steps a gradient scaler would skip

    def step(engine, batch):
        if engine.state.iteration == 5:  # this step breaks the weights
            network.weight.data[0, 1] = float("nan")
        return {"g_loss": losses.get(engine.state.iteration, 0.5), "d_loss": 0.7, "pred": torch.zeros(1)}

    (tmp_path / "training_checkpoint_epoch=1.pt").write_bytes(b"")
    trainer = Engine(step)
    StopOnNonFiniteTraining({"generator": network}, tmp_path, patience=3).attach(trainer)
    with caplog.at_level("WARNING"), pytest.raises(NonFiniteTrainingError) as stopped:
        trainer.run(range(3), max_epochs=3)
    assert str(stopped.value) == (
        "training stopped at iteration 5 of 9 (epoch 2 of 3): the losses are not finite (g_loss inf, d_loss 0.7) and the "
        "weights of the generator ('weight' first) are no longer finite. Nothing of epoch 2 was validated or saved; "
        f"--resume_ckpt latest continues from {tmp_path / 'training_checkpoint_epoch=1.pt'}. A lower --learning_rate "
        "usually avoids this"
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "agi_monai.bundle.handlers"]
    assert warnings == [
        "iteration 2: the losses are not finite (g_loss inf, d_loss 0.7) but the weights still are (1 of 3 such "
        "iterations in a row before the run stops)",
        "iteration 3: the losses are not finite (g_loss nan, d_loss 0.7) but the weights still are (2 of 3 such "
        "iterations in a row before the run stops)",
    ]

    # losses that stay non-finite with finite weights (a forward pass that overflows): stop after `patience`
    def overflowing(engine, batch):
        return {"g_loss": float("inf") if engine.state.iteration >= 2 else 0.5}

    trainer = Engine(overflowing)
    StopOnNonFiniteTraining({"generator": torch.nn.Linear(2, 1)}, tmp_path / "none", patience=3).attach(trainer)
    with pytest.raises(NonFiniteTrainingError, match=re.escape(
        "training stopped at iteration 4 of 6 (epoch 2 of 2): the losses have not been finite for 3 iterations in a "
        "row (g_loss inf), though the weights still are."
    )) as stopped:
        trainer.run(range(3), max_epochs=2)
    assert "no training checkpoint was written: a rerun starts afresh" in str(stopped.value)

    # weights broken by the epoch's last step while its loss was finite: stopped before the epoch's later handlers
    # (the validation and the checkpoint saver), and a SupervisedTrainer's single loss value is read too
    network = torch.nn.Linear(2, 1)

    def last_step_breaks(engine, batch):
        if engine.state.iteration == 3:
            network.bias.data.fill_(float("inf"))
        return [{"loss": torch.tensor(0.5)}]

    trainer = Engine(last_step_breaks)
    guard = StopOnNonFiniteTraining({"network": network}, tmp_path, output_transform=from_engine(["loss"], first=True))
    guard.attach(trainer)  # as brats_segmentation/configs/train.json has it
    checkpoints = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: checkpoints.append(engine.state.epoch))
    with pytest.raises(NonFiniteTrainingError, match=re.escape(
        "training stopped at iteration 3 of 6 (epoch 1 of 2): the weights of the network ('bias' first) are no longer "
        "finite. Nothing of epoch 1"
    )):
        trainer.run(range(3), max_epochs=2)
    assert checkpoints == []

    # weights broken by a step make the next one fail before any loss is seen (a too high learning rate: the
    # discriminator's NaN logits in the generator's BCE, NaN offsets refused by group_roll): before, that error ended
    # the run, naming neither the weights nor what to do; an error with finite weights is raised as it is
    network = torch.nn.Linear(2, 1)

    def breaks_then_fails(engine, batch):
        if engine.state.iteration == 2:
            raise RuntimeError("group_roll: offsets must be finite, got NaN or Inf in offsets of shape [2, 8, 2]\nmore")
        network.weight.data.fill_(float("nan"))
        return {"g_loss": 0.5, "d_loss": 0.7}

    trainer = Engine(breaks_then_fails)
    StopOnNonFiniteTraining({"generator": network}, tmp_path).attach(trainer)
    with pytest.raises(NonFiniteTrainingError) as stopped:
        trainer.run(range(3), max_epochs=1)
    assert str(stopped.value) == (
        "training stopped at iteration 2 of 3 (epoch 1 of 1): the weights of the generator ('weight' first) are no "
        "longer finite, and then RuntimeError: group_roll: offsets must be finite, got NaN or Inf in offsets of shape "
        f"[2, 8, 2]. Nothing of epoch 1 was validated or saved; --resume_ckpt latest continues from "
        f"{tmp_path / 'training_checkpoint_epoch=1.pt'}. A lower --learning_rate usually avoids this"
    )
    # finite weights whose activations overflow (seen with --learning_rate 1 on real slices): the BCE's refusal
    def overflows(engine, batch):
        raise RuntimeError("all elements of input should be between 0 and 1")

    trainer = Engine(overflows)
    StopOnNonFiniteTraining({"generator": torch.nn.Linear(2, 1)}, tmp_path / "none").attach(trainer)
    with pytest.raises(NonFiniteTrainingError, match=re.escape(
        "training stopped at iteration 1 of 3 (epoch 1 of 1): a forward pass gave values that are not finite though "
        "the weights still are (they overflowed): RuntimeError: all elements of input should be between 0 and 1. "
        "Nothing of epoch 1 was validated or saved; no training checkpoint was written"
    )):
        trainer.run(range(3), max_epochs=1)
    trainer = Engine(lambda engine, batch: 1 / 0)
    StopOnNonFiniteTraining({"generator": torch.nn.Linear(2, 1)}, tmp_path).attach(trainer)
    with pytest.raises(ZeroDivisionError):
        trainer.run(range(3), max_epochs=1)
    with pytest.raises(ValueError, match="patience 0: expected a positive number of iterations"):
        StopOnNonFiniteTraining({"network": network}, tmp_path, patience=0)


@pytest.mark.slow
def test_3d_bundle_trains_on_patches_evaluates_and_synthesizes_on_the_input_grid(tmp_path):
    """The 3D bundle end to end on the real BraTS case: 2 iterations on 32^3 patches of a 64x64 in-plane crop
    (its volumes kept once in the cache), validation and evaluation by sliding window, then folder inference; on
    the case's central 96 x 96 x 48 voxels (18 s; the whole volume took 57 s, most of it in the sliding windows)."""
    name, dataset = "brats_t1_t2_flair_to_t1gd_3d", tmp_path / "cases"
    case = dataset / "BraTS-GLI-00001-000"
    case.mkdir(parents=True)
    for file in (DATA / "brats2023-gli" / case.name).glob("*.nii.gz"):
        nib.save(nib.load(file).slicer[72:168, 72:168, 54:102], case / file.name)
    args = [*_train_args(tmp_path, dataset), "--patch_size", "[32,32,32]", "--samples_per_volume", "2"]
    log = _bundle(name, "run training", _configs(name, "train.json"), *args)
    assert "training done: iterations 1-2 of 2 (epoch 1 of 1)" in log and "val_ssim" in log
    network = AGINet(3, in_channels=3, channels=[8, 16, 16, 32])
    network.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    # the volume was preprocessed once, every slice kept, for training and validation alike
    (stored,) = (tmp_path / "eval" / "cache").rglob("*.npy")
    assert np.load(stored, mmap_mode="r").shape == (48, 5, 64, 64)  # slices, (3 inputs, target, mask), H, W

    log = _bundle(name, "run evaluating", _configs(name, "evaluate.json"), *args)
    assert "evaluating: [1/1]" in log, log[-3000:]
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["cases"] == 1 and summary["failed"] == []
    assert np.isfinite(summary["protocols"]["brasyn3d"]["metrics"]["ssim_pct"]["mean"])

    output = tmp_path / "out"
    _bundle(
        name, "run", _configs(name, "inference.json"), "--bundle_root", str(tmp_path), "--dataset_dir", str(dataset),
        "--output_dir", str(output), "--spatial_size", "[64,64]", "--patch_size", "[32,32,32]", *TINY,
    )
    written = nib.load(output / "BraTS-GLI-00001-000_T1Gd.nii.gz")
    reference = nib.load(case / "BraTS-GLI-00001-000-t2w.nii.gz")
    assert written.shape == reference.shape == (96, 96, 48)
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0


def test_resume_checkpoint_resolution(tmp_path):
    from agi_monai.engines import find_resume_checkpoint

    assert find_resume_checkpoint("", tmp_path) == ""
    assert find_resume_checkpoint("latest", tmp_path) == ""  # nothing yet: start afresh
    for epoch in (2, 10, 9):
        (tmp_path / f"training_checkpoint_epoch={epoch}.pt").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    assert find_resume_checkpoint("latest", tmp_path) == str(tmp_path / "training_checkpoint_epoch=10.pt")
    assert find_resume_checkpoint(tmp_path / "model.pt", tmp_path) == str(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match=r"resume_ckpt: .*missing\.pt does not exist; expected a training"):
        find_resume_checkpoint(tmp_path / "missing.pt", tmp_path)


def test_training_summary_line_for_a_run_a_resumed_run_and_a_finished_one(tmp_path, capsys):
    from types import SimpleNamespace

    from ignite.engine import Engine, Events

    # the best-model saver as TrainingSummary reads it: MONAI's save_dir, the ranking's scores and its fixed file name
    ranking = SimpleNamespace(
        state_dict=lambda: {"_saved": [(21.5, "model_key_metric=21.5.pt"), (23.25, "model_key_metric=23.25.pt")]},
        save_handler=SimpleNamespace(filename="model.pt"),
    )
    saver = SimpleNamespace(save_dir=str(tmp_path), key_metric_ranking=ranking)
    (tmp_path / "training_checkpoint_epoch=2.pt").write_bytes(b"")
    trainer = Engine(lambda engine, batch: None)
    TrainingSummary(tmp_path, saver).attach(trainer)
    trainer.run(range(3), max_epochs=2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"training done: iterations 1-6 of 6 \(epochs 1-2 of 2\) in 0:00:\d\d\.\d; best val_psnr 23\.2500: "
        rf"{re.escape(str(tmp_path / 'model.pt'))}; --resume_ckpt latest continues from "
        rf"{re.escape(str(tmp_path / 'training_checkpoint_epoch=2.pt'))}",
        line,
    ), line

    def resumed(iteration: int, epoch: int) -> Engine:
        """A trainer whose state a checkpoint restores when it starts (as the bundles' CheckpointLoader does)."""
        engine = Engine(lambda engine, batch: None)
        TrainingSummary(tmp_path, saver).attach(engine)
        engine.add_event_handler(Events.STARTED, lambda e: e.state.__dict__.update(iteration=iteration, epoch=epoch))
        return engine

    resumed(6, 2).run(range(3), max_epochs=3)
    assert "training done: iterations 7-9 of 9 (epoch 3 of 3) in " in capsys.readouterr().out
    resumed(9, 3).run(range(3), max_epochs=3)
    assert "training done: nothing to train, all 3 epochs were done" in capsys.readouterr().out

    empty = SimpleNamespace(save_dir=str(tmp_path), key_metric_ranking=SimpleNamespace(state_dict=lambda: {"_saved": []}))
    untrained = Engine(lambda engine, batch: None)
    TrainingSummary(tmp_path / "none", empty).attach(untrained)
    untrained.run(range(2), max_epochs=1)
    assert capsys.readouterr().out.strip().endswith(
        "(epoch 1 of 1) in 0:00:00.0; no validation yet, so no best model"
    )


def test_the_summary_is_the_last_line_of_a_run_after_ignites_own(tmp_path, capsys):
    import logging

    from ignite.engine import Engine

    from agi_monai.bundle import run_training

    trainer = Engine(lambda engine, batch: None)
    ignite_lines = logging.StreamHandler(sys.stdout)  # (the captured stdout: one stream keeps the order)
    trainer.logger.addHandler(ignite_lines)
    trainer.logger.setLevel(logging.INFO)
    try:
        TrainingSummary(tmp_path).attach(trainer)
        trainer.set_data(range(2))
        trainer.state.max_epochs, trainer.state.epoch_length = 1, 2
        run_training(trainer, tmp_path)
    finally:
        trainer.logger.removeHandler(ignite_lines)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("Engine run finished"), lines
    assert lines[-1].startswith("training done: iterations 1-2 of 2 (epoch 1 of 1) in "), lines
    assert sum("training done" in line for line in lines) == 1


def test_loss_lines_every_log_interval_and_at_each_epochs_first_iteration():
    from ignite.engine import Engine, Events

    from agi_monai.bundle import log_iterations

    # train.json's StatsHandler(iteration_log=...) uses it as this event filter
    trainer, logged = Engine(lambda engine, batch: None), []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(event_filter=log_iterations(4)),
        lambda engine: logged.append((engine.state.epoch, (engine.state.iteration - 1) % engine.state.epoch_length + 1)),
    )
    trainer.run(range(5), max_epochs=2)  # iterations 1-10, epochs of 5
    # 1 and 6 start an epoch; 4 and 8 are multiples of the interval (epoch 1 iteration 4, epoch 2 iteration 3)
    assert logged == [(1, 1), (1, 4), (2, 1), (2, 3)]
    with pytest.raises(ValueError, match="--log_interval 0: expected a positive number of iterations"):
        log_iterations(0)


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_interrupted_training_ends_with_where_it_stood_and_what_resumes(tmp_path, capsys, stop):
    import os
    import signal

    from ignite.engine import Engine

    from agi_monai.bundle import run_training

    def step(engine, batch):  # interrupted in epoch 2, after epoch 1's checkpoint was written
        if engine.state.iteration == 5:
            if stop == "SIGTERM":  # what Slurm and `timeout` send: the handler run_training installs stops the run
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    (tmp_path / "training_checkpoint_epoch=1.pt").write_bytes(b"")
    trainer = Engine(step)
    trainer.set_data(range(3))
    trainer.state.max_epochs, trainer.state.epoch_length = 3, 3
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        run_training(trainer, tmp_path)
    assert stopped.value.code == (143 if stop == "SIGTERM" else 130)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"training interrupted at iteration 5 of 9 (epoch 2 of 3); --resume_ckpt latest continues from "
        f"{tmp_path / 'training_checkpoint_epoch=1.pt'} (the iterations after it are lost)"
    )
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_fresh_start_interrupted_before_its_first_checkpoint_names_the_run_it_set_aside(tmp_path, capsys):
    from ignite.engine import Engine

    from agi_monai.bundle import run_training
    from agi_monai.engines import set_aside_earlier_run

    (tmp_path / "training_checkpoint_epoch=2.pt").write_bytes(b"")  # the earlier run's

    def step(engine, batch):
        if engine.state.iteration == 2:
            raise KeyboardInterrupt

    trainer = Engine(step)
    trainer.set_data(range(3))
    trainer.state.max_epochs, trainer.state.epoch_length = 1, 3
    set_aside_earlier_run(tmp_path, trainer)  # at the first iteration, as train.json does
    with pytest.raises(SystemExit):
        run_training(trainer, tmp_path)
    (kept,) = tmp_path.glob("earlier_run_*")
    # before: only "no training checkpoint yet: a rerun starts afresh", and a rerun with --resume_ckpt latest did
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "training interrupted at iteration 2 of 3 (epoch 1 of 1); no training checkpoint yet: a rerun starts afresh "
        f"(it set the earlier run aside: --resume_ckpt {kept / 'training_checkpoint_epoch=2.pt'} continues that one)"
    )


#: What a gloo process prints when it aborts on a joinable C++ thread (SIGABRT) after its training's last validation:
#: twice in the clean-clone runs of sessions 16-19 (once in each of the 2D and 3D tests), never when the test runs
#: alone (3 of 3 passed on 2026-11-25). Not found in our code; a run failing so is run once more.
GLOO_ABORT = "terminate called without an active exception"


@pytest.mark.slow
def _two_process_training(name: str, *args: str) -> str:
    """``multi_gpu_train.json`` over ``train.json`` under torchrun with 2 gloo CPU processes; returns the log. A run
    that fails only by :data:`GLOO_ABORT` is run once more from scratch (its ``models/`` and ``eval/`` removed); a
    second failure fails the test."""
    configs = _configs(name, "multi_gpu_train.json")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", "[" + ",".join(f"'{c}'" for c in configs) + "]", *args,
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    log = result.stdout + result.stderr
    if result.returncode != 0 and GLOO_ABORT in log:
        warnings.warn(f"two-process training aborted in gloo ({GLOO_ABORT!r}); running it once more")
        root = Path(args[args.index("--bundle_root") + 1])
        for folder in ("models", "eval"):
            shutil.rmtree(root / folder, ignore_errors=True)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
        log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert log.count("Pix2PixTrainer - INFO - Engine run finished") == 2  # both ranks trained
    return log


def test_multi_gpu_train_with_two_gloo_cpu_processes(tmp_path):
    pytest.importorskip("agi_monai.engines")
    log = _two_process_training("ixi_t1_t2_to_pd", *_train_args(tmp_path, DATA / "ixi-sim"))
    # the ranks share the preprocessing: one preprocessed the case into the cache; the other rank, and both
    # validation sets (the same case), read it from there
    summaries = [line for line in log.splitlines() if "slices from 1 volumes" in line]
    assert len(summaries) == 4, summaries
    assert sum("(1 read from " not in line for line in summaries) == 1, summaries
    AGINet(in_channels=2, channels=[8, 16, 16, 32]).load_state_dict(  # saved once, without DDP's "module."
        torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    )
    state = torch.load(tmp_path / "models" / "training_checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and not any(k.startswith("module.") for k in state["generator"])


@pytest.mark.slow
def test_3d_multi_gpu_train_with_two_gloo_cpu_processes(tmp_path):
    # two real BraTS cases, so that each process validates one whole volume (the DistributedSampler splits volumes)
    gli = DATA / "brats2023-gli" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-"
    mets = DATA / "brats2023-mets" / "aurora-example"
    cases = [
        {"case_id": "gli", "T1": f"{gli}t1n.nii.gz", "T2": f"{gli}t2w.nii.gz", "FLAIR": f"{gli}t2f.nii.gz",
         "T1Gd": f"{gli}t1c.nii.gz"},
        {"case_id": "mets", **{c: str(mets / f"{f}.nii.gz") for c, f in
                               (("T1", "t1"), ("T2", "t2"), ("FLAIR", "flair"), ("T1Gd", "t1c"))}},
    ]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": cases, "validation": cases}))
    log = _two_process_training(
        "brats_t1_t2_flair_to_t1gd_3d", *_train_args(tmp_path, datalist), "--patch_size", "[32,32,32]",
        "--samples_per_volume", "2",
    )
    assert "training done: iterations 1-2 of 2 (epoch 1 of 1)" in log
    generator = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # saved once, without "module."
    AGINet(3, in_channels=3, channels=[8, 16, 16, 32]).load_state_dict(generator)
