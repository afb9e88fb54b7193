"""The report's configuration comparison on a hand-made work folder (no training): the checked-in demo plan with
architecture variants, fold folders holding a log, a validation summary and an empty final checkpoint."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from automedseg.best_choice import BestChoice, FindBest, find_best_path, write_find_best
from automedseg.network import build_network
from automedseg.network_cost import estimate_forward_flops
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.report import collect_state, write_report
from automedseg.report_comparison import COLUMNS, SECTION_TITLE, ComparisonRow, comparison_rows
from automedseg.training_log import EpochRecord, write_training_log
from automedseg.validation_summary import summary_path, write_validation_summary
from automedseg.workspace import Workspace

DEMO_PLANS = Path(__file__).resolve().parent.parent / "plans" / "demo_cpu.json"


def _variant(plans: Plans, architecture: str, **network: object) -> ConfigurationPlan:
    base = plans.configurations["3d_fullres"]
    net = dataclasses.replace(base.network, architecture=architecture, **network)
    return dataclasses.replace(base, name=f"3d_fullres_{architecture}", network=net)


def _fold(ws: Workspace, plans: Plans, configuration: str, fold: int, *, epoch_seconds: list[float] | None,
          finished: bool = True, validation: dict[str, object] | None = None, plan_copy: bool = True) -> None:
    """A fold folder: ``log.jsonl`` (one epoch per entry of ``epoch_seconds``; ``None``: no log), the plan copy,
    ``checkpoint_final.pt`` (empty) when ``finished`` and ``validation/summary.json`` from ``validation``."""
    folder = ws.fold_dir(configuration, fold)
    folder.mkdir(parents=True)
    if plan_copy:
        plans.save(folder / "plans.json")
    if epoch_seconds is not None:
        write_training_log(folder / "log.jsonl", [EpochRecord(epoch=i, train_loss=1.0 / (i + 1), epoch_seconds=s)
                                                  for i, s in enumerate(epoch_seconds)])
    if finished:
        (folder / "checkpoint_final.pt").write_bytes(b"")
    if validation is not None:
        summary_path(folder).parent.mkdir()
        write_validation_summary(summary_path(folder), {"configuration": configuration, "fold": folder.name,
                                                        **validation})


def _cases(fold: int, dice: tuple[float, float], hd95: tuple[float, float]) -> dict[str, object]:
    names = [f"case_{fold}_{i}" for i in range(2)]
    per_case = [{"case": n, "metrics": {"1": {"dice": dice[i], "hd95": hd95[i]}, "2": {"dice": dice[i] - 0.2,
                                                                                      "hd95": hd95[i] + 1.0}}}
                for i, n in enumerate(names)]
    return {"cases": names, "per_case": per_case}


@pytest.fixture
def work(tmp_path: Path) -> tuple[Workspace, Plans]:
    """Plans: 2d, 3d_fullres and its attention, ASPP, SegNet (with batch norm) and residual variants. Trained:
    3d_fullres folds 0 and 1 (validated, mirrored), attention and ASPP fold 0 (not validated), SegNet fold 0 (no
    log), 2d fold 0 (validated without mirroring, untimed); residual fold 0 still training; 3d_lowres (no plan
    anywhere) fold 0; ``find_best.json`` chose 3d_fullres."""
    plans = Plans.load(DEMO_PLANS)
    for variant in (_variant(plans, "attention_unet"), _variant(plans, "aspp_unet"),
                    _variant(plans, "segnet_unet", norm="batch"), _variant(plans, "residual_unet")):
        plans = plans.with_configuration(variant)
    ws = Workspace(tmp_path / "work")
    ws.root.mkdir()
    plans.save(ws.plans_path)
    _fold(ws, plans, "3d_fullres", 0, epoch_seconds=[10.0, 20.0],
          validation={**_cases(0, (0.9, 0.8), (2.0, 4.0)), "seconds": 4.0, "mirror_axes": [0, 1, 2]})
    _fold(ws, plans, "3d_fullres", 1, epoch_seconds=[30.0],
          validation={**_cases(1, (0.7, 0.6), (6.0, 8.0)), "seconds": 6.0, "mirror_axes": [0, 1, 2]})
    _fold(ws, plans, "3d_fullres_attention_unet", 0, epoch_seconds=[12.0, 12.0, 12.0])
    _fold(ws, plans, "3d_fullres_aspp_unet", 0, epoch_seconds=[5.0, 6.0])
    _fold(ws, plans, "3d_fullres_residual_unet", 0, epoch_seconds=[5.0], finished=False)
    _fold(ws, plans, "3d_fullres_segnet_unet", 0, epoch_seconds=None)
    _fold(ws, plans, "2d", 0, epoch_seconds=[3.0], validation={**_cases(0, (0.5, 0.5), (1.0, 1.0)), "seconds": None})
    _fold(ws, plans, "3d_lowres", 0, epoch_seconds=[7.0], plan_copy=False)
    write_find_best(find_best_path(ws), FindBest(best=BestChoice("3d_fullres", mean_dice=0.65)))
    return ws, plans


def _torch_parameters(plans: Plans, plan: ConfigurationPlan) -> int:
    model = build_network(plan.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=plan.dims)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_one_row_per_trained_configuration(work: tuple[Workspace, Plans]) -> None:
    ws, plans = work
    rows = {r.configuration: r for r in comparison_rows(collect_state(ws))}
    # the plan's order, then folders found on disk; the still-training residual variant has no row
    assert list(rows) == ["2d", "3d_fullres", "3d_fullres_attention_unet", "3d_fullres_aspp_unet",
                          "3d_fullres_segnet_unet", "3d_lowres"]
    full = rows["3d_fullres"]
    assert (full.architecture, full.norm, full.trained_folds, full.epochs) == ("plain_unet", "instance", ("0", "1"),
                                                                               (2, 1))
    assert full.train_seconds_per_fold == pytest.approx(30.0)  # (10 + 20 + 30) / 2 folds
    assert full.inference_seconds_per_case == pytest.approx(2.5)  # (4 + 6) s / 4 cases
    assert full.mirror_axes == ((0, 1, 2),)
    assert full.mean_dice == pytest.approx((0.75 + 0.55) / 2)  # pooled per class, then over the classes
    assert full.mean_hd95 == pytest.approx((5.0 + 6.0) / 2)
    assert full.chosen and full.chosen_in == "3d_fullres"
    assert rows["3d_fullres_segnet_unet"].norm == "batch"
    assert rows["2d"].mirror_axes == ((),) and rows["2d"].inference_seconds_per_case is None
    assert not any(r.chosen for name, r in rows.items() if name != "3d_fullres")


def test_parameters_are_those_of_the_built_network(work: tuple[Workspace, Plans]) -> None:
    ws, plans = work
    rows = {r.configuration: r for r in comparison_rows(collect_state(ws))}
    for name in ("2d", "3d_fullres", "3d_fullres_attention_unet", "3d_fullres_aspp_unet", "3d_fullres_segnet_unet"):
        plan = plans.configurations[name]
        assert rows[name].architecture == plan.network.architecture
        assert rows[name].parameters == _torch_parameters(plans, plan), name
        flops = estimate_forward_flops(plan.network, in_channels=1, num_classes=3, patch_size=plan.patch_size,
                                       dims=plan.dims, elementwise_flops=0.0)
        assert rows[name].forward_gflops == pytest.approx(flops / 1e9) and rows[name].forward_gflops > 0
    # an attention-gated network is larger than the plain one of the same plan
    assert rows["3d_fullres_attention_unet"].parameters > rows["3d_fullres"].parameters


def test_forward_flops_match_torchs_count_of_the_convolutions(work: tuple[Workspace, Plans]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    ws, plans = work
    plan = plans.configurations["2d"]
    model = build_network(plan.network, in_channels=1, num_classes=3, dims=2)
    row = next(r for r in comparison_rows(collect_state(ws)) if r.configuration == "2d")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 1, *plan.patch_size))  # training mode: every deep-supervision head runs
    assert row.forward_gflops == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6)


def test_unknown_values_are_dashes(work: tuple[Workspace, Plans]) -> None:
    ws, _ = work
    rows = {r.configuration: r for r in comparison_rows(collect_state(ws))}
    attention, segnet, lowres = (rows["3d_fullres_attention_unet"], rows["3d_fullres_segnet_unet"],
                                 rows["3d_lowres"])
    assert attention.mean_dice is None and attention.inference_seconds_per_case is None and not attention.mirror_axes
    assert segnet.train_seconds_per_fold is None and segnet.epochs == ()
    assert lowres == ComparisonRow("3d_lowres", trained_folds=("0",), train_seconds_per_fold=7.0, epochs=(1,))
    _, md = _markdown_table(write_report(ws))
    cells = {row[0].strip("*").removesuffix(" (chosen)"): row for row in md}
    assert cells["3d_fullres_attention_unet"][COLUMNS.index("CV mean Dice")] == "-"
    assert cells["3d_fullres_attention_unet"][COLUMNS.index("Inference/case")] == "-"
    assert cells["3d_fullres_attention_unet"][COLUMNS.index("TTA mirror axes")] == "-"
    assert cells["3d_fullres_segnet_unet"][COLUMNS.index("Training time/fold")] == "-"
    assert cells["3d_fullres_segnet_unet"][COLUMNS.index("Epochs")] == "-"
    assert cells["2d"][COLUMNS.index("TTA mirror axes")] == "none"
    assert cells["3d_lowres"][1:6] == ["-"] * 5  # no plan: architecture, norm, patch, parameters, GFLOPs
    assert cells["3d_lowres"][COLUMNS.index("Training time/fold")] == "7.0 s"


def _markdown_table(html_path: Path) -> tuple[str, list[list[str]]]:
    """(the comparison section of report.md, the cells of its table's rows)."""
    md = (html_path.parent / "report.md").read_text()
    section = md.split(f"## {SECTION_TITLE}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    return section, [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def test_section_in_the_report_marks_the_chosen(work: tuple[Workspace, Plans]) -> None:
    ws, plans = work
    html_path = write_report(ws)
    section, rows = _markdown_table(html_path)
    assert "GFLOPs" in section and "wall-clock" in section
    full = next(r for r in rows if "3d_fullres (chosen)" in r[0])
    assert all(c.startswith("**") and c.endswith("**") for c in full)  # the chosen row in bold
    parameters = _torch_parameters(plans, plans.configurations["3d_fullres"])
    assert full[COLUMNS.index("Parameters")] == f"**{parameters:,}**"
    assert full[COLUMNS.index("Inference/case")] == "**2.5 s**"
    assert full[COLUMNS.index("TTA mirror axes")] == "**0, 1, 2**"
    assert full[COLUMNS.index("Epochs")] == "**1-2**"
    html = html_path.read_text()
    assert f'href="#configuration_comparison">{SECTION_TITLE}</a>' in html
    chosen = re.findall(r'<tr class="chosen">(.*?)</tr>', html)
    assert any("<td>3d_fullres (chosen)</td>" in r and f'<td class="num">{parameters:,}</td>' in r for r in chosen)
    md = (html_path.parent / "report.md").read_text()
    assert md.index("## Cross-validation results") < md.index(f"## {SECTION_TITLE}") < md.index("## Best configuration")


def test_members_of_a_chosen_ensemble_are_marked(work: tuple[Workspace, Plans]) -> None:
    ws, _ = work
    write_find_best(find_best_path(ws), FindBest(best=BestChoice("2d+3d_fullres", members=("2d", "3d_fullres"))))
    rows = comparison_rows(collect_state(ws))
    assert [r.configuration for r in rows if r.chosen] == ["2d", "3d_fullres"]
    _, cells = _markdown_table(write_report(ws))
    assert "**2d (in chosen 2d+3d_fullres)**" in [r[0] for r in cells]


def test_no_trained_fold_no_table(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "work")
    ws.root.mkdir()
    Plans.load(DEMO_PLANS).save(ws.plans_path)
    assert comparison_rows(collect_state(ws)) == []
    md = (write_report(ws).parent / "report.md").read_text()
    assert f"## {SECTION_TITLE}\n\nNo configuration has a trained fold yet." in md
