"""The ablations as one override each of a bundle's train.json (agi_monai.evaluation.ablation): the networks they
build against the paper's Tables 7 and 9 and against hand-derived parameter and FLOP counts; scripts/ablation.py
trains, evaluates and tabulates a 2-entry set on the shipped cases."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agi_monai.bundle.experiment import bundle_network
from agi_monai.evaluation.ablation import ABLATIONS, architecture, select_ablations
from agi_monai.evaluation.tables import read_csv
from agi_monai.networks import CAGR, STAGES, AGINet, ResUNet
from test_demo import assert_runs_recorded

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_t1_t2_to_flair"  # 2 inputs, as the paper's complexity tables
PAPER_WIDTHS = {"down1": 64, "down2": 128, "down3": 256, "body": 512, "up1": 256, "up2": 128, "up3": 64}


def _script():
    spec = importlib.util.spec_from_file_location("ablation_script", REPO / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def _count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def test_the_ablation_set_is_the_papers():
    assert list(ABLATIONS) == [
        "agi_net", "gr_only", "ca_only", "groups_1", "groups_2", "groups_4", "groups_8", "groups_16",
        "stages_none", "stages_down1", "stages_down2", "stages_down3", "stages_body", "stages_up1", "stages_up2",
        "stages_up3",
    ]
    assert ABLATIONS["gr_only"].overrides == {"network_def#attention": False}
    assert ABLATIONS["stages_down2"].overrides == {"network_def#cagr_stages": ["down1", "down2"]}
    assert ABLATIONS["stages_down2"].override_text() == "--network_def#cagr_stages \"['down1','down2']\""
    assert [a.name for a in select_ablations("ca_only, groups_4")] == ["ca_only", "groups_4"]
    assert len(select_ablations("all")) == len(ABLATIONS)
    with pytest.raises(ValueError, match=r"\['gr'\]: expected names among \['agi_net'"):
        select_ablations("gr,ca_only")
    with pytest.raises(ValueError, match="repeated"):
        select_ablations(["gr_only", "gr_only"])
    # one architecture, three names; stages_none is the ResUNet
    assert ABLATIONS["agi_net"].architecture() == ABLATIONS["groups_8"].architecture() == ABLATIONS["stages_up1"].architecture()
    assert ABLATIONS["stages_none"].architecture() == architecture({"cagr_stages": (), "groups": 2})


def test_each_override_builds_the_expected_network_with_the_papers_parameter_count():
    full = bundle_network(BUNDLE)
    assert isinstance(full, AGINet)
    for ablation in ABLATIONS.values():
        assert len(ablation.overrides) <= 1 and all(k.startswith("network_def#") for k in ablation.overrides)
        network = bundle_network(BUNDLE, ablation.overrides)
        arguments = {"groups": 8, "cagr_stages": STAGES[:5], "attention": True, "rolling": True,
                     **ablation.network_arguments}
        cagrs = [m for m in network.modules() if isinstance(m, CAGR)]
        assert len(cagrs) == 2 * len(arguments["cagr_stages"]), ablation.name  # two ResBlocks per stage
        assert network.cagr_stages == tuple(arguments["cagr_stages"])
        for block in cagrs:
            assert (block.attention is not None) == arguments["attention"], ablation.name
            assert (block.routing is not None) == arguments["rolling"], ablation.name
            if block.routing is not None:
                assert block.routing.groups == arguments["groups"], ablation.name
        paper = SCRIPT.paper_complexity(ablation)
        if ablation.name in ("gr_only", "ca_only"):
            assert paper is None
        else:  # every other ablation is a row of Table 7 or 9: parameters within 0.5 %
            assert _count(network) / 1e6 == pytest.approx(paper[0], rel=0.005), ablation.name

    # hand-derived: a CAGR at width C, n groups holds Cross Group Attention (grouped 1x1 conv 2C -> C with bias:
    # 2C^2/n + C) and the routing function (two grouped 3x3 convs 9C^2/n each, two LayerNorms 2C each, offset head
    # C*2n + 2n, scale head C*n + n)
    n, widths = 8, [PAPER_WIDTHS[s] for s in STAGES[:5] for _ in range(2)]
    attention = sum(2 * c * c // n + c for c in widths)
    routing = sum(2 * 9 * c * c // n + 2 * 2 * c + (c * 2 * n + 2 * n) + (c * n + n) for c in widths)
    assert _count(bundle_network(BUNDLE, ABLATIONS["gr_only"].overrides)) == _count(full) - attention
    assert _count(bundle_network(BUNDLE, ABLATIONS["ca_only"].overrides)) == _count(full) - routing
    # no CAGR: exactly the ResUNet, whose weights it loads
    resunet = ResUNet(2, 2, 1)
    bundle_network(BUNDLE, ABLATIONS["stages_none"].overrides).load_state_dict(resunet.state_dict())
    assert _count(resunet) == _count(full) - attention - routing


def test_flops_column_counts_the_added_cagr_by_hand():
    # CAGR in down1 (width C = 8, n = 8, full resolution 32x32) on a tiny network: two blocks, each adding the
    # routing convs 2 x 9 C (C/n) H W, the attention's 1x1 conv on the pooled vector C (2C/n), the heads C 2n + C n
    # multiply-adds (FLOPs = 2 x multiply-adds; the roll itself is not a multiply-add count)
    widths = {"network_def#channels": [8, 16, 32, 64]}
    none = bundle_network(BUNDLE, {**widths, **ABLATIONS["stages_none"].overrides}).eval()
    down1 = bundle_network(BUNDLE, {**widths, **ABLATIONS["stages_down1"].overrides}).eval()
    c, n, h, w = 8, 8, 32, 32
    per_cagr = 2 * 9 * c * (c // n) * h * w + c * (2 * c // n) + c * 2 * n + c * n
    _, gflops_none = SCRIPT.complexity(none, 2, 32)
    _, gflops_down1 = SCRIPT.complexity(down1, 2, 32)
    assert (gflops_down1 - gflops_none) * 1e9 == pytest.approx(2 * 2 * per_cagr, abs=0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("ablation.py", ["--iterations", "-5"], "iterations -5, batch size 8: expected positive numbers"),
        ("compare.py", ["--crop_size", "100"], "crop size 100: expected a positive multiple of 8"),
        ("ablation.py", ["--ablations", "nonsense"], "nonsense"),
    ],
)
def test_scripts_refuse_a_bad_budget_in_one_line_before_any_work(tmp_path, script, arguments, message):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments, "--output_dir", str(output)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    # (MONAI's import may print its own notices about optional decoders first)
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")
    assert message in result.stderr.strip().splitlines()[-1], result.stderr
    assert not output.exists()


def test_script_trains_evaluates_and_tabulates_two_ablations(tmp_path):
    output = tmp_path / "ablation"
    channels = [8, 16, 32, 64]
    command = [
        sys.executable, str(REPO / "scripts" / "ablation.py"), "--ablations", "gr_only,stages_none",
        "--iterations", "2", "--batch_size", "2", "--crop_size", "64", "--channels", ",".join(map(str, channels)),
        "--discriminator_channels", "8", "--protocols", "slice2d", "--device", "cpu", "--output_dir", str(output),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=REPO, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ablation: 2 runs in {output}" in result.stdout
    rows = read_csv(output / "ablation.csv")
    assert [r["ablation"] for r in rows] == ["gr_only", "stages_none"]
    assert [r["override"] for r in rows] == ["--network_def#attention False", '--network_def#cagr_stages "[]"']
    for row, network_class in zip(rows, (AGINet, ResUNet)):
        run = output / row["ablation"]
        overrides = json.loads((run / "overrides.json").read_text())
        ablation = ABLATIONS[row["ablation"]]
        assert {k: overrides[k] for k in ablation.overrides} == dict(ablation.overrides)
        assert overrides["network_def#channels"] == channels and overrides["val_interval"] == 2
        assert "network_def#_target_" not in overrides  # the bundle's AGI-Net, changed by the override only
        # the counted network is the trained one: its checkpoint loads into the ablation's architecture
        weights = torch.load(run / "models" / "model.pt", weights_only=True)
        network = network_class(2, 2, 1, channels=channels, **({"attention": False} if row["ablation"] == "gr_only" else {}))
        network.load_state_dict(weights)
        assert row["params"] == _count(network)
        assert row["iterations"] == 2 and row["cases"] == 1
        assert all(math.isfinite(row[f"slice2d_{m}"]) for m in ("psnr_db", "ssim_pct", "mae_x100"))
        summary = json.loads((run / "eval" / "metrics_summary.json").read_text())
        assert row["slice2d_psnr_db"] == summary["protocols"]["slice2d"]["metrics"]["psnr_db"]["mean"]
    assert rows[0]["gflops"] > rows[1]["gflops"] > 0 and rows[0]["params"] > rows[1]["params"]
    assert rows[1]["paper_params_m"] == 17.04 and rows[0]["paper_params_m"] == ""  # Table 7's ResUNet; GR only: none
    from matplotlib.image import imread

    figure = imread(output / "ablation_slice2d_psnr_db.png")  # one bar per ablation
    assert figure.ndim == 3 and figure.shape[1] > figure.shape[0]
    markdown = (output / "ablation.md").read_text()
    assert "| ablation | override | params | GFLOPs | params, paper widths (M) | paper (M / GFLOPs) |" in markdown
    assert f"| gr_only | `--network_def#attention False` | {int(rows[0]['params']):,} |" in markdown

    # each run folder records what the run wrote, which a rerun into the same folder replaces (run twice in the demo's
    # test; the same record here)
    assert_runs_recorded(output, ["gr_only", "stages_none"], "ablation.py")
