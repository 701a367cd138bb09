"""The ablations as one override each of a bundle's train.json (agi_monai.evaluation.ablation): the networks they
build against the paper's Tables 7 and 9 and against hand-derived parameter and FLOP counts; scripts/ablation.py
trains, evaluates and tabulates a 2-entry set on the shipped cases."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agi_monai.bundle.experiment import bundle_network
from agi_monai.bundle.experiment import TrainingRun
from agi_monai.bundle.registry import find_bundle
from agi_monai.evaluation.ablation import ABLATIONS, TABLE5, architecture, select_ablations
from agi_monai.evaluation.tables import FOLDER_SPLIT_NOTE, SUMMARY_JSON, read_csv, split_note
from agi_monai.networks import CAGR, STAGES, AGINet, ResUNet
from test_demo import assert_runs_recorded
from helpers import CPU_SCRIPT_ENV, REPO, SUBPROCESS_ENV, load_script

BUNDLE = REPO / "bundles" / "brats_t1_t2_to_flair"  # 2 inputs, as the paper's complexity tables
PAPER_WIDTHS = {"down1": 64, "down2": 128, "down3": 256, "body": 512, "up1": 256, "up2": 128, "up3": 64}


SCRIPT = load_script("ablation.py")


def _count(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def test_the_ablation_set_is_the_papers():
    # Table 5 (GR and CA) has three rows: the baseline without CAGR, GR only, GR + CA; no CA-only row
    assert TABLE5 == ("stages_none", "gr_only", "agi_net")
    assert inspect.signature(SCRIPT.main).parameters["ablations"].default == "stages_none,gr_only,agi_net"
    assert "Table 5" in ABLATIONS["gr_only"].description and "Table 5" in ABLATIONS["agi_net"].description
    assert "Table 5" in ABLATIONS["stages_none"].description
    assert "NOT in the paper" in ABLATIONS["ca_only"].description
    assert "Table 7" in ABLATIONS["groups_4"].description and "Table 9" in ABLATIONS["stages_down2"].description
    assert list(ABLATIONS) == [
        "stages_none", "gr_only", "agi_net", "ca_only", "groups_1", "groups_2", "groups_4", "groups_8", "groups_16",
        "stages_down1", "stages_down2", "stages_down3", "stages_body", "stages_up1", "stages_up2",
        "stages_up3",
    ]
    assert ABLATIONS["gr_only"].overrides == {"network_def#attention": False}
    assert ABLATIONS["stages_down2"].overrides == {"network_def#cagr_stages": ["down1", "down2"]}
    assert ABLATIONS["stages_down2"].override_text() == "--network_def#cagr_stages \"['down1','down2']\""
    assert [a.name for a in select_ablations("ca_only, groups_4")] == ["ca_only", "groups_4"]
    assert len(select_ablations("all")) == len(ABLATIONS)
    with pytest.raises(ValueError, match=r"\['gr'\]: expected names among \['stages_none'"):
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
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
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
    result = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=REPO, timeout=900, env=CPU_SCRIPT_ENV)
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


# --------------------------------------------------------------------- the script's checks and tables, no training

TINY = [8, 16, 16, 32]


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained before every argument was checked")

    monkeypatch.setattr(SCRIPT, "train_bundle", refuse)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"protocols": "slice2d,brasyn3D"}, r"--protocols slice2d,brasyn3D: expected some of \['slice2d', 'brasyn3d'\]"),
        ({"ablations": "stages_none,groups_16", "channels": TINY},
         r"ablation groups_16 \(--network_def#groups 16\) cannot be built with --channels 8,16,16,32: .*groups=16"),
        ({"dataset_dir": "/nonexistent/datalist.json"}, "no such datalist or folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_training(tmp_path, monkeypatch, arguments, message):
    _no_training(monkeypatch)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        SCRIPT.main(output_dir=str(output), device="cpu", iterations=2, batch_size=2, crop_size=64,
                    **{"channels": [8, 16, 32, 64], **arguments})
    assert not output.exists()


def _fake_runs(monkeypatch, trained: list[str], fail_at: str | None = None):
    """train_bundle / evaluate_bundle / load_generator without training: the overrides' network, untrained, and a
    summary of made-up metrics (the tables, complexity and cleanup are what is tested)."""

    def train(bundle, root, overrides):
        root = Path(root)
        if root.name == fail_at:
            raise RuntimeError(f"{root.name}: training failed")
        trained.append(root.name)
        (root / "models").mkdir(parents=True, exist_ok=True)
        overrides_file = root / "overrides.json"
        overrides_file.write_text(json.dumps(dict(overrides)))
        return TrainingRun(root, root / "models" / "model.pt", overrides_file, "fake", 2, 0.1)

    def evaluate(bundle, root, overrides):
        folder = Path(root) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        metrics = {m: {"mean": 1.0} for m in ("psnr_db", "ssim_pct", "mae_x100")}
        summary = {"cases": 1, "protocols": {p: {"metrics": metrics} for p in overrides["protocols"]}}
        (folder / SUMMARY_JSON).write_text(json.dumps(summary))
        return folder

    monkeypatch.setattr(SCRIPT, "train_bundle", train)
    monkeypatch.setattr(SCRIPT, "evaluate_bundle", evaluate)
    monkeypatch.setattr(SCRIPT, "load_generator", lambda bundle, weights, overrides: bundle_network(
        bundle, json.loads(Path(overrides).read_text())).eval())


def test_a_rerun_removes_the_earlier_tables_before_any_weights_are_replaced(tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    output.mkdir()
    earlier = ["ablation.csv", "ablation.md", "ablation.json", "ablation_slice2d_psnr_db.png", "ablation_brasyn3d_psnr_db.png"]
    for name in earlier:
        (output / name).write_text("the earlier run's")
    (output / "notes.txt").write_text("not the script's")
    _fake_runs(monkeypatch, [], fail_at="stages_none")
    with pytest.raises(RuntimeError, match="training failed"):
        SCRIPT.main(ablations="stages_none", output_dir=str(output), device="cpu", iterations=2, batch_size=2,
                    crop_size=64, channels=TINY, protocols="slice2d")
    assert not any((output / name).exists() for name in earlier)
    assert (output / "notes.txt").is_file()
    assert "ablation.py: removed the earlier run's ablation.csv, ablation.md, ablation.json" in capsys.readouterr().out


def test_a_3d_bundle_counts_its_complexity_on_a_patch_and_a_folder_is_stated_as_no_result(tmp_path, monkeypatch):
    info = find_bundle("brats_t1_t2_flair_to_t1gd_3d")
    assert SCRIPT.complexity_input(info) == (96, 96, 96)
    assert SCRIPT.complexity_input(find_bundle("brats_t1_t2_to_flair")) == (240, 240)
    trained: list[str] = []
    _fake_runs(monkeypatch, trained)
    monkeypatch.setattr(SCRIPT, "complexity_input", lambda info: (16, 16, 16))  # the 96^3 patch, smaller
    folder = REPO / "tests" / "data" / "tcga-lgg"  # a folder: its cases are every split
    assert split_note(folder) == FOLDER_SPLIT_NOTE and split_note(tmp_path / "datalist.json") is None
    output = tmp_path / "out"
    SCRIPT.main(ablations="stages_none,gr_only", bundle=info.name, output_dir=str(output), dataset_dir=str(folder),
                device="cpu", iterations=2, batch_size=2, crop_size=64, channels=TINY, protocols="slice2d")
    assert trained == ["stages_none", "gr_only"]
    rows = read_csv(output / "ablation.csv")
    assert all(float(row["gflops"]) > 0 for row in rows) and rows[1]["gflops"] > rows[0]["gflops"]
    assert all(row["paper_params_m"] == "" for row in rows)  # the paper's counts are 2D
    markdown = (output / "ablation.md").read_text()
    assert f"**{FOLDER_SPLIT_NOTE}.**" in markdown and "one 1x3x16x16x16 patch" in markdown
    assert json.loads((output / "ablation.json").read_text())["split_note"] == FOLDER_SPLIT_NOTE


def test_a_long_plot_title_is_wrapped_within_the_figure(tmp_path, monkeypatch):
    from matplotlib.text import Text

    from agi_monai.evaluation import figures

    saved = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda figure, path, dpi: (saved.append(figure), save(figure, path, dpi))[1])
    title = "brats_t1_t2_flair_to_t1gd: slice2d PSNR, 2 iterations"
    rows = [{"ablation": "stages_none", "params": 1e6, "slice2d_psnr_db": 20.0},
            {"ablation": "gr_only", "params": 2e6, "slice2d_psnr_db": 21.0}]
    figures.ablation_plot(rows, tmp_path / "ablation.png", title=title)
    figures.robustness_plot([{"network": "AGI-Net", "perturbation": 0.0, "psnr_db": 20.0}], tmp_path / "sweep.png",
                            title=title + ", and a longer description of the sweep")
    for figure in saved:
        renderer = figure.canvas.get_renderer()
        texts = [t for t in figure.findobj(Text) if t.get_text().replace("\n", " ").startswith(title)]
        assert len(texts) == 1
        box = texts[0].get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (box, figure.bbox)
