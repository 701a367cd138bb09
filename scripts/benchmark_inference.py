"""Inference cost of one case: how long a volume's synthesis takes and how much memory it needs, with the paper's
AGI-Net (widths 64-128-256-512, 19 M parameters) and ResUNet beside it.

    python scripts/benchmark_inference.py --device cpu --slices 16                 # per slice, extrapolated to 155
    python scripts/benchmark_inference.py --device cpu                             # a whole BraTS volume (155 slices)
    python scripts/benchmark_inference.py --device cuda --batch_sizes 4,16,64      # float32 and AMP
    python scripts/benchmark_inference.py --slices 16 --end_to_end tests/data/tcga-lgg/TCGA-FG-6692-native

Network only: a random (C, 240, 240, D) volume through :func:`agi_monai.engines.synthesize_volume`, the step the
bundles' inference runs (MONAI ``SliceInferer``, axial slices, ``slices per batch`` at a time). The weights are
random: a forward pass costs the same whatever their values. The configurations (network x precision x slices per
batch) are timed interleaved (one volume of each in turn, ``repeats`` rounds after ``warmup`` rounds of one batch
each), and the table reports the minimum over the rounds with the median beside it, as the other benchmarks.
Peak memory: on the CPU, a fresh process per configuration runs one volume, and the figure is its peak resident
set (``VmHWM``, reset before the run through ``/proc/self/clear_refs``) minus its resident set just before the run,
with the network and the input volume in memory (a fresh process: no configuration reuses heap another freed);
the process's whole peak is beside it. On CUDA, ``torch.cuda.max_memory_allocated`` over the run minus what was
allocated before it.

End to end (``--end_to_end CASE_FOLDER``): ``python -m agi_monai synthesize CASE_FOLDER --bundle COPY`` as a user
runs it, with COPY a temporary copy of ``--bundle`` holding untrained weights of ``--channels`` widths, timed as a
whole (interpreter start included). The command itself logs no per-stage times, so the child process wraps (without
changing them) the steps of :class:`agi_monai.bundle.FolderSynthesis`: reading and preprocessing the case (the
MONAI dataset item; registration, :class:`agi_monai.data.transforms.AlignToReferenced`, inside it), the network
(:func:`agi_monai.engines.inference.infer_case`) and the rest of the case (restoring the input grid, writing).

Prints a markdown table (machine, load average, commit, command in its header) and writes the results to ``out``:
JSON (including the markdown) for ``.json``, the markdown alone for ``.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agi_monai.cli import UsageError, check_whole_numbers, run_script
from agi_monai.engines.inference import synthesize_volume
from agi_monai.networks import AGINet, ResUNet
from agi_monai.ops import extension_available, extension_has_cuda

ROOT = Path(__file__).resolve().parent.parent
BRATS_SLICES = 155  # axial slices of a BraTS volume (240 x 240 x 155, 1 mm)
NETWORKS = {"AGI-Net": AGINet, "ResUNet": ResUNet}
DEFAULT_BATCH_SIZES = {"cpu": (2, 16), "cuda": (4, 16, 64)}  # 16: the bundles' inference.json (slices_per_batch)
BUNDLE_SLICES_PER_BATCH = 16

# The child process of --end_to_end: the timing wrappers, then the command line as `python -m agi_monai` runs it.
# argv: the JSON file to write the step times to, then the command's arguments.
_TIMED_COMMAND = r"""
import functools, json, sys, time
import monai.data
import agi_monai.bundle.inference as folder
from agi_monai.bundle import FolderSynthesis
from agi_monai.data.transforms import AlignToReferenced
from agi_monai.cli import main

seconds = {"case": 0.0, "read_preprocess": 0.0, "registration": 0.0, "network": 0.0}

def timed(function, key):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return wrapper

FolderSynthesis._synthesize = timed(FolderSynthesis._synthesize, "case")
monai.data.Dataset.__getitem__ = timed(monai.data.Dataset.__getitem__, "read_preprocess")
AlignToReferenced.__call__ = timed(AlignToReferenced.__call__, "registration")
network = timed(folder.infer_case, "network")

def infer_case(network_module, inferer, image, *args, **kwargs):
    seconds["slices"] = seconds.get("slices", 0) + image.shape[-1]
    return network(network_module, inferer, image, *args, **kwargs)

folder.infer_case = infer_case
status = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seconds, f)
sys.exit(status)
"""

# The child process of a CPU memory measurement: this script's measure_memory, arguments as JSON.
_MEMORY_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("benchmark_inference", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.measure_memory(**json.loads(sys.argv[2]))))
"""


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "commit": commit,
        "extension_available": extension_available(),  # without it AGI-Net's group_roll is the slower pure PyTorch
        "extension_has_cuda": extension_has_cuda(),
    }


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def build_network(name: str, channels: tuple[int, ...], inputs: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)  # random weights: the time of a forward pass does not depend on them
    return NETWORKS[name](in_channels=inputs, out_channels=1, channels=channels).to(device).eval()


def random_volume(inputs: int, size: int, slices: int) -> torch.Tensor:
    """A preprocessed case as the bundles' dataset hands it over: (C, H, W, D) float32 in [0, 1] on the CPU."""
    return torch.rand((inputs, size, size, slices), generator=torch.Generator().manual_seed(0))


def _memory_status(field: str) -> int:
    """``field`` (VmRSS, VmHWM) of this process in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_memory(network: str, channels: list[int], inputs: int, size: int, slices: int, batch: int,
                   threads: int | None = None) -> dict:
    """One volume's synthesis on the CPU in this (fresh) process: its peak resident set over the resident set before
    the run (network and volume already in memory), and the process's whole peak, in bytes."""
    if threads:
        torch.set_num_threads(threads)
    model = build_network(network, tuple(channels), inputs, "cpu")
    volume = random_volume(inputs, size, slices)
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    before = _memory_status("VmRSS")
    synthesize_volume(model, volume, "cpu", batch)
    peak = _memory_status("VmHWM")
    return {"growth_bytes": peak - before, "peak_bytes": peak}


def cpu_memory(network: str, channels: tuple[int, ...], inputs: int, size: int, slices: int, batch: int,
               threads: int | None) -> dict:
    arguments = {"network": network, "channels": list(channels), "inputs": inputs, "size": size, "slices": slices,
                 "batch": batch, "threads": threads}
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).resolve()), json.dumps(arguments)],
                            capture_output=True, text=True, env=_child_env(threads))
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement of {network}, batch {batch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child_env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def time_interleaved(runs: dict, device: str, warmup_runs: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (key -> fn), run in turn, ``repeats`` rounds after ``warmup`` rounds of
    ``warmup_runs`` (the same keys; one batch each)."""
    for _ in range(warmup):
        for run in warmup_runs.values():
            run()
    times: dict = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return times


def network_rows(device: str, channels: tuple[int, ...], inputs: int, size: int, slices: int,
                 batch_sizes: list[int], warmup: int, repeats: int, memory: bool, threads: int | None) -> list[dict]:
    networks = {name: build_network(name, channels, inputs, device) for name in NETWORKS}
    volume = random_volume(inputs, size, slices)
    one_batch = {batch: random_volume(inputs, size, min(batch, slices)) for batch in batch_sizes}
    precisions = [False, True] if device == "cuda" else [False]  # the bundles autocast on CUDA only
    keys = [(name, amp, batch) for name in NETWORKS for amp in precisions for batch in batch_sizes]

    def run(key, data):
        name, amp, batch = key
        return lambda: synthesize_volume(networks[name], data, device, batch, amp)

    times = time_interleaved({key: run(key, volume) for key in keys}, device,
                             {key: run(key, one_batch[key[2]]) for key in keys}, warmup, repeats)
    rows = []
    for key in keys:
        name, amp, batch = key
        fastest, median = min(times[key]), statistics.median(times[key])
        row = {
            "network": name, "parameters": sum(p.numel() for p in networks[name].parameters()),
            "precision": "AMP (autocast float16)" if amp else "float32", "slices_per_batch": batch,
            "slices": slices, "seconds": fastest, "median_seconds": median, "all_seconds": times[key],
            "ms_per_slice": 1e3 * fastest / slices, "median_ms_per_slice": 1e3 * median / slices,
            "seconds_per_volume": fastest / slices * BRATS_SLICES, "volume_measured": slices == BRATS_SLICES,
        }
        if memory and device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            synthesize_volume(networks[name], volume, device, batch, amp)
            row["memory_growth_bytes"] = torch.cuda.max_memory_allocated() - before
            row["memory_kind"] = "torch.cuda.max_memory_allocated"
        elif memory:
            measured = cpu_memory(name, channels, inputs, size, slices, batch, threads)
            row["memory_growth_bytes"], row["peak_rss_bytes"] = measured["growth_bytes"], measured["peak_bytes"]
            row["memory_kind"] = "peak RSS growth"
        rows.append(row)
        print(f"{name}, {row['precision']}, {batch} slices per batch: {row['ms_per_slice']:.1f} ms per slice",
              file=sys.stderr, flush=True)
    return rows


def end_to_end(case: Path, bundle, channels: tuple[int, ...], device: str, batch: int | None,
               threads: int | None) -> dict:
    """``agi-monai synthesize`` of the case folder ``case`` with a copy of ``bundle`` (a ``BundleInfo``) holding
    untrained weights."""
    inputs = len(bundle.inputs)
    with tempfile.TemporaryDirectory(prefix="benchmark-inference-") as scratch:
        copy = Path(scratch) / bundle.root.name
        shutil.copytree(bundle.root, copy, ignore=shutil.ignore_patterns("models", "eval"))
        (copy / "models").mkdir()
        torch.save(build_network("AGI-Net", channels, inputs, "cpu").state_dict(), copy / "models" / "model.pt")
        times_file = Path(scratch) / "times.json"
        command = ["synthesize", str(case), "--bundle", str(copy), "--output_dir", str(Path(scratch) / "out"),
                   "--device", device, "--progress", "False", f"--network_def#channels={list(channels)}".replace(" ", "")]
        if batch:
            command += ["--batch_size", str(batch)]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _TIMED_COMMAND, str(times_file), *command],
                                capture_output=True, text=True, env=_child_env(threads), cwd=ROOT)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"agi-monai synthesize {case} failed (exit status {result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        steps = json.loads(times_file.read_text())
        outputs = sorted(p.name for p in (Path(scratch) / "out").rglob("*.nii.gz"))
        summary = next((line.replace(scratch, "<tmp>") for line in result.stdout.splitlines()
                        if line.startswith("agi-monai synthesize:")), "")
    return {
        "case": str(case), "bundle": bundle.name, "channels": list(channels), "device": device,
        "slices_per_batch": batch or BUNDLE_SLICES_PER_BATCH, "outputs": outputs,
        "slices": int(steps.get("slices", 0)),
        "command": "python -m agi_monai " + " ".join([command[0], _shown(case), "--bundle", f"<copy of {bundle.name}>",
                                                      "--output_dir", "<tmp>", *command[6:]]),
        "wall_seconds": wall,
        "setup_seconds": wall - steps["case"],  # interpreter, imports, bundle parse, weights, case discovery
        "read_preprocess_seconds": steps["read_preprocess"] - steps["registration"],
        "registration_seconds": steps["registration"],
        "network_seconds": steps["network"],
        "restore_write_seconds": steps["case"] - steps["read_preprocess"] - steps["network"],
        "summary_line": summary,
    }


def markdown(info: dict, rows: list[dict], e2e: dict | None, settings: dict) -> str:
    measured = rows[0]["volume_measured"]
    lines = [
        "#### Inference: one case, network only",
        "",
        f"- CPU: {info['cpu']} ({info['cpu_count']} cores, torch threads {info['torch_threads']}, "
        f"OMP_NUM_THREADS {info['OMP_NUM_THREADS'] or 'unset'}); load average {settings['load_before']} before, "
        f"{settings['load_after']} after",
        f"- GPU: {info['gpu'] or 'none'}; torch {info['torch']} (CUDA {info['torch_cuda']}), Python {info['python']}; "
        f"commit {info['commit']}; compiled group_roll {'yes' if info['extension_available'] else 'NO (pure PyTorch)'}",
        f"- {settings['inputs']} inputs, {settings['size']}×{settings['size']} slices, widths {settings['channels']}, "
        f"random weights; {settings['slices']} slices timed, minimum of {settings['repeats']} interleaved runs after "
        f"{settings['warmup']} warm-up run(s) of one batch (median in brackets); "
        + ("per volume measured" if measured else f"per volume = per slice × {BRATS_SLICES} (extrapolated)"),
        f"- memory: {rows[0].get('memory_kind', 'not measured')}"
        + (" (a fresh process per row, one volume: peak RSS minus RSS before the run; the process's whole peak beside it)"
           if rows[0].get("memory_kind") == "peak RSS growth" else ""),
        f"- command: `{settings['command']}`",
        "",
        "| network | parameters | precision | slices per batch | per slice (ms) | per 155-slice volume (s) "
        "| memory growth (MiB) | peak RSS (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    mib = 2 ** 20
    for r in rows:
        growth = f"{r['memory_growth_bytes'] / mib:.0f}" if "memory_growth_bytes" in r else "-"
        peak = f"{r['peak_rss_bytes'] / mib:.0f}" if "peak_rss_bytes" in r else "-"
        lines.append(
            f"| {r['network']} | {_count(r['parameters'])} | {r['precision']} | {r['slices_per_batch']}"
            f"{' (bundles)' if r['slices_per_batch'] == BUNDLE_SLICES_PER_BATCH else ''} | {r['ms_per_slice']:.1f} "
            f"({r['median_ms_per_slice']:.1f}) | {r['seconds_per_volume']:.1f} | {growth} | {peak} |"
        )
    if e2e:
        lines += [
            "",
            f"#### Inference: one case, end to end (`agi-monai synthesize`, {e2e['bundle']}, AGI-Net widths "
            f"{e2e['channels']}, untrained, {e2e['device']}, {e2e['slices_per_batch']} slices per batch)",
            "",
            f"- case: `{_shown(Path(e2e['case']))}`;"
            f" {e2e['slices']} axial slices through the network; output {', '.join(e2e['outputs'])}",
            f"- command: `{e2e['command']}`",
            f"- its last line: `{e2e['summary_line']}`",
            "",
            "| whole command (s) | start, imports, bundle, weights (s) | read + preprocess (s) | registration (s) "
            "| network (s) | restore grid + write (s) |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {e2e['wall_seconds']:.1f} | {e2e['setup_seconds']:.1f} | {e2e['read_preprocess_seconds']:.1f} | "
            f"{e2e['registration_seconds']:.1f} | {e2e['network_seconds']:.1f} | {e2e['restore_write_seconds']:.1f} |",
        ]
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.1f} M" if parameters >= 100_000 else f"{parameters:,}"


def _whole_numbers(value, flag: str) -> list[int]:
    """A comma-separated list given on the command line (fire: a tuple, a list or one int) as whole numbers."""
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = [int(str(item).strip()) for item in items]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise UsageError(f"--{flag} {value}: expected comma-separated whole numbers >= 1")
    return numbers


def main(device: str = "cpu", slices: int = BRATS_SLICES, batch_sizes=None, channels=(64, 128, 256, 512),
         size: int = 240, inputs: int = 3, warmup: int = 1, repeats: int = 3, threads: int | None = None,
         memory: bool = True, end_to_end_case: str | None = None, bundle: str = "brats_t1_flair_t1gd_to_t2",
         out: str | None = None) -> None:
    """Times one case's synthesis with AGI-Net and ResUNet (network only) and, with --end_to_end_case, the command.

    Args:
        device: cpu or cuda (float32, and AMP on cuda as the bundles run it).
        slices: axial slices to time (default 155, a whole BraTS volume); fewer are reported per slice and
            extrapolated to 155.
        batch_sizes: comma-separated slices per forward pass (default 2,16 on cpu, 4,16,64 on cuda; the bundles: 16).
        channels: the networks' widths (default the paper's 64,128,256,512); multiples of 8 (CAGR's groups).
        size: the slices' side (default 240, BraTS); a multiple of 8.
        inputs: input contrasts (default 3).
        warmup: warm-up rounds (one batch of every configuration each).
        repeats: timed rounds; the minimum is reported, the median beside it.
        threads: torch.set_num_threads (default: torch's choice, printed).
        memory: measure peak memory (on the CPU, one more run per configuration, in a fresh process).
        end_to_end_case: a case folder to run `agi-monai synthesize` on with --bundle (untrained weights of
            --channels); e.g. tests/data/tcga-lgg/TCGA-FG-6692-native (native scans: registration).
        bundle: the bundle of --end_to_end_case (its inputs must be in the case).
        out: where to write the results (.json or .md); none: print only.
    """
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: expected cpu or cuda")
    check_whole_numbers(slices=(slices, 1), size=(size, 8), inputs=(inputs, 1), warmup=(warmup, 0),
                        repeats=(repeats, 1), threads=(threads, 1))
    if size % 8:
        raise UsageError(f"--size {size}: expected a multiple of 8 (the networks halve the image three times)")
    widths = _whole_numbers(channels, "channels")
    if len(widths) != 4 or any(w % 8 for w in widths):
        raise UsageError(f"--channels {channels}: expected 4 comma-separated widths, multiples of 8 (CAGR's groups)")
    batches = _whole_numbers(batch_sizes, "batch_sizes") if batch_sizes is not None else list(DEFAULT_BATCH_SIZES[device])
    if out and Path(out).suffix not in (".json", ".md"):
        raise UsageError(f"--out {out}: expected a file name ending in .json or .md")
    case = chosen_bundle = None
    if end_to_end_case is not None:
        from agi_monai.bundle.registry import BundleError, find_bundle

        try:
            chosen_bundle = find_bundle(bundle)
        except BundleError as error:
            raise UsageError(f"--bundle {bundle}: {error}") from None
        case = Path(str(end_to_end_case)).resolve()
        if not case.is_dir():
            raise UsageError(f"--end_to_end_case {end_to_end_case}: expected a case folder (e.g. "
                             "tests/data/tcga-lgg/TCGA-FG-6692-native)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    if device == "cuda" and not extension_has_cuda():
        raise UsageError("--device cuda: the extension has no CUDA kernels; rebuild it on this machine")
    if memory and device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise UsageError("--memory True on the CPU needs Linux's /proc/self/clear_refs (the peak RSS reset); "
                         "pass --memory False elsewhere")
    if threads:
        torch.set_num_threads(int(threads))
    info = machine_info(device)
    load_before = load_average()
    rows = network_rows(device, tuple(widths), inputs, size, slices, batches, warmup, repeats, bool(memory), threads)
    e2e = end_to_end(case, chosen_bundle, tuple(widths), device, None, threads) if case is not None else None
    load_after = load_average()
    settings = {
        "slices": slices, "batch_sizes": batches, "channels": widths, "size": size, "inputs": inputs,
        "warmup": warmup, "repeats": repeats, "device": device,
        "load_before": f"{load_before:.2f}" if load_before is not None else "unknown",
        "load_after": f"{load_after:.2f}" if load_after is not None else "unknown",
        "command": "python scripts/benchmark_inference.py " + " ".join(sys.argv[1:]),
    }
    table = markdown(info, rows, e2e, settings)
    print(table)
    result = {"machine": info, "settings": settings, "rows": rows, "end_to_end": e2e, "markdown": table}
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".md":
            path.write_text(table, encoding="utf-8")
        else:
            path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main, "benchmark_inference.py")
