"""Train-step time of AGI-Net vs ResUNet, and of CAGR's per-sample convolution strategies.

One training step = forward, L1 loss, backward, Adam step (the generator's share of a pix2pix step).
Usage::

    python scripts/benchmark_network.py --device cpu  --batch 2  --size 128   # CPU-sized
    python scripts/benchmark_network.py --device cuda --batch 16 --size 256   # the paper's batch
    python scripts/benchmark_network.py --device cuda --amp bf16               # autocast
    python scripts/benchmark_network.py --device cpu --compare_previous        # + AGI-Net with the previous code
    python scripts/benchmark_network.py --device cuda --compile                # both networks under torch.compile
    AGI_MONAI_GROUP_ROLL_CUDA=columns python scripts/benchmark_network.py --device cuda   # the op's column kernels

The compared steps are timed interleaved (one step of each in turn, ``repeats`` rounds after ``warmup``
rounds), and the table reports the minimum over the rounds: on a shared machine other processes can only
add time, and interleaving exposes both networks to the same load (the median is printed beside it).
``--threads`` sets torch's intra-op threads. Prints a markdown table with the AGI-Net / ResUNet ratio,
and optionally writes it to ``--out`` (appending).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from agi_monai.cli import UsageError, check_whole_numbers, run_script
from agi_monai.networks import CAGR, AGINet, ResUNet
from agi_monai.networks.blocks import cagr
from agi_monai.ops import extension_has_cuda


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average {:.2f} at start".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__}){load}"


def timed_interleaved(steps: dict, device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` (name → fn), run in turn, ``repeats`` rounds after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def timed(step, device: str, warmup: int, repeats: int) -> float:
    """Minimum seconds of ``step()`` over ``repeats`` calls after ``warmup`` calls."""
    return min(timed_interleaved({"step": step}, device, warmup, repeats)["step"])


def train_step_fn(network: torch.nn.Module, batch: int, size: int, device: str, amp: str | None, channels_last: bool = False,
                  compile: bool = False):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, betas=(0.5, 0.999))
    # torch.compile fuses the routing function's memory-bound LayerNorm/GELU/pool chain (group_roll is a
    # registered op with a fake kernel, so the graph does not break there). Warm-up rounds absorb compilation.
    forward = torch.compile(network) if compile else network
    x = torch.rand(batch, 2, size, size, device=device).contiguous(memory_format=memory_format)
    target = torch.rand(batch, 1, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "", None)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.l1_loss(forward(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def with_previous_code(step):
    """Runs ``step`` with the previous code (before 2026-11-24): the routing function's LayerNorm and GELU as two
    ATen ops on CUDA too (``cagr.FUSED_NORM_DEVICE_TYPES`` empty), and the first version's CUDA group_roll kernels
    (AGI_MONAI_GROUP_ROLL_CUDA=taps, still built in). The CPU code is unchanged since, so on CPU this times the
    same code twice."""

    def run():
        saved_path, saved_devices = os.environ.get("AGI_MONAI_GROUP_ROLL_CUDA"), cagr.FUSED_NORM_DEVICE_TYPES
        os.environ["AGI_MONAI_GROUP_ROLL_CUDA"] = "taps"
        cagr.FUSED_NORM_DEVICE_TYPES = ()
        try:
            step()
        finally:
            cagr.FUSED_NORM_DEVICE_TYPES = saved_devices
            if saved_path is None:
                os.environ.pop("AGI_MONAI_GROUP_ROLL_CUDA")
            else:
                os.environ["AGI_MONAI_GROUP_ROLL_CUDA"] = saved_path

    return run


def per_sample_loop(block: CAGR, x: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The alternative to folding the batch into conv groups: one convolution call per sample."""
    kernels = block.roll(block.conv.weight, offsets, scales)
    return torch.cat([F.conv2d(x[b : b + 1], kernels[b], None, block.stride, block.padding) for b in range(x.shape[0])])


def fold_vs_loop(device: str, batch: int, warmup: int, repeats: int) -> list[str]:
    rows = []
    for channels, size in [(64, 256), (256, 64), (512, 32)]:
        if device == "cpu":
            size //= 2
        block = CAGR(2, channels, channels, groups=8, attention=False).to(device)
        x = torch.rand(batch, channels, size, size, device=device, requires_grad=True)
        offsets = torch.randn(batch, 8, 2, device=device, requires_grad=True)
        scales = torch.rand(batch, 8, device=device, requires_grad=True)

        def run(fn):
            return lambda: fn(x, offsets, scales).sum().backward()

        folded = timed(run(block.rolled_conv), device, warmup, repeats)
        looped = timed(run(lambda *a: per_sample_loop(block, *a)), device, warmup, repeats)
        rows.append(f"| C={channels}, {size}², B={batch} | {1e3 * folded:.2f} | {1e3 * looped:.2f} | {looped / folded:.2f} |")
    return rows


def cagr_breakdown(device: str, batch: int, amp: str | None, warmup: int, repeats: int) -> list[str]:
    """Forward+backward time of a CAGR's parts next to the plain convolution it replaces."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "", None)
    rows = []
    for channels, size in [(64, 256), (256, 64), (512, 32)]:
        if device == "cpu":
            size //= 2
        block = CAGR(2, channels, channels, groups=8).to(device)
        with torch.no_grad():
            block.routing.offset_head.weight.normal_(std=0.1)
        x = torch.rand(batch, channels, size, size, device=device, requires_grad=True)

        def run(fn):
            def step():
                with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = fn()
                sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

            return 1e3 * timed(step, device, warmup, repeats)

        offsets, scales = (t.detach().requires_grad_() for t in block.routing(x))
        parts = [
            run(lambda: F.conv2d(x, block.conv.weight, padding=1)),
            run(lambda: block(x)),
            run(lambda: block.attention(x)),
            run(lambda: block.routing(x)),
            run(lambda: block.roll(block.conv.weight, offsets, scales)),
            run(lambda: block.rolled_conv(x, offsets, scales)),
        ]
        # The routing function's LayerNorm + GELU on a channels-last feature map: as the network runs them (fused on
        # CUDA), and as two ATen ops.
        norm_gelu = block.routing.features[1:3]
        features = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        parts += [run(lambda: norm_gelu(features)), run(lambda: norm_gelu[1](norm_gelu[0](features)))]
        rows.append(f"| C={channels}, {size}², B={batch} | " + " | ".join(f"{p:.2f}" for p in parts) + " |")
    return rows


def main(
    device: str = "cpu",
    batch: int = 2,
    size: int = 128,
    amp: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    compare_fold: bool = True,
    breakdown: bool = False,
    channels_last: bool = False,
    threads: int | None = None,
    compare_previous: bool = False,
    compile: bool = False,
    out: str | None = None,
) -> None:
    """Times ResUNet and AGI-Net train steps (and CAGR fold-vs-loop) and prints a markdown table.

    ``compare_previous`` adds AGI-Net run with the previous code (see ``with_previous_code``);
    ``compile`` runs both networks under ``torch.compile`` (compiled during the warm-up rounds).
    """
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: expected cpu or cuda")
    if amp not in (None, "bf16", "fp16"):
        raise UsageError(f"--amp {amp}: expected bf16 or fp16 (leave it out for float32)")
    check_whole_numbers(batch=(batch, 1), size=(size, 8), warmup=(warmup, 0), repeats=(repeats, 1),
                        threads=(threads, 1))
    if size % 8:
        raise UsageError(f"--size {size}: expected a multiple of 8 (the networks halve the image three times)")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        if not extension_has_cuda():
            raise UsageError("--device cuda: the extension has no CUDA kernels; rebuild it on this machine")
    lines = [
        f"#### Train step, {machine(device)}: batch {batch}, 2×{size}² → 1, "
        f"{'AMP ' + amp if amp else 'float32'}{', channels-last' if channels_last else ''}"
        f"{', torch.compile' if compile else ''}"
        f"{', group_roll CUDA kernels: ' + os.environ.get('AGI_MONAI_GROUP_ROLL_CUDA', 'auto') if device == 'cuda' else ''}, "
        f"minimum of {repeats} interleaved steps (median in brackets)",
        "",
        "| network | step (ms) | ratio to ResUNet |",
        "|---|---|---|",
    ]
    steps = {
        "ResUNet": train_step_fn(ResUNet(), batch, size, device, amp, channels_last, compile),
        "AGI-Net (n=8)": train_step_fn(AGINet(), batch, size, device, amp, channels_last, compile),
    }
    if compare_previous:
        steps["AGI-Net (n=8), previous code"] = with_previous_code(
            train_step_fn(AGINet(), batch, size, device, amp, channels_last)
        )
    times = timed_interleaved(steps, device, warmup, repeats)
    base, base_median = min(times["ResUNet"]), statistics.median(times["ResUNet"])
    for name, values in times.items():
        fastest, median = min(values), statistics.median(values)
        lines.append(f"| {name} | {1e3 * fastest:.1f} ({1e3 * median:.1f}) | {fastest / base:.3f} ({median / base_median:.3f}) |")
    agi = min(times["AGI-Net (n=8)"])
    if compare_fold:
        lines += [
            "",
            f"#### CAGR per-sample convolution, forward+backward, {machine(device)}",
            "",
            "| layer | batch folded into conv groups (ms) | loop over samples (ms) | loop / folded |",
            "|---|---|---|---|",
        ]
        lines += fold_vs_loop(device, batch, warmup, repeats)
    if breakdown:
        lines += [
            "",
            f"#### CAGR parts, forward+backward (ms), {machine(device)}, {'AMP ' + amp if amp else 'float32'}",
            "",
            "| layer | plain conv | CAGR | attention | routing | group_roll | rolled conv (roll + folded conv) "
            "| routing's LayerNorm+GELU | same as two ATen ops |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += cagr_breakdown(device, batch, amp, warmup, repeats)
    text = "\n".join(lines)
    print(text)
    print(f"\nAGI-Net / ResUNet train step on {device}: {agi / base:.3f}×")
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    run_script(main, "benchmark_network.py")
