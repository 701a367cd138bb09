"""MONAI Deploy operators for contrast synthesis: cases in (NIfTI or a DICOM study, series matched per contrast),
the bundle's synthesis, float32 NIfTI and a derived DICOM series out.

Three operators joined in memory (Holoscan ``emit``/``receive``, one compute each per run):

``CaseDiscoveryOperator`` -> ``"cases"`` (:class:`agi_monai.data.Discovery`) -> ``SynthesisOperator`` ->
``"results"`` (:class:`SynthesisResults`) -> ``SyntheticImageWriterOperator``.

Stopping (SIGTERM, Ctrl-C): Holoscan calls ``compute`` from a thread of its own, where Python runs no signal handler,
so :func:`agi_monai.deploy.app.main` waits for the signals in the main thread and, when one comes, has
:meth:`GraphStop.stop` raise the same exception in the compute that is running: as in the CLI, the case being
written is left as it was (temporary files removed, an overwrite's earlier outputs restored) and nothing more is done.

Our own inference operator rather than the SDK's ``MonaiBundleInferenceOperator``: that one feeds a single
``Image`` to the bundle and casts every image output to ``uint8`` in ``_send_output``, where a synthesized MR
image is float32 in [0, 1]; and it would bypass our contrast matching and registration, which the bundle's
``preprocessing`` does from a case (contrast -> file).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.data import MetaTensor

from agi_monai.data import DataError, Discovery, Failure, discover_cases, failure_reason
from agi_monai.deploy.sdk import import_deploy_sdk
from agi_monai.deploy.synthesis import BundleSynthesizer, SynthesisOutputs, refuse_existing_outputs, write_synthesis_outputs

import_deploy_sdk()
from monai.deploy.core import Fragment, Operator, OperatorSpec  # noqa: E402  (after the SDK is on the path)

__all__ = [
    "CaseDiscoveryOperator", "GraphStop", "StoppableOperator", "SynthesisOperator", "SynthesisResults",
    "SyntheticImageWriterOperator",
]

_logger = logging.getLogger(__name__)


class GraphStop:
    """Stops a running graph from the main thread: :meth:`stop` raises ``SystemExit`` (SIGTERM) or
    ``KeyboardInterrupt`` (Ctrl-C) in the thread running an operator's compute (at its next bytecode, as the signal
    handler would in the main thread: the ``finally`` of :func:`agi_monai.data.files.atomic_output` and the restoring
    ``except`` of :func:`agi_monai.deploy.write_synthesis_outputs` run), and the computes after it do nothing: the
    graph ends with nothing more emitted or written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread running a compute now
        self.stopped_by: type[BaseException] | None = None

    def run(self, compute: Callable[[], None]) -> None:
        """An operator's compute, unless the graph was stopped; the stop's exception ends it quietly."""
        with self._lock:
            if self.stopped_by is not None:
                return
            self._thread = threading.get_ident()
        try:
            compute()
        except (SystemExit, KeyboardInterrupt):
            if self.stopped_by is None:  # not ours
                raise
        finally:
            with self._lock:
                # (an exception stop() sent that has not been raised yet, the compute having just ended, is dropped)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)
                self._thread = None

    def stop(self, exception: type[BaseException]) -> None:
        """Stop the graph: ``exception`` (``SystemExit`` or ``KeyboardInterrupt``) is raised in the running compute."""
        with self._lock:
            self.stopped_by = exception
            if self._thread is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(exception))


@dataclass
class SynthesisResults:
    """What :class:`SynthesisOperator` emits: each synthesized case with its prediction, and the failed cases."""

    predictions: list[tuple[dict[str, Any], MetaTensor]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


class StoppableOperator(Operator):
    """An operator whose compute :class:`GraphStop` can stop: subclasses implement ``_compute(op_input, op_output)``.

    Args:
        fragment: the application.
        graph_stop: the application's :class:`GraphStop` (None: its own, which nothing stops).
    """

    def __init__(self, fragment: Fragment, *args: Any, graph_stop: GraphStop | None = None, **kwargs: Any) -> None:
        # Holoscan calls setup() from the base constructor: a subclass sets its attributes before calling this
        self.graph_stop = graph_stop or GraphStop()
        super().__init__(fragment, *args, **kwargs)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        self.graph_stop.run(lambda: self._compute(op_input, op_output))

    def _compute(self, op_input: Any, op_output: Any) -> None:
        raise NotImplementedError


class CaseDiscoveryOperator(StoppableOperator):
    """Source operator: the cases of the input folder (NIfTI files named by contrast and/or DICOM series matched to
    contrasts by SeriesDescription/ProtocolName, :func:`agi_monai.data.discover_cases`) that have the bundle's inputs.

    Output ``"cases"``: a :class:`agi_monai.data.Discovery` (cases and skipped cases with the reason).

    Args:
        fragment: the application.
        input_path: a folder (a DICOM study, a folder of NIfTI cases, or both) or a JSON datalist.
        inputs: the contrasts each case must have (the bundle's inputs).
        dicom_mapping: explicit contrast -> series selector (UID, number or description) for DICOM studies whose
            descriptions the rules do not match.
        kwargs: ``graph_stop`` (:class:`StoppableOperator`) and Holoscan's operator arguments.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        input_path: str | Path,
        inputs: Sequence[str],
        dicom_mapping: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.input_path = Path(input_path)
        self.inputs = list(inputs)
        self.dicom_mapping = dict(dicom_mapping) if dicom_mapping else None
        super().__init__(fragment, *args, **kwargs)  # after the attributes setup() may read

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("cases")

    def _compute(self, op_input: Any, op_output: Any) -> None:
        discovery = discover_cases(self.input_path, required=self.inputs, dicom_mapping=self.dicom_mapping)
        # the counts only: discovery has warned about each skipped case, and the app lists them at the end
        _logger.info("%s", discovery.summary(self.input_path).splitlines()[0])
        op_output.emit(discovery, "cases")


class SynthesisOperator(StoppableOperator):
    """Inference operator: the bundle's synthesis (:class:`agi_monai.deploy.BundleSynthesizer`) for every case, float32
    on each case's reference grid. A case that fails is recorded with its reason and the others go on.

    Input ``"cases"`` (:class:`agi_monai.data.Discovery`); output ``"results"`` (:class:`SynthesisResults`).

    Args:
        fragment: the application.
        synthesizer: the loaded bundle.
        output_dir: where the writer puts the outputs; a case whose outputs (NIfTI or DICOM folder) exist there
            fails at once, without being synthesized (unless ``overwrite``; a file or folder there that no synthesis
            wrote, always). None: no check.
        overwrite: the writer replaces existing outputs.
        kwargs: ``graph_stop`` (:class:`StoppableOperator`) and Holoscan's operator arguments.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        synthesizer: BundleSynthesizer,
        output_dir: str | Path | None = None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        self.synthesizer = synthesizer
        self.output_dir = output_dir
        self.overwrite = overwrite
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")
        spec.output("results")

    def _compute(self, op_input: Any, op_output: Any) -> None:
        discovery: Discovery = op_input.receive("cases")
        results = SynthesisResults(failures=list(discovery.failures))
        for case in discovery.cases:
            try:
                if self.output_dir is not None:
                    refuse_existing_outputs(str(case["case_id"]), self.synthesizer.target, self.output_dir, self.overwrite)
                results.predictions.append((case, self.synthesizer(case)))
            except Exception as error:  # one bad case must not stop the others; the reason is reported
                results.failures.append(Failure(str(case["case_id"]), failure_reason(error)))
                _logger.error("%s", results.failures[-1])
        op_output.emit(results, "results")


class SyntheticImageWriterOperator(StoppableOperator):
    """Sink operator: ``<case>_<target>.nii.gz`` (float32) and ``<case>_<target>_dicom/`` (a derived MR series) per
    case (:func:`agi_monai.deploy.write_synthesis_outputs`); a case whose output exists fails unless ``overwrite``.

    Input ``"results"`` (:class:`SynthesisResults`). What was written is kept in :attr:`outputs`.

    Args:
        fragment: the application.
        output_dir: the output folder (created).
        synthesizer: the loaded bundle (target, inputs and name for the file names and DICOM descriptions).
        dicom: also write the DICOM series.
        overwrite: replace existing outputs.
        kwargs: ``graph_stop`` (:class:`StoppableOperator`) and Holoscan's operator arguments.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_dir: str | Path,
        synthesizer: BundleSynthesizer,
        dicom: bool = True,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.synthesizer = synthesizer
        self.dicom = dicom
        self.overwrite = overwrite
        self.outputs = SynthesisOutputs()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")

    def _compute(self, op_input: Any, op_output: Any) -> None:
        results: SynthesisResults = op_input.receive("results")
        self.outputs.failures.extend(results.failures)
        for case, prediction in results.predictions:
            try:
                self.outputs.written.extend(
                    write_synthesis_outputs(case, prediction, self.synthesizer, self.output_dir, self.dicom, self.overwrite)
                )
            except (DataError, OSError) as error:
                self.outputs.failures.append(Failure(str(case["case_id"]), str(error)))
                _logger.error("%s", self.outputs.failures[-1])
