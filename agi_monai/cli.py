"""The ``agi-monai`` command line (also ``python -m agi_monai``): synthesis, DICOM conversion, evaluation,
TorchScript export and the table of scenario bundles.

Every command that runs a network goes through the bundle's own configs with MONAI's ``ConfigWorkflow`` (or
``ckpt_export``), with the command's arguments as config overrides, so ``agi-monai synthesize`` and
``python -m monai.bundle run --config_file <bundle>/configs/inference.json`` run the same code. Extra
``--<config id>=<value>`` flags are passed to the config as overrides (e.g. ``--network_def#channels=[8,8,8,8]``).

Exit status: 0 when every case was written, 1 when any case failed (the others are still written and the
failed ones are named), 2 for a bad argument (the message names it; no traceback), 130 after Ctrl-C and 143 after
SIGTERM (the outputs written until then are complete; temporary files are removed).
"""

# no "from __future__ import annotations" in the commands: Fire's --help prints their annotations (through
# _as_fire_shows_types, as "Optional[str]")
import contextlib
import inspect
import logging
import sys
import tempfile
import time
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import fire

__all__ = ["UsageError", "main", "synthesize", "convert_dicom", "evaluate", "export", "list_bundles_table"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 130: the shell's status for Ctrl-C
_PROGRAM = "agi-monai"
_FILE_FLAGS = {"t1": "T1", "t2": "T2", "pd": "PD", "flair": "FLAIR", "t1gd": "T1Gd"}
# the inference.json setting --batch_size sets: the slices per forward pass of a 2D bundle, the patches of a 3D one
_BATCH_SIZE_SETTINGS = ("slices_per_batch", "patches_per_batch")


class UsageError(Exception):
    """A bad command-line argument: the message says which, what was given and what is expected."""


def check_whole_numbers(**minimums: tuple[Any, int]) -> None:
    """Raises :class:`UsageError` for the first ``--name`` whose value, given as ``name=(value, least)``, is not a
    whole number of at least ``least`` (None: not given, accepted); the scripts' count arguments."""
    for name, (value, least) in minimums.items():
        if value is not None and (not isinstance(value, int) or value < least):
            raise UsageError(f"--{name} {value}: expected a whole number >= {least}")


# ------------------------------------------------------------------------------------------------ commands


def synthesize(
    input_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    bundle: Optional[str] = None,
    target: Optional[str] = None,
    t1: Optional[str] = None,
    t2: Optional[str] = None,
    pd: Optional[str] = None,
    flair: Optional[str] = None,
    t1gd: Optional[str] = None,
    case_id: Optional[str] = None,
    device: Optional[str] = None,
    batch_size: Optional[int] = None,
    overwrite: bool = False,
    dicom: bool = False,
    progress: bool = True,
    report: Optional[str] = None,
    **overrides: Any,
) -> int:
    """Synthesize the missing contrast of every case in a folder (NIfTI and/or DICOM), or of one case given file by file.

    Writes <case>_<target>.nii.gz on the grid of the case's reference input (T2, else PD, FLAIR, T1, T1Gd) and,
    with --dicom, <case>_<target>_dicom/: a new MR series derived from the reference series (DICOM input) or a
    new study with synthetic patient tags (NIfTI input). A bad case is reported and the others go on; the exit
    status is 1 when any case failed. Outputs already present are kept (see --overwrite). Other
    --<config id>=<value> flags override the bundle's inference.json (e.g. --network_def#channels=[8,8,8,8]).
    Examples:

        agi-monai synthesize /scans --output_dir out --bundle brats_t1_t2_to_flair
        agi-monai synthesize --t1 a-t1.nii.gz --t2 a-t2.nii.gz --target FLAIR --output_dir out --dicom

    Args:
        input_dir: folder of cases (NIfTI named like <case>-t1.nii.gz, DICOM series named by their
            SeriesDescription) or a JSON datalist. Leave out when giving --t1/--t2/... files.
        output_dir: where outputs go (created); not the input folder nor inside it.
        bundle: a bundle name (see 'agi-monai bundles') or a bundle folder. Default: chosen from the contrasts
            every case has (and --target).
        target: the contrast to synthesize (T1, T2, PD, FLAIR, T1Gd) when choosing the bundle; needed when
            the contrasts present allow several.
        t1: the T1 of one case (a NIfTI file or a folder holding one DICOM series); likewise t2, pd, flair, t1gd.
        t2: the T2 of one case.
        pd: the PD of one case.
        flair: the FLAIR of one case.
        t1gd: the contrast-enhanced T1 of one case.
        case_id: the case's name for files given with --t1/...; default: from the file names.
        device: torch device, e.g. cpu, cuda, cuda:1. Default: cuda:0 if available, else cpu.
        batch_size: axial slices per forward pass (a 2D bundle's slices_per_batch: 16 on a GPU, 2 on a CPU), or 3D
            patches per forward pass (a 3D bundle's patches_per_batch, 4).
        overwrite: replace existing outputs; without it a case whose outputs exist is skipped (counted as already
            present: a rerun over a folder does the rest; with --dicom, a NIfTI without its DICOM series, from a run
            stopped between the two, gets its series), and one with a DICOM series but no NIfTI fails, naming it.
        dicom: also write a DICOM series per case.
        progress: show progress bars.
        report: a JSON file to write every case's outcome into (written, present or failed with its reason; the
            output files), for a pipeline; not inside the input folder.
        overrides: --<config id>=<value> overrides of the bundle's inference.json.
    """
    from agi_monai.bundle.registry import BundleError
    from agi_monai.data import check_report_path, discover_cases

    started = time.perf_counter()
    given = {"t1": t1, "t2": t2, "pd": pd, "flair": flair, "t1gd": t1gd}
    files = {_FILE_FLAGS[flag]: value for flag, value in given.items() if value is not None}
    overwrite, dicom, progress = _flag(overwrite, "overwrite"), _flag(dicom, "dicom"), _flag(progress, "progress")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"--batch_size: got {batch_size!r}, expected a positive number of slices (3D: patches)")
    if output_dir is None:
        raise UsageError("--output_dir is required: the folder the synthesized images are written to")
    # checked (writable, not inside the input) by inference.json's initialize; absolute, not resolved: a linked
    # <bids>/derivatives/<pipeline> is still a BIDS derivative (is_bids_derivative)
    output = Path(str(output_dir)).absolute()
    report_path = Path(str(report)).resolve() if report is not None else None
    with tempfile.TemporaryDirectory(prefix="agi-monai-") as scratch:
        source = _input_source(input_dir, files, case_id, Path(scratch))
        if report_path is not None:  # before any case is computed
            check_report_path(report_path, source, output)
        try:
            if bundle is not None:
                chosen = _named_bundle(bundle, target, files)
            else:
                discovery = discover_cases(source, **_discovery_options(overrides))
                if not discovery.cases and discovery.failures:
                    # no bundle can be chosen, yet this is a batch whose every case failed (exit 1, each case named,
                    # as with --bundle), not a usage error
                    return _no_case_readable(discovery, output, started)
                chosen = _bundle_for_contrasts(discovery, source, target)
        except BundleError as error:
            raise UsageError(str(error)) from None
        workflow = _synthesis_workflow(chosen, overrides, source, output, device, batch_size, overwrite, progress)
        discovery = _workflow_cases(workflow, source)
        _refuse_unusable_outputs(discovery, output, chosen.target, overwrite)
        summary = _run_synthesis(workflow, discovery, chosen, output, overwrite, dicom, progress, report_path)
        workflow.finalize()

    print(_summary_line(summary, f" ({chosen.target}, {'NIfTI + DICOM' if dicom else 'NIfTI'})", f" by {chosen.name}",
                        started), flush=True)
    return EXIT_FAILED if summary.failures or summary.cases == 0 else EXIT_OK


def _named_bundle(bundle: Any, target: Any, files: Mapping[str, Any]) -> Any:
    """The bundle ``--bundle`` names, checked against ``--target`` and, for one case given file by file, against the
    files given (a missing file is an argument, not a failed case).

    Raises:
        UsageError: naming the flag; agi_monai.bundle.registry.BundleError: no such bundle.
    """
    from agi_monai.bundle.registry import find_bundle

    chosen = find_bundle(bundle)
    if target is not None and _canonical(target, "--target") != chosen.target:
        raise UsageError(f"--target {target}: bundle {chosen.name} synthesizes {chosen.target}, not {target}")
    missing = [contrast for contrast in chosen.inputs if files and contrast not in files]
    if missing:
        flags = " ".join(f"--{contrast.lower()}" for contrast in missing)
        raise UsageError(f"{flags}: required, bundle {chosen.name} reads {', '.join(chosen.inputs)}")
    return chosen


def _bundle_for_contrasts(discovery: Any, source: Path, target: Any) -> Any:
    """The bundle chosen from the contrasts every discovered case has (and ``--target``), announced.

    Raises:
        agi_monai.bundle.registry.BundleError: no bundle reads them, or several do and no ``--target`` decides.
    """
    from agi_monai.bundle.registry import choose_bundle

    present = _contrasts_present(discovery, source)
    chosen = choose_bundle(present, target)
    print(
        f"{_PROGRAM} synthesize: using bundle {chosen.name} ({', '.join(chosen.inputs)} -> {chosen.target}); "
        f"contrasts every case has: {', '.join(present)}",
        flush=True,
    )
    return chosen


def _synthesis_workflow(bundle: Any, overrides: Mapping[str, Any], source: Path, output: Path, device: Any,
                        batch_size: Optional[int], overwrite: bool, progress: bool) -> Any:
    """The bundle's ``inference.json`` workflow with the command's arguments as overrides, initialized."""
    workflow = _workflow(
        bundle, ["inference.json"], overrides, dataset_dir=str(source), output_dir=str(output),
        device=_device_expression(device), **({_batch_size_setting(bundle): batch_size} if batch_size else {}),
        **({} if progress else {"evaluator#progress": False}),
        # the DICOM outputs come after the bundle's run, and this command sets the exit status
        **{"evaluator#overwrite": overwrite, "evaluator#exit_on_failure": False},
    )
    _initialize(workflow, bundle, overrides)
    return workflow


def _workflow_cases(workflow: Any, source: Path) -> Any:
    """The workflow's ``discovery``, the instance its evaluator will read; a bad input raises its DataError (without
    MONAI's wrapping), a source without a case a :class:`UsageError`."""
    try:
        discovery = workflow.parser.get_parsed_content("discovery")
    except Exception as error:  # e.g. a datalist that is not JSON
        cause = _data_error_in(error)
        if cause is None:
            raise
        raise cause from error
    _require_cases(discovery, source)
    return discovery


def _run_synthesis(workflow: Any, discovery: Any, bundle: Any, output: Path, overwrite: bool, dicom: bool,
                   progress: bool, report_path: Optional[Path]) -> Any:
    """Runs the workflow over the discovered cases, then writes the DICOM series (``--dicom``) and the report
    (``--report``): the run's :class:`agi_monai.bundle.SynthesisSummary`. With ``--overwrite``, the cases' earlier
    outputs are set aside first and settled at the end, whatever happened."""
    from agi_monai.data import synthesis_output_paths

    cases = {case["case_id"]: case for case in discovery.cases}
    earlier: dict[str, Any] = {}  # case ID -> EarlierCaseOutputs
    try:
        if overwrite:
            case_ids = [case["case_id"] for case in discovery.cases]
            _set_earlier_outputs_aside(earlier, case_ids, output, bundle.target)
        summary = _run(workflow)
        if dicom:
            _write_dicom_outputs(summary, cases, bundle, overwrite, progress, earlier)
        if report_path is not None:  # after the DICOM step: its outcome too, and the series folders
            series = (lambda case_id: synthesis_output_paths(case_id, bundle.target, output)[1]) if dicom else None
            summary.write_report(report_path, series, bundle=bundle.name)
    finally:  # the cases the DICOM step did not reach (failed, interrupted, no --dicom): never a NIfTI beside another
        # run's series
        for outputs in earlier.values():
            outputs.settle()
    return summary


def _summary_line(summary: Any, written_as: str, written_by: str, started: float) -> str:
    """The last line of ``synthesize``: what was written, as what, by which bundle, and the cases not written."""
    failed = ", ".join(f.case_id for f in summary.failures)
    present = f"{len(summary.present)} already present (skipped; --overwrite replaces them), " if summary.present else ""
    return (
        f"{_PROGRAM} synthesize: {len(summary.written)} of {summary.cases} cases written{written_as} to "
        f"{summary.output_dir}{written_by} in {time.perf_counter() - started:.1f} s; {present}"
        f"{len(summary.failures)} failed" + (f": {failed}" if failed else "")
    )


def _no_case_readable(discovery: Any, output: Path, started: float) -> int:
    """Every case failed discovery (e.g. two T1 files, two DICOM series for one contrast): they are listed as a
    bundle's run lists its failed cases, and nothing is written."""
    from agi_monai.bundle import SynthesisSummary

    summary = SynthesisSummary(output, failures=list(discovery.failures))
    print(summary, flush=True)
    print(_summary_line(summary, "", " (no bundle chosen: no case could be read)", started), flush=True)
    return EXIT_FAILED


def convert_dicom(input_dir: str, output_dir: str, overwrite: bool = False, progress: bool = True) -> int:
    """Convert the DICOM series of every case in a folder to NIfTI: <case>-<contrast>.nii.gz.

    Series are grouped into cases by patient (and study) and matched to contrasts by their SeriesDescription
    /ProtocolName; a case whose series cannot be matched (e.g. two T2 series) is reported and skipped. The
    output folder can then be given to 'agi-monai synthesize'. Exit status 1 when any case failed.

    Args:
        input_dir: folder holding DICOM files (searched recursively).
        output_dir: where the NIfTI files go (created); not the input folder nor inside it.
        overwrite: replace existing NIfTI files; without it a case whose output exists fails, naming the file.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    from agi_monai.data import (
        CONTRASTS, LABELS, DataError, Failure, check_output_folder, convert_dicom_to_nifti, discover_cases,
    )
    from agi_monai.data.dicom import is_dicom_source

    started = time.perf_counter()
    overwrite, progress = _flag(overwrite, "overwrite"), _flag(progress, "progress")
    source = _existing_path(input_dir, "input_dir", "a folder of DICOM files")
    # not in the input (a later synthesize over it would find each contrast twice), created and written to now
    output = check_output_folder(Path(str(output_dir)), source, synthesis=False)
    discovery = discover_cases(source)
    dicom_cases = [c for c in discovery.cases if any(is_dicom_source(c[k]) for k in c if k in CONTRASTS + LABELS)]
    failures = list(discovery.failures)
    if not dicom_cases and not failures:
        raise UsageError(f"input_dir {input_dir}: no DICOM series found (expected DICOM files in it or below it)")
    written: list[Path] = []
    converted = 0
    for case in tqdm(dicom_cases, desc="converting", unit="case", disable=not progress):
        targets = [output / f"{case['case_id']}-{k}.nii.gz" for k in case if k in CONTRASTS + LABELS and is_dicom_source(case[k])]
        existing = [str(p) for p in targets if p.exists()]
        if existing and not overwrite:
            failures.append(Failure(case["case_id"], f"output already exists: {', '.join(existing)} (pass --overwrite to replace it)"))
            continue
        try:
            convert_dicom_to_nifti(case, output)
        except DataError as error:
            for path in targets:  # no partial case: remove what this run wrote for it
                if str(path) not in existing:
                    path.unlink(missing_ok=True)
            failures.append(Failure(case["case_id"], str(error)))
            continue
        written.extend(targets)
        converted += 1
    for failure in failures:
        print(f"  - {failure}", flush=True)
    print(
        f"{_PROGRAM} convert-dicom: {len(written)} series of {converted} of {converted + len(failures)} cases written "
        f"to {output} in {time.perf_counter() - started:.1f} s; {len(failures)} failed"
        + (f": {', '.join(f.case_id for f in failures)}" if failures else ""),
        flush=True,
    )
    return EXIT_FAILED if failures else EXIT_OK


def evaluate(
    bundle: str, dataset_dir: str, output_dir: Optional[str] = None, device: Optional[str] = None, **overrides: Any
) -> int:
    """Evaluate a bundle's trained generator on a dataset: its configs/train.json + configs/evaluate.json, run by MONAI.

    What is measured and written (metrics tables in output_dir) is up to the bundle's evaluate.json; this
    command passes the arguments as overrides and lists the files it wrote.

    Args:
        bundle: a bundle name (see 'agi-monai bundles') or a bundle folder; its models/model.pt is evaluated.
        dataset_dir: folder of cases or a JSON datalist (its "test" split, or every case of a folder).
        output_dir: where the metrics go (default: the bundle's, <bundle>/eval).
        device: torch device, e.g. cpu, cuda. Default: cuda:0 if available, else cpu.
        overrides: --<config id>=<value> overrides of the bundle's configs.
    """
    started = time.perf_counter()
    chosen = _find_bundle(bundle)
    source = _existing_path(dataset_dir, "dataset_dir", "a folder of cases or a JSON datalist")
    settings = {"dataset_dir": str(source), "device": _device_expression(device)}
    if output_dir is not None:
        settings["output_dir"] = str(Path(str(output_dir)).resolve())
    workflow = _workflow(chosen, ["train.json", "evaluate.json"], overrides, workflow_type=None, **settings)
    output = Path(workflow.parser.get_parsed_content("output_dir"))
    before = _snapshot(output)
    _initialize(workflow, chosen, overrides)
    # the evaluator loads them when it starts, where MONAI's StatsHandler logs the refusal with a traceback
    _require_weights(chosen.weights, chosen)
    _check_weights(workflow.parser, chosen.weights, chosen, overrides)
    try:
        results = workflow.run()
    except Exception as error:  # the weights are loaded, and the cases read, while it runs: as _initialize reports
        _raise_bad_input(error, workflow, chosen, overrides)
    workflow.finalize()
    changed = sorted(p for p, stamp in _snapshot(output).items() if before.get(p) != stamp)
    # failed cases: on what 'run' returned, or on the engine at MONAI's train-property id for the evaluator
    failures = [f for result in (results or []) for f in getattr(result, "failures", [])]
    if not failures and "validate#evaluator" in workflow.parser:
        failures = list(getattr(workflow.parser.get_parsed_content("validate#evaluator"), "failures", []))
    names = ", ".join(str(p.relative_to(output)) for p in changed) or "nothing"
    print(
        f"{_PROGRAM} evaluate: {chosen.name} on {source}: wrote {names} in {output} in "
        f"{time.perf_counter() - started:.1f} s" + (f"; {len(failures)} cases failed" if failures else ""),
        flush=True,
    )
    return EXIT_FAILED if failures else EXIT_OK


def export(bundle: str, filepath: Optional[str] = None, portable: bool = False, overwrite: bool = False, **overrides: Any) -> int:
    """Export a bundle's generator (models/model.pt) to TorchScript with MONAI's ckpt_export.

    The default file needs agi_monai imported before torch.jit.load (its graph calls the compiled roll,
    torch.ops.agi_monai.group_roll). With --portable the graph uses the pure-PyTorch roll instead: the file
    runs with torch alone, where agi-monai is not installed (slower; same results).

    Args:
        bundle: a bundle name (see 'agi-monai bundles') or a bundle folder.
        filepath: the .ts file to write (default: <bundle>/models/model.ts).
        portable: export the extension-free graph.
        overwrite: replace an existing file; otherwise an existing one is an error.
        overrides: --<config id>=<value> overrides of the bundle's inference.json (e.g. network widths).
    """
    from monai.bundle import ConfigParser, ckpt_export

    from agi_monai.data import atomic_output

    started = time.perf_counter()
    chosen = _find_bundle(bundle)
    portable, overwrite = _flag(portable, "portable"), _flag(overwrite, "overwrite")
    config_file = chosen.config_dir / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config_file))
    _check_overrides(parser, overrides, [config_file])
    weights = chosen.weights
    _require_weights(weights, chosen)
    target = Path(str(filepath)).resolve() if filepath else chosen.root / "models" / "model.ts"
    if target.suffix != ".ts":
        raise UsageError(f"--filepath {filepath}: expected a file name ending in .ts")
    if target.exists() and not overwrite:
        raise UsageError(f"--filepath {target}: already exists (pass --overwrite to replace it)")
    _check_weights(parser, weights, chosen, overrides)
    if portable:
        overrides = {**overrides, "network_def#portable": True}
    with atomic_output(target) as temporary, warnings.catch_warnings():
        # torch 2.13+ deprecates torch.jit.script/save, which ckpt_export uses; the file is still what we want
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        ckpt_export(
            net_id="network_def", filepath=str(temporary), ckpt_file=str(weights),
            meta_file=str(chosen.config_dir / "metadata.json"), config_file=str(config_file),
            bundle_root=str(chosen.root), **overrides,
        )
    kind = "portable: loads with torch alone" if portable else "load it after 'import agi_monai'"
    print(f"{_PROGRAM} export: {chosen.name} -> {target} ({kind}) in {time.perf_counter() - started:.1f} s", flush=True)
    return EXIT_OK


def list_bundles_table() -> int:
    """List the scenario bundles: inputs, target, slice size and whether trained weights (models/model.pt) are present."""
    from agi_monai.bundle.registry import bundles_root, list_bundles

    found = list_bundles()
    rows = [("bundle", "inputs", "target", "slice", "weights")] + [
        (
            b.name, ", ".join(b.inputs), b.target,
            "x".join(map(str, b.spatial_size)) + (" (3D patches)" if b.spatial_dims == 3 else ""),
            "yes" if b.has_weights else "no (models/model.pt missing)",
        )
        for b in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    with_weights = sum(b.has_weights for b in found)
    print(f"{len(found)} bundles in {bundles_root()}, {with_weights} with weights (models/model.pt)", flush=True)
    return EXIT_OK


COMMANDS: dict[str, Callable[..., int]] = {
    "synthesize": synthesize,
    "convert-dicom": convert_dicom,
    "evaluate": evaluate,
    "export": export,
    "bundles": list_bundles_table,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 some case failed, 2 bad argument)."""
    # MONAI announces at import that the optional nvImageCodec DICOM decoder is missing; not news for a user
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    from agi_monai.bundle.registry import BundleError
    from agi_monai.data import DataError, stopping_cleanly_on_sigterm

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].replace("_", "-") in COMMANDS:
        args[0] = args[0].replace("_", "-")
    command = args[0] if args and args[0] in COMMANDS else ""
    name = " ".join([_PROGRAM, *([command] if command else [])])
    try:
        fire_args = _command_line_as_typed(COMMANDS, _fire_help(args))
        # Fire writes help to stderr; asked-for help belongs on stdout (so that it pages and greps)
        help_to_stdout = (contextlib.redirect_stderr(sys.stdout) if fire_args[-2:] == ["--", "--help"]
                          else contextlib.nullcontext())
        with help_to_stdout, stopping_cleanly_on_sigterm():
            result = fire.Fire({name: _as_fire_shows_types(command) for name, command in COMMANDS.items()},
                               command=fire_args, name=_PROGRAM, serialize=lambda _: None)
    except (UsageError, DataError, BundleError) as error:
        print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C: the temporary files are gone (atomic_output), every output left is complete
        print(f"{name}: interrupted; the outputs written so far are complete (a rerun without --overwrite does the "
              "rest)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


def run_script(component: Any, name: str) -> None:
    """``fire.Fire(component)`` for the repository's scripts, with the CLI's error handling: a bad argument or bad
    input is one line on stderr, ``<name>: error: <message>``, and exit status 2, not a traceback. That is a
    :class:`UsageError`, :class:`agi_monai.data.DataError` or ``BundleError``, and a ``ValueError``, the scripts'
    and MONAI's own way of refusing an argument, also when MONAI's config parser wraps it ("Failed to instantiate
    component ..."): the innermost error is the one that says what was wrong. Other errors keep their traceback.
    Fire prints a command's return value; the scripts' commands print their own results, so it is not printed again.
    """
    from agi_monai.bundle.registry import BundleError
    from agi_monai.data.errors import DataError, innermost_cause

    try:
        shown = ({key: _as_fire_shows_types(value) for key, value in component.items()} if isinstance(component, Mapping)
                 else _as_fire_shows_types(component))
        fire.Fire(shown, command=_command_line_as_typed(component, sys.argv[1:]), name=name,
                  serialize=lambda result: None)
    except (UsageError, DataError, BundleError) as error:
        print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    except Exception as error:
        cause = innermost_cause(error)
        if not isinstance(cause, (ValueError, UsageError, DataError, BundleError)):
            raise
        print(f"{name}: error: {' '.join(str(cause).split())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


# ------------------------------------------------------------------------------------------------- helpers


def _as_fire_shows_types(command: Any) -> Any:
    """``command`` as Fire's ``--help`` should show its parameter types: a copy whose annotations are the evaluated
    types (the scripts' are strings, from ``from __future__ import annotations``: shown quoted) with ``Optional[X]``
    of a parameter defaulting to None as ``X``, since Fire adds ``Optional[...]`` itself there (it showed
    ``Optional[Optional]``: Fire names a type by its ``__qualname__``). Anything else is returned as it is."""
    if not isinstance(command, types.FunctionType):
        return command
    try:
        hints = typing.get_type_hints(command)
    except Exception:  # a name the annotations use that is not importable here: Fire shows them as they are
        return command
    defaults = {name: parameter.default for name, parameter in inspect.signature(command).parameters.items()}
    for name, hint in hints.items():
        arguments = typing.get_args(hint)
        if defaults.get(name, inspect.Parameter.empty) is None and type(None) in arguments and len(arguments) == 2:
            hints[name] = next(argument for argument in arguments if argument is not type(None))
    shown = types.FunctionType(command.__code__, command.__globals__, command.__name__, command.__defaults__,
                               command.__closure__)
    shown.__kwdefaults__, shown.__doc__, shown.__annotations__ = command.__kwdefaults__, command.__doc__, hints
    return shown


def _command_line_as_typed(component: Any, args: list[str]) -> list[str]:
    """``args`` for ``fire.Fire(component)`` with :func:`_strings_as_typed` applied for the function it will call:
    ``component`` itself, or, for a dict of commands, the one ``args`` names first."""
    if isinstance(component, Mapping):
        return [args[0], *_strings_as_typed(component[args[0]], args[1:])] if args and args[0] in component else args
    return _strings_as_typed(component, args) if callable(component) else args


def _strings_as_typed(command: Callable[..., int], args: list[str]) -> list[str]:
    """``args`` with the values of ``command``'s string parameters (folders, files, names, IDs) quoted, so that Fire,
    which reads every value as a Python literal, keeps them as typed: unquoted, a folder ``2024_01`` became the
    number 202401 and ``--output_dir 1_0`` the folder ``10``. The values of its bool parameters are read by
    :func:`_flag` (true/false, yes/no, 1/0, any case) and given as ``True``/``False``: Fire keeps ``false`` a string,
    which counts as true (``--validate false`` validated); anything else raises :class:`UsageError`. Fire gives a flag
    (``--name``, without ``=``) the next argument unless that is a flag too; the other arguments fill the positional
    parameters not given as flags, in order. Config overrides (``--network_def#channels [8,8,8,8]``) are literals and
    stay as they are."""
    parameters = inspect.signature(command).parameters
    # (the scripts' annotations are strings: they import annotations from __future__)
    string_types = (str, Optional[str], "str", "Optional[str]", "str | None")
    strings = {name for name, parameter in parameters.items() if parameter.annotation in string_types}
    booleans = {name for name, parameter in parameters.items() if parameter.annotation in (bool, "bool")}

    def as_typed(name: str, value: str) -> str:
        if name in strings:
            return repr(value)
        return str(_flag(value, name)) if name in booleans else value

    named = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in args if arg.startswith("--")}
    positional = [name for name, parameter in parameters.items()
                  if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name not in named]
    typed: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # Fire's own flags follow
            typed += args[index:]
            break
        if arg.startswith("--"):
            flag, equals, value = arg[2:].partition("=")
            name = flag.replace("-", "_")
            if equals:
                typed.append(f"--{flag}={as_typed(name, value)}")
            else:
                typed.append(arg)
                if index + 1 < len(args) and not args[index + 1].startswith("--"):
                    index += 1
                    typed.append(as_typed(name, args[index]))
        else:
            typed.append(as_typed(positional.pop(0), arg) if positional else arg)
        index += 1
    return typed


def _fire_help(args: list[str]) -> list[str]:
    """Fire hands ``--help`` to a command's ``**overrides``; ``-- --help`` asks Fire itself for the help (also
    what a bare ``agi-monai`` shows)."""
    if not args:
        return ["--", "--help"]
    if "--" in args:
        return args
    wanted = [a for a in args if a in ("--help", "-h")]
    return [a for a in args if a not in ("--help", "-h")] + ["--", "--help"] if wanted else args


def _flag(value: Any, name: str) -> bool:
    """A true/false flag: Fire gives a bool for --flag, --noflag and --flag=False, a string for --flag=false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "false", "no", "0"):
        return text in ("true", "yes", "1")
    raise UsageError(f"--{name}: got {value!r}, expected true or false")


def _batch_size_setting(bundle: Any) -> str:
    """The setting of the bundle's ``inference.json`` that ``--batch_size`` sets (:data:`_BATCH_SIZE_SETTINGS`): read
    from the config, since a setting it does not have would be added as a key that nothing reads."""
    from monai.bundle import ConfigParser

    config_file = bundle.config_dir / "inference.json"
    config = ConfigParser.load_config_file(str(config_file))
    setting = next((name for name in _BATCH_SIZE_SETTINGS if name in config), None)
    if setting is None:
        raise UsageError(f"--batch_size: {config_file} has none of {', '.join(_BATCH_SIZE_SETTINGS)} to set")
    return setting


def _canonical(name: Any, flag: str) -> str:
    from agi_monai.data import CONTRASTS, DataError, canonical_contrast

    try:
        contrast = canonical_contrast(str(name))
    except DataError:
        contrast = ""
    if contrast not in CONTRASTS:
        raise UsageError(f"{flag} {name}: not a contrast; expected one of {', '.join(CONTRASTS)}")
    return contrast


def _existing_path(value: Any, flag: str, expected: str) -> Path:
    if value is None or isinstance(value, bool):
        raise UsageError(f"{flag} is required: {expected}")
    path = Path(str(value)).resolve()
    if not path.exists():
        raise UsageError(f"{flag} {value}: does not exist (expected {expected})")
    return path


def _input_source(input_dir: Any, files: Mapping[str, Any], case_id: str | None, scratch: Path) -> Path:
    """The folder or datalist to discover cases in: ``input_dir``, or a datalist of the files given one by one."""
    from agi_monai.data import write_json

    if input_dir is not None and files:
        flags = " ".join(f"--{k.lower()}" for k in files)
        raise UsageError(f"give either input_dir ({input_dir}) or per-contrast files ({flags}), not both")
    if input_dir is None and not files:
        raise UsageError("no input: give an input folder (agi-monai synthesize INPUT_DIR ...) or files (--t1 ... --t2 ...)")
    if input_dir is not None:
        return _existing_path(input_dir, "input_dir", "a folder of NIfTI/DICOM cases or a JSON datalist")
    item: dict[str, str] = {"case_id": str(case_id)} if case_id is not None else {}
    for contrast, value in files.items():
        item[contrast] = str(_existing_path(value, f"--{contrast.lower()}", "a NIfTI file or a DICOM series folder"))
    return write_json([item], scratch / "datalist.json")


def _discovery_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--discovery#aliases`` and ``--discovery#dicom_mapping`` overrides given as dicts: choosing the bundle
    discovers the cases before any bundle config is read, and must see the contrasts they name as the bundle will."""
    options = {name: overrides.get(f"discovery#{name}") for name in ("aliases", "dicom_mapping")}
    return {name: value for name, value in options.items() if isinstance(value, Mapping)}


def _contrasts_present(discovery: Any, source: Path) -> list[str]:
    """The image contrasts every discovered case has."""
    from agi_monai.data import CONTRASTS

    if not discovery.cases:
        raise _no_cases(discovery, source)
    present = [c for c in CONTRASTS if all(c in case for case in discovery.cases)]
    partly = [c for c in CONTRASTS if c not in present and any(c in case for case in discovery.cases)]
    if partly:  # the bundle is chosen from what every case has: say which cases hold the others back
        lacking = [f"{case['case_id']} lacks {', '.join(c for c in partly if c not in case)}" for case in discovery.cases
                   if any(c not in case for c in partly)]
        print(f"{_PROGRAM} synthesize: {', '.join(partly)} not in every case ({'; '.join(lacking[:5])}"
              f"{'; ...' if len(lacking) > 5 else ''})", flush=True)
    return present


def _require_cases(discovery: Any, source: Path) -> None:
    """An input without a single case, not even a bad one, is a usage error (a wrong folder), not a batch whose
    cases all failed (those are reported by the run, each with its reason)."""
    if not discovery.cases and not discovery.failures:
        raise _no_cases(discovery, source)


def _no_cases(discovery: Any, source: Path) -> UsageError:
    expected = "a datalist listing cases" if source.is_file() else "NIfTI files named like <case>-t1.nii.gz or DICOM series"
    return UsageError(f"input {source}: no cases found ({discovery.summary()}); expected {expected}")


def _find_bundle(name: Any) -> Any:
    from agi_monai.bundle.registry import BundleError, find_bundle

    if name is None or isinstance(name, bool):
        raise UsageError("a bundle is required: a name from 'agi-monai bundles' or a bundle folder")
    try:
        return find_bundle(str(name))
    except BundleError as error:
        raise UsageError(str(error)) from None


def _device_expression(device: Any) -> str | None:
    """A config expression for ``--device`` (None keeps the bundle's default), checked here."""
    import torch

    if device is None:
        return None
    try:
        parsed = torch.device(str(device))
    except RuntimeError:
        raise UsageError(f"--device {device}: not a torch device; expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return f"$torch.device({str(parsed)!r})"


def _workflow(bundle: Any, configs: Sequence[str], overrides: Mapping[str, Any], workflow_type: Optional[str] = "infer",
              **settings: Any) -> Any:
    """MONAI's ``ConfigWorkflow`` over the bundle's ``configs`` with the command's settings and overrides, after
    checking the overrides and that the weights exist (with a plain parse, before the workflow sets up logging)."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    config_files = [str(bundle.config_dir / name) for name in configs]
    settings = {"bundle_root": str(bundle.root), **{k: v for k, v in settings.items() if v is not None}}
    parser = ConfigParser()
    parser.read_config(config_files)
    _check_overrides(parser, overrides, config_files)
    parser.update({**settings, **overrides})
    _require_weights(Path(parser.get_parsed_content("ckpt_dir")) / "model.pt", bundle)
    return ConfigWorkflow(
        config_file=config_files if len(config_files) > 1 else config_files[0],
        meta_file=str(bundle.config_dir / "metadata.json"),
        workflow_type=workflow_type,
        **{**settings, **overrides},
    )


def _check_overrides(parser: Any, overrides: Mapping[str, Any], config_files: Sequence[Any]) -> None:
    """An override must name an entry of the config (its first ``#`` part), so that a mistyped flag is an error."""
    for key in overrides:
        if key.split("#", 1)[0] not in parser:
            files = ", ".join(map(str, config_files))
            raise UsageError(f"--{key}: not an option of this command and not a config id of {files}")


def _require_weights(weights: Path, bundle: Any) -> None:
    if not weights.is_file():
        config = bundle.config_dir / "train.json"
        raise UsageError(
            f"{weights}: no trained weights for bundle {bundle.name} (no bundle ships weights yet). Train them with "
            f"'python -m monai.bundle run --config_file {config} --bundle_root {bundle.root} --dataset_dir <data>' "
            f"(writes models/model.pt), or put a trained model.pt there"
        )


def _initialize(workflow: Any, bundle: Any, overrides: Mapping[str, Any]) -> None:
    """The workflow's ``initialize``, which loads the weights (``inference.json``:
    :func:`agi_monai.engines.load_weights`): weights it refuses are reported with what this command needs, the
    bundle and its ``--network_def#...`` flags."""
    from agi_monai.data.errors import find_data_error

    try:
        workflow.initialize()
    except Exception as error:  # MONAI wraps the expression's error: find load_weights' DataError in the chain
        if find_data_error(error) is None:  # e.g. an override the network cannot be built with
            raise _not_initialisable(bundle, error) from error
        _raise_bad_input(error, workflow, bundle, overrides)


def _raise_bad_input(error: BaseException, workflow: Any, bundle: Any, overrides: Mapping[str, Any]) -> None:
    """Raises the :class:`agi_monai.data.DataError` in ``error``'s chain without MONAI's wrapping (one line, no
    traceback), weights it names reported with what this command needs (:func:`_weights_refused`); ``error`` as it
    is when it holds none (a defect to see with its traceback)."""
    cause = _data_error_in(error)
    if cause is None:
        raise error
    weights = Path(workflow.parser.get_parsed_content("ckpt_dir")) / "model.pt"
    if Path(cause.source) != weights:  # not about the weights (e.g. the output folder, a split): as it is
        raise cause from error
    raise _weights_refused(cause, bundle, overrides) from None


def _data_error_in(error: BaseException) -> Any:
    """The :class:`agi_monai.data.DataError` in ``error``'s chain of causes (MONAI wraps a config expression's
    error in a ``RuntimeError``), as a fresh one to raise without MONAI's wrapping; None when there is none."""
    from agi_monai.data.errors import DataError, find_data_error

    cause = find_data_error(error)
    return None if cause is None else DataError(cause.source, cause.problem, cause.expected, cause.details)


def _weights_refused(error: Any, bundle: Any, overrides: Mapping[str, Any]) -> UsageError:
    """:func:`agi_monai.engines.load_weights`' ``DataError`` for the bundle's ``model.pt``, its ``expected`` saying
    what this command needs: the bundle's weights from a run with the ``--network_def#...`` flags given."""
    from agi_monai.data import DataError
    from agi_monai.engines import expected_bundle_weights

    expected = expected_bundle_weights(bundle.name, "--network_def#... flags", overrides)
    return UsageError(str(DataError(error.source, error.problem, expected, error.details)))


def _not_initialisable(bundle: Any, error: BaseException) -> UsageError:
    from agi_monai.data.errors import error_line, innermost_cause

    return UsageError(
        f"bundle {bundle.name}: its configs cannot be initialised with these options "
        f"({error_line(innermost_cause(error), limit=400)})"
    )


def _check_weights(parser: Any, weights: Path, bundle: Any, overrides: Mapping[str, Any]) -> None:
    """Loads ``weights`` into the bundle's ``network_def`` (with ``overrides``) as ``inference.json`` would, so that
    weights that do not fit are reported like :func:`_initialize` reports them. (``export`` hands the file to MONAI's
    ``ckpt_export``, whose own failure is torch's traceback listing every tensor.)"""
    from agi_monai.data import DataError
    from agi_monai.engines import load_weights

    parser.update(dict(overrides))  # (the caller's parser: export's ckpt_export reads the config file again)
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as error:  # e.g. an override the network cannot be built with
        raise _not_initialisable(bundle, error) from error
    try:
        load_weights(network, weights, "cpu")
    except DataError as error:
        raise _weights_refused(error, bundle, overrides) from None


def _refuse_unusable_outputs(discovery: Any, output: Path, target: str, overwrite: bool) -> None:
    """Moves to the failures each case whose outputs cannot be written, naming why: a file or folder under an
    output's name that no synthesis wrote (an acquired scan or series: never replaced, nor set aside and removed,
    with or without ``--overwrite``; :func:`agi_monai.data.refuse_foreign_outputs`), and, without ``--overwrite``,
    a DICOM folder without its NIfTI: with ``--dicom`` completing the case would replace that folder, and without,
    the new NIfTI would sit beside a series made from another. (A case with its NIfTI but not its DICOM folder, a run
    stopped between the two, is counted as present by the bundle's ``FolderSynthesis(overwrite=False)`` and gets its
    DICOM from that NIfTI: :func:`_write_dicom_outputs`.)"""
    from agi_monai.data import DataError, Failure, failure_reason, refuse_foreign_outputs, synthesis_output_paths

    kept = []
    for case in discovery.cases:
        nifti, series = synthesis_output_paths(case["case_id"], target, output)
        try:
            refuse_foreign_outputs(nifti, series)
        except DataError as error:
            discovery.failures.append(Failure(case["case_id"], failure_reason(error)))
            continue
        if not overwrite and series.exists() and not nifti.exists():
            discovery.failures.append(Failure(
                case["case_id"], f"output already exists: {series} (without its NIfTI {nifti.name}; pass --overwrite "
                                 "to replace it)",
            ))
        else:
            kept.append(case)
    discovery.cases[:] = kept


def _run(workflow: Any) -> Any:
    from agi_monai.bundle import SynthesisSummary

    results = workflow.run()
    summaries = [r for r in (results or []) if isinstance(r, SynthesisSummary)]
    if len(summaries) != 1:
        raise RuntimeError(f"the bundle's 'run' returned {results!r}, expected one SynthesisSummary")
    return summaries[0]


def _set_earlier_outputs_aside(earlier: dict[str, Any], case_ids: Sequence[str], output: Path, target: str) -> None:
    """Adds to ``earlier`` (as it goes, so that the caller can put them back after an error) an
    :class:`agi_monai.data.files.EarlierCaseOutputs` for each case with a NIfTI or a DICOM folder in ``output``
    already: an ``--overwrite`` run replaces a case's outputs as a whole, or keeps the earlier ones as a whole."""
    from agi_monai.data.files import EarlierCaseOutputs
    from agi_monai.data import synthesis_output_paths

    for case_id in case_ids:
        nifti, series = synthesis_output_paths(case_id, target, output)
        if nifti.exists() or series.exists():
            earlier[case_id] = EarlierCaseOutputs(nifti, series)


def _write_dicom_outputs(summary: Any, cases: Mapping[str, Any], bundle: Any, overwrite: bool, progress: bool,
                         earlier_outputs: dict[str, Any]) -> None:
    """A DICOM series beside each NIfTI this run wrote, and beside each NIfTI an earlier run wrote without its series
    (stopped between the two): such a case moves from the summary's present to its written. A case whose series
    fails moves to the summary's failures, with its reason printed; the NIfTI goes too when this run wrote it, and
    the case's ``earlier_outputs`` (set aside by an ``--overwrite`` run) come back. Those of a case whose series was
    written are removed."""
    import SimpleITK as sitk
    from tqdm import tqdm

    from agi_monai.data import DataError, Failure, choose_reference, failure_reason, synthesis_output_paths
    from agi_monai.data.dicom import is_dicom_source, write_derived_series
    from agi_monai.data.transforms import synthetic_series_descriptions

    reference_contrast = choose_reference(bundle.inputs)
    series_description, derivation_description = synthetic_series_descriptions(
        bundle.target, bundle.inputs, bundle.name, reference_contrast
    )
    earlier = [p for p in summary.present
               if not synthesis_output_paths(summary.case_id_of(p), bundle.target, summary.output_dir)[1].exists()]
    failures = []
    for nifti in tqdm(list(summary.written) + earlier, desc="writing DICOM", unit="case", disable=not progress):
        case_id = summary.case_id_of(nifti)
        reference = cases[case_id][reference_contrast]
        is_dicom = is_dicom_source(reference)
        try:
            write_derived_series(
                sitk.ReadImage(str(nifti)),
                synthesis_output_paths(case_id, bundle.target, summary.output_dir)[1],
                series_description=series_description,
                derivation_description=derivation_description,
                reference=reference if is_dicom else None,
                case_id=case_id,
                overwrite=overwrite,
            )
        except (DataError, OSError, RuntimeError) as error:  # RuntimeError: SimpleITK's, e.g. an unreadable NIfTI
            if nifti in earlier:  # an earlier run's complete NIfTI: kept
                summary.present.remove(nifti)
                failures.append(Failure(case_id, f"DICOM output: {failure_reason(error)} (the NIfTI {nifti.name} of "
                                                 "an earlier run is kept)"))
            else:  # the case fails as a whole: its NIfTI goes too, and what an earlier run wrote comes back
                summary.written.remove(nifti)
                kept = earlier_outputs.pop(case_id, None)
                if kept is None:
                    nifti.unlink(missing_ok=True)
                else:
                    kept.restore()
                failures.append(Failure(case_id, f"DICOM output: {failure_reason(error)}" + (
                    "" if kept is None else f" (kept: the earlier run's {kept.what} of this case)")))
        else:
            if case_id in earlier_outputs:
                earlier_outputs.pop(case_id).discard()
            if nifti in earlier:
                summary.present.remove(nifti)
                summary.written.append(nifti)
    for failure in failures:
        print(f"  - {failure}", flush=True)
    summary.failures.extend(failures)


def _snapshot(folder: Path) -> dict[Path, int]:
    """Modification times of the files below ``folder``, to tell which ones a run wrote."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
