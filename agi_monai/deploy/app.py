"""The MONAI Deploy application: a DICOM study (series matched per contrast) or NIfTI cases in, the scenario bundle's
synthesized contrast out as float32 NIfTI and as a derived DICOM MR series.

    python -m agi_monai.deploy -i <study or cases> -o <output> -m <bundle>/models/model.ts
    python -m agi_monai.deploy -i <study or cases> -o <output> -m <bundle folder>   # models/model.pt

``-i``/``-o``/``-m`` default to MONAI Deploy's ``HOLOSCAN_INPUT_PATH``/``HOLOSCAN_OUTPUT_PATH``/``HOLOSCAN_MODEL_PATH``
(the MAP contract). Exit status: 0 when every case was written, 1 when any case failed (the others are written
and the failed ones are named), 2 for a bad argument or a model that cannot be loaded, 143 after SIGTERM (what
``docker stop`` sends to a MAP container) and 130 after Ctrl-C: the run stops as soon as the Python call running
returns (:meth:`SynthesisApp.run_stoppably`), with the outputs written until then complete, no temporary file left
and, with ``--overwrite``, the case being written as it was before the run.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import wait
from pathlib import Path
from typing import Any

from agi_monai.bundle.registry import BundleError
from agi_monai.data import DataError, canonical_contrast, check_output_folder, check_report_path, synthesis_output_paths
from agi_monai.data.files import refuse_output_in_input, stopping_cleanly_on_sigterm
from agi_monai.deploy.operators import CaseDiscoveryOperator, GraphStop, SynthesisOperator, SyntheticImageWriterOperator
from agi_monai.bundle import SynthesisSummary
from agi_monai.deploy.synthesis import BundleSynthesizer, SynthesisOutputs

# agi_monai.deploy.operators has made the SDK importable (agi_monai.deploy.sdk)
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application  # noqa: E402
from monai.deploy.core.arg_parser import set_up_logging  # noqa: E402

__all__ = ["SynthesisApp", "main"]

_PROGRAM = "python -m agi_monai.deploy"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 130: Ctrl-C; SIGTERM: 143 (128 + 15)
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class SynthesisApp(Application):
    """cases -> synthesis -> writer (see :mod:`agi_monai.deploy.operators`), run once over the input.

    Args:
        app_context: MONAI Deploy's context: ``input_path`` (a DICOM study, NIfTI cases or a JSON datalist) and
            ``output_path``.
        synthesizer: the loaded bundle (from ``app_context.model_path``).
        dicom: also write a DICOM series per case.
        overwrite: replace existing outputs.
        dicom_mapping: explicit contrast -> DICOM series selector.
    """

    def __init__(
        self,
        app_context: AppContext,
        synthesizer: BundleSynthesizer,
        dicom: bool = True,
        overwrite: bool = False,
        dicom_mapping: Mapping[str, str] | None = None,
    ) -> None:
        self.app_context = app_context
        self.synthesizer = synthesizer
        self.dicom = dicom
        self.overwrite = overwrite
        self.dicom_mapping = dicom_mapping
        self.writer: SyntheticImageWriterOperator | None = None
        self.graph_stop = GraphStop()  # for run_stoppably()
        super().__init__([_PROGRAM])  # Holoscan would otherwise parse the host process's sys.argv

    @property
    def outputs(self) -> SynthesisOutputs:
        """What the last run wrote and which cases failed."""
        return self.writer.outputs if self.writer is not None else SynthesisOutputs()

    def compose(self) -> None:
        cases = CaseDiscoveryOperator(
            self, CountCondition(self, 1), name="cases", input_path=self.app_context.input_path,
            inputs=self.synthesizer.inputs, dicom_mapping=self.dicom_mapping, graph_stop=self.graph_stop,
        )
        synthesis = SynthesisOperator(
            self, name="synthesis", synthesizer=self.synthesizer, output_dir=self.app_context.output_path,
            overwrite=self.overwrite, graph_stop=self.graph_stop,
        )
        self.writer = SyntheticImageWriterOperator(
            self, name="writer", output_dir=self.app_context.output_path, synthesizer=self.synthesizer,
            dicom=self.dicom, overwrite=self.overwrite, graph_stop=self.graph_stop,
        )
        self.add_flow(cases, synthesis, {("cases", "cases")})
        self.add_flow(synthesis, self.writer, {("results", "results")})

    def run_stoppably(self) -> None:
        """``run()``, stopped cleanly by SIGTERM or Ctrl-C: raises ``SystemExit(143)`` (with the one line of
        :func:`agi_monai.data.stopping_cleanly_on_sigterm`) or ``KeyboardInterrupt`` once the compute that was
        running has ended (:class:`agi_monai.deploy.operators.GraphStop`: its case left as it was).

        Holoscan runs the graph's computes in threads of its own, where Python runs no signal handler, and installs
        C++ handlers for both signals that stop the scheduler only between computes (one compute here goes over
        every case) and end the process with status 1 three seconds later, mid-write. So the two signals are
        blocked (:func:`_stop_signals_blocked`: in every thread started meanwhile, as threads inherit the mask) and
        taken in the main thread with ``sigtimedwait``, where their Python handlers are called; and Python's
        handlers are put back in place of Holoscan's as the run goes, so that a thread started before the signals
        were blocked (which the kernel may pick for a process's signal) hands it to Python too. Outside the main
        thread: plain ``run()``.
        """
        if threading.current_thread() is not threading.main_thread():
            self.run()
            return
        with stopping_cleanly_on_sigterm(), _stop_signals_blocked():
            running = self.run_async()
            try:
                while not running.done():
                    _python_handlers_again()
                    received = signal.sigtimedwait(_STOP_SIGNALS, 0.1)
                    if received is not None:
                        _handle(received.si_signo)  # raises SystemExit(143) or KeyboardInterrupt
            except BaseException as stop:
                self.graph_stop.stop(KeyboardInterrupt if isinstance(stop, KeyboardInterrupt) else SystemExit)
                wait([running])  # the compute that was running cleans up; signals meanwhile are dropped
                while signal.sigtimedwait(_STOP_SIGNALS, 0) is not None:
                    pass
                raise
            finally:
                self.shutdown_async_executor()
            running.result()  # the run's own error, if any


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in the main thread, and so in every thread it starts meanwhile (torch's OpenMP
    pool, Holoscan's), from before the model loads: a signal then waits for :meth:`SynthesisApp.run_stoppably` or
    for the end of the block, where Python's handlers (put back in place of Holoscan's) take it. Nothing outside
    the main thread, where the mask cannot be set for the process's signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        _python_handlers_again()
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # one still pending is handled now


def _python_handlers_again() -> None:
    """Python's handlers of the two signals installed again, in place of the C++ ones Holoscan installs when a graph
    starts (``signal.getsignal`` still gives Python's, the last one Python set)."""
    for signum in _STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None:
            signal.signal(signum, handler)


def _handle(signum: int) -> None:
    """Call the Python handler of ``signum``, as Python would on its delivery (SIG_DFL of SIGINT: Ctrl-C)."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, load the bundle, run :class:`SynthesisApp`; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        with stopping_cleanly_on_sigterm(), _stop_signals_blocked():  # blocked before the model's threads start
            return _run(args)
    except SystemExit as stop:  # SIGTERM; stopping_cleanly_on_sigterm said so in one line
        return stop.code if isinstance(stop.code, int) else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{_PROGRAM}: interrupted; the outputs written so far are complete (a rerun without --overwrite does "
              "the rest)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    set_up_logging(args.log_level)
    context = AppContext({k: str(v) for k, v in vars(args).items() if k in ("input", "output", "model", "workdir") and v})
    try:
        # the output absolute, not resolved: a linked <bids>/derivatives/<pipeline> is still a BIDS derivative
        source, output = Path(context.input_path).resolve(), Path(context.output_path).absolute()
        _check_input(source)
        refuse_output_in_input(output, source)  # before the model loads (check_output_folder writes, after it)
        if args.report is not None:
            check_report_path(args.report, source, output)
        for contrast in args.dicom_mapping or {}:
            canonical_contrast(contrast)  # raises DataError naming the contrasts it knows
        synthesizer = BundleSynthesizer(context.model_path, device=args.device, overrides=_overrides(args.override))
        # created and written to now, not after every case has been synthesized
        check_output_folder(output)  # (refused inside the input above: the input is not walked again)
    except (BundleError, DataError) as error:
        print(f"{_PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    app = SynthesisApp(context, synthesizer, dicom=args.dicom, overwrite=args.overwrite, dicom_mapping=args.dicom_mapping)
    app.run_stoppably()
    outputs = app.outputs
    for failure in outputs.failures:
        print(f"  - {failure}", flush=True)
    written = [p for p in outputs.written if p.name.endswith(".nii.gz")]
    cases = len(written)
    if args.report is not None:  # the CLI's report, from the writer's outcome
        summary = SynthesisSummary(output, written=written, failures=list(outputs.failures), target=synthesizer.target)
        series = (lambda case_id: synthesis_output_paths(case_id, synthesizer.target, output)[1]) if args.dicom else None
        summary.write_report(args.report, series, bundle=synthesizer.name)
    failed = ", ".join(f.case_id for f in outputs.failures)
    print(
        f"{_PROGRAM}: {cases} of {cases + len(outputs.failures)} cases written ({synthesizer.target}, "
        f"{'NIfTI + DICOM' if args.dicom else 'NIfTI'}) to {output} by {synthesizer.name} in "
        f"{time.perf_counter() - started:.1f} s; {len(outputs.failures)} failed" + (f": {failed}" if failed else ""),
        flush=True,
    )
    return EXIT_FAILED if outputs.failures or not cases else EXIT_OK


def _check_input(source: Path) -> None:
    """Refuses an input that cannot hold a case: missing, a file other than a JSON datalist, an empty folder."""
    expected = "a DICOM study, a folder of NIfTI cases or a JSON datalist (-i)"
    if not source.exists():
        raise DataError(source, "does not exist", expected)
    if source.is_file() and source.suffix.lower() != ".json":
        raise DataError(source, "is a single file", f"{expected}: put a case's contrasts in a folder of their own")
    if source.is_dir() and not any(path.is_file() for path in source.rglob("*")):
        raise DataError(source, "holds no file", expected)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROGRAM,
        description="Synthesize a missing MR contrast with an agi-monai bundle (MONAI Deploy application): a DICOM "
        "study or NIfTI cases in, float32 NIfTI and a derived DICOM series out.",
    )
    # MONAI Deploy's standard options (monai.deploy.core.arg_parser), defaults from HOLOSCAN_* variables
    parser.add_argument("-i", "--input", help="DICOM study, folder of NIfTI cases or JSON datalist (default: $HOLOSCAN_INPUT_PATH or ./input)")
    parser.add_argument("-o", "--output", help="output folder (default: $HOLOSCAN_OUTPUT_PATH or ./output)")
    parser.add_argument("-m", "--model", help="TorchScript file from 'agi-monai export' or a bundle folder (default: $HOLOSCAN_MODEL_PATH or ./models)")
    parser.add_argument("-w", "--workdir", help="working folder (unused; MONAI Deploy's option)")
    parser.add_argument("-l", "--log-level", dest="log_level", type=str.upper, choices=["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"])
    parser.add_argument("--device", help="torch device (default: cuda:0 when available, else cpu)")
    parser.add_argument("--no-dicom", dest="dicom", action="store_false", help="write NIfTI only")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--report", type=Path, help="a JSON file to write every case's outcome into (for a pipeline)")
    parser.add_argument("--dicom-mapping", type=_json_object, help='contrast -> series selector, e.g. \'{"T2": "AX T2 FSE"}\'')
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                        help="inference.json override, VALUE as JSON, e.g. network_def#channels=[8,16,16,32] (repeatable)")
    return parser


def _json_object(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error}); expected an object") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``ID=VALUE`` pairs, each VALUE parsed as JSON when it is JSON, else kept as text."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key:
            raise BundleError(f"--override {pair!r}: expected ID=VALUE, e.g. network_def#channels=[8,16,16,32]")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides
