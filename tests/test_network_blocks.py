"""The architecture families (attention, ASPP, SegNet) and the norm / dropout options: shapes on odd patches,
training, the cost model against the modules, and ``automedseg plan --architecture`` adding a configuration.

The families the plain and residual U-Nets share (gradients, bf16, channels-last, FLOPs) are in test_network.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from automedseg import cli, configuration_fit
from automedseg.augmentation_batched import deep_supervision_targets
from automedseg.cost_model import memory_limit_bytes
from automedseg.losses import DeepSupervisionLoss
from automedseg.network import build_network, count_parameters, output_shapes, output_strides
from automedseg.network_blocks import ASPP, AttentionGate, UnpoolUp, norm_groups
from automedseg.network_cost import (
    ARCHITECTURE_FAMILIES,
    aspp_dilations,
    aspp_rates_for,
    estimate_activation_elements,
    estimate_parameters,
)
from automedseg.planning import NOMINAL_PROFILES, RULE_ARCHITECTURES, plan_dataset
from automedseg.plans import ARCHITECTURES, NORMS, NetworkPlan, PlanError, Plans

torch.set_num_threads(1)

#: Odd patches: the bottleneck maps are (10, 7, 9) and (22, 15); smaller ones for training, (5, 3, 5) and (11, 7).
ODD = {3: (20, 28, 36), 2: (44, 60)}
SMALL = {3: (10, 12, 20), 2: (22, 28)}
CASES = [(a, d) for a in ARCHITECTURES for d in (3, 2)]
CPU = NOMINAL_PROFILES["reference-cpu-2core"]
GPU = NOMINAL_PROFILES["reference-gpu-24g"]


def odd_plan(architecture: str, dims: int, patch: tuple[int, ...] | None = None, **options: object) -> NetworkPlan:
    """Three stages, total stride (2, 4, 4) in 3D and (2, 4) in 2D, anisotropic first kernel in 3D."""
    if dims == 3:
        kernels, strides = ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    else:
        kernels, strides = ((3, 3),) * 3, ((1, 1), (1, 2), (2, 2))
    net = NetworkPlan(architecture, (4, 8, 12), kernels, strides, (2, 2, 2), (1, 1), **options)  # type: ignore[arg-type]
    return aspp_rates_for(net, patch or ODD[dims])


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_every_family_matches_the_deep_supervision_targets_on_odd_patches(arch: str, dims: int) -> None:
    net = odd_plan(arch, dims)
    model = build_network(net, in_channels=2, num_classes=3, dims=dims)
    seg = torch.randint(0, 3, (2, 1, *ODD[dims]))
    targets = deep_supervision_targets(seg, output_strides(net))
    outs = model(torch.randn(2, 2, *ODD[dims]))
    expected = list(output_shapes(net, ODD[dims]))
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(t.shape[2:]) for t in targets] == expected
    assert all(o.shape[:2] == (2, 3) for o in outs)


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_every_family_trains(arch: str, dims: int) -> None:
    torch.manual_seed(0)
    net = odd_plan(arch, dims, SMALL[dims])
    model = build_network(net, in_channels=1, num_classes=2, dims=dims)
    x = torch.randn(2, 1, *SMALL[dims])
    targets = deep_supervision_targets((x > 0.5).long(), output_strides(net))
    loss_fn = DeepSupervisionLoss(n_outputs=len(targets))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        outs = model(x)  # the training loss, plus the lowest head it weighs 0 (so every parameter gets a gradient)
        loss = loss_fn(outs, targets) + 1e-3 * F.cross_entropy(outs[-1], targets[-1][:, 0])
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_the_cost_models_parameter_count_is_the_modules(arch: str, dims: int, norm: str) -> None:
    net = odd_plan(arch, dims, norm=norm, dropout=0.2)
    model = build_network(net, in_channels=2, num_classes=3, dims=dims)
    assert count_parameters(model) == estimate_parameters(net, in_channels=2, num_classes=3, dims=dims)


@pytest.mark.parametrize(("norm", "cls"), [("instance", nn.InstanceNorm3d), ("batch", nn.BatchNorm3d),
                                           ("group", nn.GroupNorm)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_norm_option_takes_effect(arch: str, norm: str, cls: type[nn.Module]) -> None:
    model = build_network(odd_plan(arch, 3, norm=norm), in_channels=1, num_classes=2, dims=3)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm))}
    assert kinds == {cls}
    if norm == "group":
        assert all(m.num_groups == norm_groups(m.num_channels) for m in model.modules() if isinstance(m, nn.GroupNorm))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_dropout_option_takes_effect(arch: str) -> None:
    off = build_network(odd_plan(arch, 2), in_channels=1, num_classes=2, dims=2)
    on = build_network(odd_plan(arch, 2, dropout=0.3), in_channels=1, num_classes=2, dims=2)
    assert not any(isinstance(m, nn.Dropout) for m in off.modules())
    assert {m.p for m in on.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert set(on.state_dict()) == set(off.state_dict())  # dropout holds no parameters: checkpoints interchange
    x = torch.randn(1, 1, *ODD[2])
    with torch.no_grad():
        assert not torch.equal(on(x)[0], on(x)[0])  # training mode: dropped at random
        on.eval()
        torch.testing.assert_close(on(x)[0], on(x)[0])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("norm", "layer", "norm 'layer' is not one of"),
    ("dropout", 1.0, "dropout must be a probability in [0, 1)"),
    ("aspp_dilations", ((0, 1),), "aspp_dilations must hold"),
])
def test_bad_options_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace(")", r"\)")):
        odd_plan("aspp_unet", 2, **{field: value})


def test_old_plans_load_with_the_default_options() -> None:
    data = dataclasses.asdict(odd_plan("plain_unet", 2))
    for key in ("norm", "dropout", "aspp_dilations"):
        data.pop(key)
    plan = odd_plan("plain_unet", 2)
    assert (plan.norm, plan.dropout, plan.aspp_dilations) == ("instance", 0.0, None)
    assert NetworkPlan(**data) == plan


def test_the_cost_model_knows_every_family() -> None:
    assert set(ARCHITECTURE_FAMILIES) == set(ARCHITECTURES) == set(cli.ARCHITECTURE_CHOICES)
    assert tuple(cli.ARCHITECTURE_CHOICES) == ARCHITECTURES
    plain = estimate_activation_elements(odd_plan("plain_unet", 3), in_channels=1, num_classes=2,
                                         patch_size=ODD[3], dims=3)
    for arch in ("attention_unet", "aspp_unet"):  # gates and branches keep more for backward
        assert estimate_activation_elements(odd_plan(arch, 3), in_channels=1, num_classes=2, patch_size=ODD[3],
                                            dims=3) > plain


def test_aspp_rates_follow_the_bottleneck() -> None:
    net = odd_plan("aspp_unet", 3)  # bottleneck (10, 7, 9), kernel (3, 3, 3)
    assert net.aspp_dilations == ((2, 1, 2), (3, 2, 3), (5, 4, 4))
    assert aspp_rates_for(dataclasses.replace(net, kernel_sizes=((1, 3, 3),) * 3), ODD[3]).aspp_dilations[2] == \
        (1, 4, 4)  # no dilation along an axis the kernel does not span
    assert aspp_rates_for(odd_plan("plain_unet", 3), ODD[3]).aspp_dilations is None
    unset = dataclasses.replace(net, aspp_dilations=None)
    assert aspp_dilations(unset) == ((1, 1, 1), (2, 2, 2), (3, 3, 3))
    model = build_network(net, in_channels=1, num_classes=2, dims=3)
    aspp = next(m for m in model.modules() if isinstance(m, ASPP))
    assert [tuple(b[0].dilation) for b in aspp.branches[1:]] == list(net.aspp_dilations)


def test_segnet_unpools_without_skip_features() -> None:
    net = odd_plan("segnet_unet", 3)
    model = build_network(net, in_channels=1, num_classes=2, dims=3)
    kinds = {type(m) for m in model.modules()}
    assert nn.MaxPool3d in kinds and UnpoolUp in kinds and nn.ConvTranspose3d not in kinds
    pool, up = nn.MaxPool3d(2, return_indices=True), UnpoolUp(3, 3, (2, 2, 2), dims=3)
    y, idx = pool(torch.randn(2, 3, 4, 6, 8))
    with torch.no_grad():  # the scatter is nn.MaxUnpool3d
        torch.testing.assert_close(up(y, idx), nn.MaxUnpool3d(2)(up.proj(y), idx))
    firsts = [stage[0][0] for stage in model.decoder.stages]
    assert [c.in_channels for c in firsts] == [8, 4]  # the level's width only: nothing concatenated
    assert all(tuple(c.stride) == (1, 1, 1) for c in model.modules() if isinstance(c, nn.Conv3d))


def test_attention_gates_scale_each_skip_down() -> None:
    model = build_network(odd_plan("attention_unet", 2), in_channels=1, num_classes=2, dims=2)
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == 2
    skip, gate = torch.randn(1, 4, 44, 60), torch.randn(1, 8, 44, 30)
    with torch.no_grad():
        out = gates[-1](skip, gate)
    assert out.shape == skip.shape and bool((out.abs() <= skip.abs()).all())


# --- planning ------------------------------------------------------------------------------------------------


@pytest.fixture
def fingerprint(synthetic_fingerprint: Callable[..., object]) -> object:
    return synthetic_fingerprint([(1.0, 1.0, 1.0)] * 3, [(64, 80, 72)] * 3)


@pytest.mark.parametrize("device", ["gpu", "cpu"])
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in RULE_ARCHITECTURES])
def test_plan_adds_a_variant_of_each_configuration(fingerprint: object, arch: str, device: str) -> None:
    profile, budget = (GPU, None) if device == "gpu" else (CPU, 600.0)
    plans = plan_dataset(fingerprint, device=profile, time_budget_s=budget, architecture=arch)  # type: ignore[arg-type]
    rule_names = [n for n in plans.configurations if not n.endswith(arch)]
    assert rule_names and list(plans.configurations) == rule_names + [f"{n}_{arch}" for n in rule_names]
    for name in rule_names:
        rule, variant = plans.configuration(name), plans.configuration(f"{name}_{arch}")
        assert rule.network.architecture == "plain_unet" and variant.network.architecture == arch
        assert variant.data_identifier == rule.data_identifier and variant.dims == rule.dims
        same = (variant.patch_size, variant.batch_size, variant.network.features_per_stage) == \
            (rule.patch_size, rule.batch_size, rule.network.features_per_stage)
        if device == "gpu":  # no budget: only the memory could force a refit, and these fit easily
            assert same and variant.notes[0] == f"{arch} variant of {name}: same patch and batch (they still fit " \
                "the memory and time)"
            assert (variant.training.epochs, variant.training.iterations_per_epoch) == \
                (rule.training.epochs, rule.training.iterations_per_epoch)
        else:  # the rule plan fills the budget: a costlier network is fitted afresh, at most as costly a step
            assert same == ("same patch and batch" in variant.notes[0])
            assert same or "fitted afresh" in variant.notes[0]
            assert variant.training.estimated_fold_seconds <= 1.05 * budget  # type: ignore[operator]
        assert variant.training.estimated_seconds_per_iteration != rule.training.estimated_seconds_per_iteration
    assert Plans.from_json(plans.to_json()).to_json() == plans.to_json()


def test_a_variant_that_no_longer_fits_the_memory_is_fitted_afresh(fingerprint: object,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rule = plan_dataset(fingerprint, device=GPU, configurations=["3d_fullres"])  # type: ignore[arg-type]
    original = configuration_fit.activation_bytes

    def heavy_aspp(net: NetworkPlan, patch: object, *, batch: int) -> float:  # the ASPP "needs" 1000x the memory
        return original(net, patch, batch=batch) * (1000.0 if net.architecture == "aspp_unet" else 1.0)  # type: ignore[arg-type]

    monkeypatch.setattr(configuration_fit, "activation_bytes", heavy_aspp)
    plans = plan_dataset(fingerprint, device=GPU, configurations=["3d_fullres"], architecture="aspp_unet")  # type: ignore[arg-type]
    before = plans.configuration("3d_fullres")
    assert before == rule.configuration("3d_fullres")
    variant = plans.configuration("3d_fullres_aspp_unet")
    assert variant.notes[0] == "aspp_unet variant of 3d_fullres: its patch and batch no longer fit the memory or " \
        "time; fitted afresh"
    limit = memory_limit_bytes(GPU)
    as_aspp = dataclasses.replace(before.network, architecture="aspp_unet")
    assert heavy_aspp(as_aspp, before.patch_size, batch=before.batch_size) > limit
    assert heavy_aspp(variant.network, variant.patch_size, batch=variant.batch_size) <= limit
    assert variant.network.aspp_dilations == aspp_rates_for(variant.network, variant.patch_size).aspp_dilations


def test_cli_plan_architecture_adds_the_configuration(write_nnunet_dataset: Callable[..., object],
                                                     tmp_path: Path) -> None:
    data = write_nnunet_dataset(tmp_path / "Dataset009_Arch")
    work = tmp_path / "work"
    result = CliRunner().invoke(cli.main, ["plan", str(data.root), "--work-dir", str(work), "-c", "3d_fullres",  # type: ignore[attr-defined]
                                           "-j", "1", "--device", "reference-cpu-2core", "--no-preprocess",
                                           "--architecture", "attention_unet"])
    assert result.exit_code == 0, result.output
    configurations = json.loads((work / "plans.json").read_text())["configurations"]
    assert list(configurations) == ["3d_fullres", "3d_fullres_attention_unet"]
    assert configurations["3d_fullres_attention_unet"]["network"]["architecture"] == "attention_unet"
    assert "3d_fullres_attention_unet: " in result.output
    assert "attention_unet" in (next(p for p in cli.plan.params if p.name == "architecture").help or "")


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in RULE_ARCHITECTURES])
def test_the_new_families_export_to_onnx(arch: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from automedseg.onnx_engine import export_onnx

    plans = Plans.load(Path(__file__).resolve().parent.parent / "plans" / "demo_cpu.json")
    config = next(iter(plans.configurations.values()))
    net = aspp_rates_for(dataclasses.replace(config.network, architecture=arch, features_per_stage=(4, 8, 8, 8)[
        :config.network.n_stages]), config.patch_size)
    model = build_network(net, in_channels=len(plans.channel_names), num_classes=plans.num_classes, dims=config.dims)
    _, info = export_onnx(model, plans, dataclasses.replace(config, network=net), exporter="legacy")
    assert info["max_abs_difference"] < 1e-3


@pytest.mark.parametrize(("dims", "activation", "dropout"), [(3, True, 0.0), (2, True, 0.0), (3, False, 0.0),
                                                            (2, True, 0.3)])
def test_conv_norm_act_fused_is_the_same_function(monkeypatch: pytest.MonkeyPatch, dims: int, activation: bool,
                                                  dropout: float) -> None:
    from automedseg import fused_norm, network_blocks
    from automedseg.network_blocks import BlockSettings, ConvNormAct

    if not fused_norm.fused_available():
        pytest.skip("no C compiler for the fused kernel")
    torch.manual_seed(0)
    block = ConvNormAct(3, 5, (3,) * dims, (1,) * dims, settings=BlockSettings(dims, dropout=dropout),
                        activation=activation)
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-1, 1)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    block = block.to(memory_format=fmt)
    x = torch.randn(2, 3, *(6,) * dims).to(memory_format=fmt)
    if dropout:  # the masks follow the memory layout, so compare with the deterministic function
        y = block(x)
        kept = y != 0
        assert 0.1 < 1 - float(kept.float().mean()) < 0.5
        block.eval()
        assert torch.allclose(y[kept], block(x)[kept] / (1 - dropout), atol=1e-5)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(network_blocks, "fusable", lambda t: False)
        block.zero_grad()
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert y1.is_contiguous(memory_format=fmt)
    assert torch.allclose(y1, y2, atol=1e-5) and torch.allclose(gx1, gx2, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(gp1, gp2))
    assert [k for k, _ in block.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
