"""Parameters and FLOPs of ResUNet and AGI-Net beside the paper's Table 7 and Table 9.

FLOPs = 2 × multiply-adds, counted by ``torch.utils.flop_counter`` for one 2×256×256 → 1 input
(the paper's setting). Usage::

    python scripts/model_complexity.py                 # Table 7 (n) and Table 9 (stages)
    python scripts/model_complexity.py --out docs/model_complexity.md
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from agi_monai.cli import run_script
from agi_monai.networks import STAGES, AGINet, ResUNet

# (label, network kwargs, paper params (M), paper GFLOPs) — Table 7 and Table 9 of arXiv 2411.14684.
TABLE7 = [
    ("ResUNet", dict(cagr_stages=()), 17.04, 141.91),
    ("AGI-Net n=1", dict(groups=1), 33.58, 238.84),
    ("AGI-Net n=2", dict(groups=2), 25.31, 190.52),
    ("AGI-Net n=4", dict(groups=4), 21.19, 166.36),
    ("AGI-Net n=8", dict(groups=8), 19.15, 154.28),
    ("AGI-Net n=16", dict(groups=16), 18.18, 148.24),
]
TABLE9_PAPER = [(17.06, 144.46), (17.12, 146.95), (17.47, 149.40), (18.81, 151.83), (19.15, 154.28),
                (19.24, 156.76), (19.26, 159.31)]
TABLE9 = [(f"+{stage}", dict(cagr_stages=STAGES[: i + 1]), *TABLE9_PAPER[i]) for i, stage in enumerate(STAGES)]


def complexity(
    network: torch.nn.Module, in_channels: int = 2, size: int | Sequence[int] = 256, spatial_dims: int = 2
) -> tuple[float, float]:
    """(parameters in millions, GFLOPs) of one forward pass on a (1, in_channels, size, size) input, or with
    ``spatial_dims`` 3 a (1, in_channels, size, size, size) one (a 3D network's patch); ``size`` may also give
    each spatial side."""
    shape = [int(s) for s in size] if isinstance(size, Sequence) else [int(size)] * spatial_dims
    if len(shape) != spatial_dims:
        raise ValueError(f"size {list(shape)}: expected {spatial_dims} spatial sides")
    params = sum(p.numel() for p in network.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(1, in_channels, *shape))
    return params, counter.get_total_flops() / 1e9


def rows(table: list) -> list[tuple[str, float, float, float, float]]:
    out = []
    for label, kwargs, paper_params, paper_gflops in table:
        network = (ResUNet if label == "ResUNet" else AGINet)(spatial_dims=2, in_channels=2, out_channels=1, **kwargs)
        params, gflops = complexity(network.eval())
        out.append((label, params, paper_params, gflops, paper_gflops))
    return out


def markdown(title: str, table_rows: list) -> str:
    lines = [f"### {title}", "", "| network | params (M) | paper | Δ % | GFLOPs | paper | Δ % |", "|---|---|---|---|---|---|---|"]
    for label, params, pp, gflops, pg in table_rows:
        lines.append(
            f"| {label} | {params:.2f} | {pp:.2f} | {100 * (params - pp) / pp:+.1f} | {gflops:.2f} | {pg:.2f} | "
            f"{100 * (gflops - pg) / pg:+.1f} |"
        )
    return "\n".join(lines)


def main(out: str | None = None, tolerance: float = 0.05) -> None:
    """Prints both tables; exits non-zero if any row is off the paper by more than ``tolerance``."""
    torch.manual_seed(0)
    table7, table9 = rows(TABLE7), rows(TABLE9)
    text = "\n\n".join([
        "Input 1×2×256×256 → 1 channel; FLOPs = 2 × multiply-adds (torch.utils.flop_counter).",
        markdown("Table 7: number of groups n (stages down1–up1)", table7),
        markdown("Table 9: replaced stages (n = 8, cumulative)", table9),
    ])
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    worst = max(max(abs(p - pp) / pp, abs(g - pg) / pg) for _, p, pp, g, pg in table7 + table9)
    print(f"\nlargest deviation from the paper: {100 * worst:.1f} % (tolerance {100 * tolerance:.0f} %)")
    if worst > tolerance:
        sys.exit(1)


if __name__ == "__main__":
    run_script(main, "model_complexity.py")
