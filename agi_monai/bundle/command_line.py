"""What the bundles' ``initialize`` steps do for a ``python -m monai.bundle`` command line: name a failure's cause
last (:func:`report_failures`), and refuse overrides that name no setting of the bundle (:func:`check_command_line`).

``python -m monai.bundle run --config_file .../train.json --epoch 1`` (for ``--epochs``) makes MONAI add a new
top-level key ``epoch`` that nothing reads: the run trains its 60 epochs, silently. MONAI accepts any override by
design (an override may add a key that another one references), and its ``ConfigWorkflow`` checks only that
required properties exist, so an ``initialize`` step calls :func:`check_command_line`, which reads the command line
back and names the unknown override before any work (with the setting it most resembles).

MONAI reports an exception raised in a config expression as ``RuntimeError: Failed to evaluate ConfigExpression:
'$...'``, last, below the traceback that holds our message (which file, what is wrong, what was expected) somewhere in
its middle; the first ``initialize`` step, :func:`report_failures`, makes a failed run end with one line naming the
cause.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

from agi_monai.data.errors import failure_reason

__all__ = ["check_command_line", "check_distributed_launch", "report_failures"]

# MONAI's experiment-tracking settings: overrides that ``--tracking`` reads although no config holds them
# (``monai.bundle.scripts.run``'s docstring lists them).
TRACKING_SETTINGS = ("output_dir", "tracking_uri", "experiment_name", "run_name", "save_execute_config")


def _run_arguments() -> set[str]:
    """What ``monai.bundle run`` takes for itself rather than as overrides: the arguments of ``run``
    (``config_file``, ``run_id``, …), of ``create_workflow`` (``workflow_name``) and of ``ConfigWorkflow``
    (``workflow_type``, ``properties_path``), through which it passes the rest."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    return {
        name
        for function in (run, create_workflow, ConfigWorkflow.__init__)
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is not p.VAR_KEYWORD and name != "self"
    }


def _is_flag(word: str) -> bool:
    """Whether Fire reads ``word`` as a flag: ``--name`` or ``-name``, not a value like ``-1``."""
    return word.startswith("--") or re.match(r"^-[a-zA-Z]", word) is not None


def _options(arguments: Sequence[str]) -> dict[str, str | None]:
    """The flags of a Fire command line as Fire reads them: ``--name value``, ``--name=value``, ``--name`` (no
    value), one or two dashes, ``-`` in a name read as ``_``; positional words skipped; nothing after a lone
    ``--`` (Fire's own flags)."""
    options: dict[str, str | None] = {}
    i = 0
    while i < len(arguments):
        word = arguments[i]
        i += 1
        if word == "--":
            break
        if not _is_flag(word):
            continue
        key, has_value, value = word.lstrip("-").partition("=")
        if not has_value:
            value = None
            if i < len(arguments) and not _is_flag(arguments[i]) and arguments[i] != "--":
                value = arguments[i]
                i += 1
        options[key.replace("-", "_")] = value
    return options


#: What a user means as a truth value but Fire, which reads MONAI's command line, keeps as a string (true, whatever
#: it says, wherever it is tested).
_TRUTH_WORDS = frozenset({"true", "false", "yes", "no", "on", "off"})


def _truth_value_problem(name: str, value: str | None, default: object) -> str:
    """What is wrong with ``--name value`` as a truth value, or "": a truth word Fire keeps as a string (``--amp
    false``, ``--train#dataloader#shuffle no``: any setting, as an expression default such as ``amp``'s or a nested
    one is a yes/no setting too), or, for a setting whose default is True or False, a value Fire reads as neither
    (``--compile maybe``). ``True``/``False``, ``1``/``0``, a bare flag (True) and MONAI's expressions and references
    (``$...``, ``@...``, ``%...``) are accepted."""
    from fire.parser import DefaultParseValue

    if value is None or value.startswith(("$", "@", "%")):
        return ""
    parsed = DefaultParseValue(value)
    if isinstance(parsed, str) and parsed.strip().lower() in _TRUTH_WORDS:
        return (f"--{name} {value}: the command line reads Python's spelling only, so {value!r} would stay a string, "
                f"which counts as true (expected True or False)")
    if isinstance(default, bool) and parsed not in (True, False):  # (1 == True and 0 == False)
        return f"--{name} {value} is not True or False"
    return ""


def _file_list(value: str | None) -> list[str]:
    """``a.json`` or ``['a.json','b.json']`` (how the README passes several configs) as a list of paths."""
    if not value:
        return []
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = [part.strip(" '\"") for part in text.strip("[]").split(",")]
        return [str(part) for part in parsed]
    return [text]


def _is_bundle_command(program: str) -> bool:
    """Whether this process is ``python -m monai.bundle`` (its argv[0] is that package's ``__main__.py``)."""
    path = Path(program)
    return path.name == "__main__.py" and path.parent.name == "bundle" and path.parent.parent.name == "monai"


def bundle_command_line() -> str | None:
    """This process's command as typed, ``python -m monai.bundle run ...`` with its overrides; None in a process that
    is not ``python -m monai.bundle`` (a workflow run from Python: MONAI Label, MONAI Deploy, tests)."""
    if not sys.argv or not _is_bundle_command(sys.argv[0]):
        return None
    return shlex.join(["python", "-m", "monai.bundle", *sys.argv[1:]])


def _report_cause_last(previous_hook):
    """An ``excepthook`` that prints the traceback as ``previous_hook`` does, then one line with the failure's cause
    (:func:`agi_monai.data.failure_reason`: our error's message, else the innermost exception), what a reader of the
    end of a long log needs. Ctrl-C is left as it is."""

    def hook(kind, value, traceback):
        previous_hook(kind, value, traceback)
        if isinstance(value, Exception):
            print(f"\nmonai.bundle run failed: {failure_reason(value)}", file=sys.stderr, flush=True)

    hook.reports_cause_last = True
    return hook


def report_failures() -> None:
    """In ``python -m monai.bundle``, sets ``sys.excepthook`` so that a failed run ends with one line naming its cause,
    ``monai.bundle run failed: <file>: <what is wrong> (expected …)``, below MONAI's traceback. Does nothing in any
    other process (a workflow run from Python: MONAI Label, MONAI Deploy, tests), whose failures are its caller's to
    report, or when the hook is already set. The bundles' first ``initialize`` step, so that every later failure,
    :func:`check_command_line`'s included, is reported this way."""
    if sys.argv and _is_bundle_command(sys.argv[0]) and not getattr(sys.excepthook, "reports_cause_last", False):
        sys.excepthook = _report_cause_last(sys.excepthook)


#: What torchrun (torch.distributed.run) sets in each process it starts, and ``multi_gpu_train.json`` reads.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_distributed_launch() -> None:
    """``multi_gpu_train.json``'s step before its process group: raises, saying how to launch it, unless torchrun
    started this process (before: "environment variable RANK expected, but not set" from ``init_process_group``)."""
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.json runs one process per GPU, started by torchrun, which sets {', '.join(missing)} "
            "(not set here): run `torchrun --standalone --nproc_per_node=<GPUs> -m monai.bundle run training "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\" ...`, or train.json alone on one GPU"
        )


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Raises ``ValueError`` naming each ``--override`` of ``argv`` (default ``sys.argv``) that is neither an
    argument of ``monai.bundle run``, nor a top-level key of the config files it runs (``--config_file``, and the
    ``args_file``'s keys), nor, with ``--tracking``, one of MONAI's tracking settings. ``a#b`` overrides are checked
    by their first part (a wrong nested name fails where it is used). Does nothing when the process is not
    ``python -m monai.bundle`` (a workflow run from Python: MONAI Label, MONAI Deploy, tests) or names no config file.

    Args:
        argv: the command line, ``sys.argv`` by default.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not _is_bundle_command(argv[0]):
        return
    options = _options(argv[1:])
    known = _run_arguments()
    args_file = options.get("args_file")
    if args_file:
        defaults = ConfigParser.load_config_file(args_file)
        known |= set(defaults)
        options.setdefault("config_file", defaults.get("config_file"))
    config_files = _file_list(options.get("config_file"))
    if not config_files:
        return
    defaults: dict[str, object] = {}  # each top-level setting's value in the configs, the last file's winning
    for path in config_files:
        defaults.update(ConfigParser.load_config_file(path))
    settings = list(defaults)
    known |= set(settings)
    if options.get("tracking"):
        known |= set(TRACKING_SETTINGS)
    unknown, wrong_values = [], []
    for name, value in options.items():
        key = name.split("#", 1)[0]
        if key in known:
            problem = _truth_value_problem(name, value, defaults.get(name))
            if problem:
                wrong_values.append(problem)
            continue
        close = difflib.get_close_matches(key, settings, n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else "the bundle's docs/README.md lists its settings"
        unknown.append(f"--{name} is not a setting of {' + '.join(config_files)} ({hint})")
    problems = []
    if unknown:
        problems.append("; ".join(unknown) + ". MONAI would add it as a new key that nothing reads")
    if wrong_values:
        problems.append("; ".join(wrong_values))
    if problems:
        raise ValueError("command line: " + ". ".join(problems) + ".")
