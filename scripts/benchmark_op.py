"""Benchmark of the group-wise roll op: compiled (``torch.ops.agi_monai.group_roll``) vs pure-PyTorch
(``agi_monai.ops.group_roll_reference``), forward and forward+backward, at the per-sample kernel shapes
of AGI-Net's CAGR layers.

    python scripts/benchmark_op.py --device cpu|cuda|all --out docs/benchmarks_op.json
    python scripts/benchmark_op.py --device cpu --cpu_paths taps   # also the previous (per-tap) CPU kernels
    python scripts/benchmark_op.py --device cuda --cuda_paths columns   # also the CUDA column kernels

The implementations are timed interleaved (one run of each in turn, ``repeats`` rounds after ``warmup``
rounds; ``torch.cuda.synchronize()`` around every run on CUDA), so that load from other processes on a
shared machine hits them alike. The reported time is the minimum over the rounds (the robust statistic
when other work can only add time); the median is kept in the JSON. Prints a markdown table (with the
machine in its header) and writes the results to ``out``: JSON (including the markdown) for ``.json``,
the markdown alone for ``.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import agi_monai  # noqa: F401  (registers torch.ops.agi_monai)
from agi_monai import ops
from agi_monai.cli import UsageError, check_whole_numbers, run_script

# (label, weight shape (C_out, C_in, k…), batch B, groups n): the per-sample kernels that AGI-Net's CAGR
# layers roll (ResUNet widths 64/128/256/512, n = 8, batch 16 at 256², B = 1 at inference; 3D B = 2).
SHAPES = [
    ("CAGR 64→64 3×3, B=16, n=8", (64, 64, 3, 3), 16, 8),
    ("CAGR 128→128 3×3, B=16, n=8", (128, 128, 3, 3), 16, 8),
    ("CAGR 512→512 3×3, B=16, n=8", (512, 512, 3, 3), 16, 8),
    ("CAGR 256→256 3×3, B=1, n=8", (256, 256, 3, 3), 1, 8),
    ("CAGR 3D 64→64 3×3×3, B=2, n=8", (64, 64, 3, 3, 3), 2, 8),
]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "extension_available": ops.extension_available(),
        "extension_has_cuda": ops.extension_has_cuda(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(calls: dict, device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times in milliseconds of each of ``calls`` (name → fn), run in turn, ``repeats`` rounds after
    ``warmup`` rounds; one time per round and name."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


class code_path:
    """Selects the compiled op's code path on ``device`` for a block (``AGI_MONAI_GROUP_ROLL_CPU`` or
    ``AGI_MONAI_GROUP_ROLL_CUDA``, read at every call); None keeps the default."""

    def __init__(self, device: str, path: str | None) -> None:
        self.variable = f"AGI_MONAI_GROUP_ROLL_{device.upper()}"
        self.path = path

    def __enter__(self) -> None:
        self.saved = os.environ.get(self.variable)
        if self.path is not None:
            os.environ[self.variable] = self.path

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop(self.variable, None)
        else:
            os.environ[self.variable] = self.saved


def make_inputs(weight_shape, batch, groups, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial = len(weight_shape) - 2
    weight = torch.randn(weight_shape, generator=generator)
    offsets = (torch.rand((batch, groups, spatial), generator=generator) - 0.5) * 4
    scales = torch.rand((batch, groups), generator=generator) + 0.5
    return [t.to(device=device, dtype=dtype) for t in (weight, offsets, scales)]


def bench_shape(label, weight_shape, batch, groups, device, dtype, warmup, repeats, paths=()) -> dict:
    """Times the compiled op (and each of the device's code ``paths`` as "compiled[path]") and the reference."""
    impls = {"compiled": (torch.ops.agi_monai.group_roll, None), "reference": (ops.group_roll_reference, None)}
    for path in paths:
        impls[f"compiled[{path}]"] = (torch.ops.agi_monai.group_roll, path)
    weight, offsets, scales = make_inputs(weight_shape, batch, groups, device, dtype)
    leaves = [t.clone().requires_grad_() for t in (weight, offsets, scales)]
    grad_out = torch.randn((batch, *weight_shape), generator=torch.Generator().manual_seed(1)).to(device, dtype)
    row = {"name": label, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "weight": list(weight_shape), "batch": batch, "groups": groups}
    with torch.no_grad():
        expected = impls["reference"][0](weight, offsets, scales).double()
        for name, (fn, path) in impls.items():
            if name != "reference":
                with code_path(device, path):
                    row[f"max_abs_diff_{name}"] = float((fn(weight, offsets, scales).double() - expected).abs().max())
    row["max_abs_diff"] = row["max_abs_diff_compiled"]
    del expected
    calls = {}
    for name, (fn, path) in impls.items():
        def forward(fn=fn, path=path):
            with code_path(device, path), torch.no_grad():
                return fn(weight, offsets, scales)

        def forward_backward(fn=fn, path=path):
            with code_path(device, path):
                out = fn(*leaves)
                return torch.autograd.grad(out, leaves, grad_out)

        calls[("fwd", name)] = forward
        calls[("fwdbwd", name)] = forward_backward
    times = time_interleaved(calls, device, warmup, repeats)
    for (key, name), values in times.items():
        row[f"{key}_{name}_ms"] = min(values)
        row[f"{key}_{name}_median_ms"] = statistics.median(values)
        row[f"{key}_{name}_min_max_ms"] = [min(values), max(values)]
    for name in impls:
        if name != "reference":
            suffix = "" if name == "compiled" else name[len("compiled"):]
            row[f"fwd_speedup{suffix}"] = row["fwd_reference_ms"] / row[f"fwd_{name}_ms"]
            row[f"fwdbwd_speedup{suffix}"] = row["fwdbwd_reference_ms"] / row[f"fwdbwd_{name}_ms"]
    return row


def markdown(info: dict, rows: list[dict], settings: dict) -> str:
    header = [
        "## group_roll: compiled op vs pure-PyTorch reference",
        "",
        f"- CPU: {info['cpu']} ({info['cpu_count']} cores, torch threads {info['torch_threads']})",
        f"- GPU: {info['gpu'] or 'none'}",
        f"- torch {info['torch']} (CUDA {info['torch_cuda']}), Python {info['python']}",
        f"- minimum of {settings['repeats']} interleaved runs after {settings['warmup']} warm-up runs; "
        f"dtype {settings['dtype']}; times in ms; speed-up = reference / compiled",
        f"- command: `{settings['command']}`",
        "",
        "| shape | device | fwd compiled | fwd reference | fwd speed-up | fwd+bwd compiled | fwd+bwd reference "
        "| fwd+bwd speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines = [
        f"| {r['name']} | {r['device']} | {r['fwd_compiled_ms']:.3f} | {r['fwd_reference_ms']:.3f} | "
        f"{r['fwd_speedup']:.1f}× | {r['fwdbwd_compiled_ms']:.3f} | {r['fwdbwd_reference_ms']:.3f} | "
        f"{r['fwdbwd_speedup']:.1f}× |"
        for r in rows
    ]
    variants = sorted({(r["device"], k[len("fwd_"):-len("_ms")]) for r in rows for k in r
                       if k.startswith("fwd_compiled[") and k.endswith("]_ms")})
    for device, variant in variants:
        suffix = variant[len("compiled"):]
        lines += ["", f"{device.upper()} path {suffix[1:-1]} (AGI_MONAI_GROUP_ROLL_{device.upper()}), same runs:", "",
                  "| shape | fwd | fwd speed-up | fwd+bwd | fwd+bwd speed-up |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['name']} | {r[f'fwd_{variant}_ms']:.3f} | {r[f'fwd_speedup{suffix}']:.1f}× | "
            f"{r[f'fwdbwd_{variant}_ms']:.3f} | {r[f'fwdbwd_speedup{suffix}']:.1f}× |"
            for r in rows if r["device"] == device and f"fwd_{variant}_ms" in r
        ]
    return "\n".join(header + lines) + "\n"


def main(device: str = "cpu", out: str | None = "docs/benchmarks_op.json", dtype: str = "float32",
         warmup: int | None = None, repeats: int | None = None, threads: int | None = None,
         shapes: str | tuple | int | None = None, cpu_paths: str | tuple | None = None,
         cuda_paths: str | tuple | None = None) -> None:
    """Times the op at AGI-Net's shapes.

    Args:
        device: "cpu", "cuda" or "all" (cuda is skipped, with a note, where unavailable).
        out: where to write the results (".json" or ".md"); None or "" prints only.
        dtype: float32 (default), float64, float16 or bfloat16.
        warmup: warm-up rounds (default 2 on CPU, 10 on CUDA).
        repeats: timed rounds, the minimum is reported (default 15 on CPU, 50 on CUDA).
        threads: torch.set_num_threads for the CPU runs (default: torch's choice).
        shapes: comma-separated indices into SHAPES to run a subset (default: all).
        cpu_paths: comma-separated extra CPU code paths of the compiled op to time alongside
            (AGI_MONAI_GROUP_ROLL_CPU: avx512, avx2, baseline, taps = the per-tap kernels of the first version,
            columns = the CUDA kernels' column code run on the CPU).
        cuda_paths: the same for CUDA (AGI_MONAI_GROUP_ROLL_CUDA: taps = the first version;
            columns = column kernels with the fused routing-gradient reduction, the default since 2026-11-24).
    """
    # every argument is checked before anything is timed (a bad --out used to fail after the whole run)
    if not ops.extension_available():
        raise UsageError(f"the compiled extension is not available: {ops.extension_error()}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"]}.get(device)
    if devices is None:
        raise UsageError(f"--device {device}: expected cpu, cuda or all")
    check_whole_numbers(warmup=(warmup, 0), repeats=(repeats, 1), threads=(threads, 1))
    if out and Path(out).suffix not in (".json", ".md"):
        raise UsageError(f"--out {out}: expected a file name ending in .json or .md")
    if shapes in (None, ""):
        selected = SHAPES
    else:  # fire turns "0,4" into a tuple and "3" into an int
        indices = shapes if isinstance(shapes, (list, tuple)) else str(shapes).split(",")
        if not all(str(i).strip().isdigit() and int(i) < len(SHAPES) for i in indices):
            raise UsageError(f"--shapes {shapes}: expected comma-separated indices from 0 to {len(SHAPES) - 1} into "
                             f"SHAPES ({'; '.join(f'{i}: {shape[0]}' for i, shape in enumerate(SHAPES))})")
        selected = [SHAPES[int(i)] for i in indices]

    def path_list(paths, variable: str, names: tuple[str, ...]) -> list[str]:  # fire turns "a,b" into a tuple
        if paths in (None, ""):
            return []
        chosen = [str(p) for p in (paths if isinstance(paths, (list, tuple)) else str(paths).split(","))]
        unknown = [p for p in chosen if p not in names]
        if unknown:
            raise UsageError(f"--{variable} {paths}: unknown {', '.join(unknown)}; expected some of {', '.join(names)}")
        return chosen

    extra_paths = {"cpu": path_list(cpu_paths, "cpu_paths", ("avx512", "avx2", "baseline", "taps", "columns")),
                   "cuda": path_list(cuda_paths, "cuda_paths", ("taps", "columns"))}
    if threads:
        torch.set_num_threads(int(threads))
    notes = []
    if "cuda" in devices and not (torch.cuda.is_available() and ops.extension_has_cuda()):
        note = (f"CUDA skipped: torch.cuda.is_available()={torch.cuda.is_available()}, "
                f"extension_has_cuda()={ops.extension_has_cuda()}")
        if device == "cuda":
            raise UsageError(f"--device cuda: {note}")
        print(note, file=sys.stderr)
        notes.append(note)
        devices.remove("cuda")
    info = machine_info()
    rows = []
    for dev in devices:
        w = warmup if warmup is not None else (10 if dev == "cuda" else 2)
        r = repeats if repeats is not None else (50 if dev == "cuda" else 15)
        for label, weight_shape, batch, groups in selected:
            row = bench_shape(label, weight_shape, batch, groups, dev, DTYPES[dtype], w, r, extra_paths[dev])
            row.update(warmup=w, repeats=r)
            print(f"{label} [{dev}]: fwd {row['fwd_compiled_ms']:.3f} vs {row['fwd_reference_ms']:.3f} ms "
                  f"({row['fwd_speedup']:.1f}×), fwd+bwd {row['fwdbwd_compiled_ms']:.3f} vs "
                  f"{row['fwdbwd_reference_ms']:.3f} ms ({row['fwdbwd_speedup']:.1f}×)", file=sys.stderr, flush=True)
            rows.append(row)
            if dev == "cuda":
                torch.cuda.empty_cache()
    settings = {
        "warmup": sorted({row["warmup"] for row in rows}),
        "repeats": sorted({row["repeats"] for row in rows}),
        "dtype": dtype,
        "command": "python scripts/benchmark_op.py " + " ".join(sys.argv[1:]),
    }
    settings["warmup"] = "/".join(map(str, settings["warmup"]))
    settings["repeats"] = "/".join(map(str, settings["repeats"]))
    table = markdown(info, rows, settings)
    print(table)
    result = {"machine": info, "settings": settings, "notes": notes, "rows": rows, "markdown": table}
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".md":
            path.write_text(table, encoding="utf-8")
        elif path.suffix == ".json":
            path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main, "benchmark_op.py")
