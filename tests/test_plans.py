"""Tests for automedseg.plans: exact save/load round trips and field-naming errors for hand-edited plans."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

from automedseg.planning import NOMINAL_PROFILES, plan_dataset
from automedseg.plans import (
    SCHEMA_VERSION,
    ChannelNormalization,
    DeviceProfile,
    PlanError,
    Plans,
    StepShapeCost,
    index_dtype,
    indices_to_values,
    label_values,
    value_dtype,
    values_to_indices,
)
from automedseg.serialize import from_jsonable, to_jsonable

CPU = NOMINAL_PROFILES["reference-cpu-2core"]
GPU = NOMINAL_PROFILES["reference-gpu-24g"]


@pytest.fixture
def plan_3d(synthetic_fingerprint) -> Plans:
    fp = synthetic_fingerprint([(0.8, 0.8, 3.0)] * 3, [(160, 150, 40)] * 3, channel_names=("CT", "T2"),
                               labels={"background": 0, "liver": 1, "tumour": 2})
    return plan_dataset(fp, device=CPU, time_budget_s=1200)


@pytest.fixture
def plan_2d(synthetic_fingerprint) -> Plans:
    fp = synthetic_fingerprint([(999.0, 0.5, 0.5)] * 3, [(1, 300, 280)] * 3, channel_names=("R", "G", "B"),
                               is_2d=True)
    return plan_dataset(fp, device=GPU)


@pytest.mark.parametrize("which", ["plan_3d", "plan_2d"])
def test_save_load_roundtrip_exact(request, tmp_path, which):
    plans: Plans = request.getfixturevalue(which)
    path = tmp_path / "work" / "plans.json"
    plans.save(path)
    text = path.read_text()
    assert text == plans.to_json()
    loaded = Plans.load(path)
    assert loaded == plans
    assert loaded.to_json() == text
    for name, config in plans.configurations.items():
        assert loaded.configuration(name) == config
        assert dataclasses.asdict(loaded.configuration(name)) == dataclasses.asdict(config)
    assert [p.name for p in path.parent.iterdir()] == ["plans.json"]  # atomic: no temporary files left


def test_roundtrip_keeps_types(plan_3d):
    loaded = Plans.from_json(plan_3d.to_json())
    cfg = loaded.configuration("3d_fullres")
    assert isinstance(cfg.patch_size, tuple) and all(isinstance(v, int) for v in cfg.patch_size)
    assert isinstance(cfg.spacing_mm, tuple) and all(isinstance(v, float) for v in cfg.spacing_mm)
    assert isinstance(cfg.network.kernel_sizes[0], tuple)
    assert isinstance(cfg.normalization[0], ChannelNormalization) and cfg.normalization[0].scheme == "ct"
    assert isinstance(loaded.device, DeviceProfile) and loaded.device.gflops_at(16) == CPU.gflops_at(16)
    assert loaded.transpose_backward == plan_3d.transpose_backward


def test_to_json_is_plain_json(plan_3d):
    data = json.loads(plan_3d.to_json())
    assert data["schema_version"] == SCHEMA_VERSION
    assert isinstance(data["configurations"]["3d_fullres"]["patch_size"], list)
    assert Plans.from_dict(data) == plan_3d


def _set(data: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    for key in path:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if value is _DELETE:
        del data[last]
    elif isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


_DELETE = object()

# (field path inside the JSON, new value, text the error must contain)
BAD_EDITS = [
    # wrong field type
    ("configurations.3d_fullres.batch_size", "two", "plans.configurations.3d_fullres.batch_size: expected an integer"),
    ("configurations.3d_fullres.batch_size", True, "plans.configurations.3d_fullres.batch_size"),
    ("configurations.3d_fullres.separate_z", "yes", "plans.configurations.3d_fullres.separate_z: expected true"),
    ("configurations.3d_fullres.training.initial_lr", "0.01", "plans.configurations.3d_fullres.training.initial_lr"),
    ("configurations.3d_fullres.training.time_budget_s", "20m", "training.time_budget_s: expected a number"),
    ("configurations.3d_fullres.patch_size", 128, "plans.configurations.3d_fullres.patch_size: expected a list"),
    ("configurations.3d_fullres.spacing_mm", [1.0, 1.0], "plans.configurations.3d_fullres.spacing_mm: expected 3"),
    ("configurations.3d_fullres.network.strides.1.0", "2", "network.strides[1][0]: expected an integer"),
    ("labels.tumour", 1.5, "plans.labels.tumour: expected an integer"),
    ("transpose_forward", [0, 1], "plans.transpose_forward: expected 3 entries"),
    ("device.gflops_by_width.0", [8], "plans.device.gflops_by_width[0]: expected 2 entries"),
    ("device.window_voxels_per_s", -1.0, "plans.device: window_voxels_per_s must be a positive number"),
    ("device.window_voxels_per_s", "fast", "plans.device.window_voxels_per_s: expected a number"),
    ("device.augment_voxels_per_s", [[4, 1e6]], "augment_voxels_per_s must be (dims, voxels/s) pairs"),
    ("device.augment_voxels_per_s", [[3, 0.0]], "augment_voxels_per_s must hold positive throughputs"),
    ("device.gflops_by_width_2d", [[8, -5.0]], "gflops_by_width_2d must hold positive throughputs"),
    ("device.step_gflops_by_width", [[8, 0.0]], "step_gflops_by_width must hold positive throughputs"),
    ("device.step_gflops_by_width_2d", [[8]], "plans.device.step_gflops_by_width_2d[0]: expected 2 entries"),
    ("device.gflops_by_width", [], "gflops_by_width must not be empty"),
    ("device.worker_placement", "pinned", "plans.device: worker_placement 'pinned' is not one of"),
    ("device.placement_step_seconds", [["own_core", 0.0]], "placement_step_seconds must be (placement, seconds)"),
    ("device.placement_step_seconds", [["mine", 0.2]], "placement_step_seconds must be (placement, seconds)"),
    ("configurations.3d_fullres.training.worker_placement", "own-core",
     "plans.configurations.3d_fullres.training: worker_placement 'own-core' is not one of ('shared', 'own_core')"),
    ("configurations.3d_fullres.training.worker_placement", 1,
     "plans.configurations.3d_fullres.training.worker_placement: expected a string"),
    ("dataset_name", 7, "plans.dataset_name: expected a string"),
    ("configurations.3d_fullres.augmentation", [], "plans.configurations.3d_fullres.augmentation: expected an object"),
    # unknown field
    ("configurations.3d_fullres.training.learning_rate", 0.1,
     "plans.configurations.3d_fullres.training: unknown field(s) ['learning_rate']"),
    ("extra", {}, "plans: unknown field(s) ['extra']"),
    # missing field
    ("configurations.3d_fullres.patch_size", _DELETE, "plans.configurations.3d_fullres: missing field 'patch_size'"),
    ("configurations.3d_fullres.network.strides", _DELETE, "network: missing field 'strides'"),
    ("dataset_name", _DELETE, "plans: missing field 'dataset_name'"),
    # bad enum / value
    ("configurations.3d_fullres.normalization.0.scheme", "minmax",
     "plans.configurations.3d_fullres.normalization[0]: normalization scheme 'minmax'"),
    ("configurations.3d_fullres.network.architecture", "vit", "plans.configurations.3d_fullres.network: architecture"),
    ("configurations.3d_fullres.training.optimizer", "adam", "plans.configurations.3d_fullres.training: optimizer"),
    ("configurations.3d_fullres.dims", 4, "dims must be 2 or 3"),
    ("configurations.3d_fullres.training.epochs", 0, "epochs and iterations_per_epoch must be at least 1"),
    ("transpose_forward", [0, 0, 1], "not a permutation"),
    ("configurations.3d_fullres.normalization.0.clip_low", None, "ct normalization needs clip_low"),
]


@pytest.mark.parametrize("field,value,message", BAD_EDITS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_EDITS])
def test_hand_edited_plan_errors_name_the_field(plan_3d, tmp_path, field, value, message):
    data = copy.deepcopy(plan_3d.to_dict())
    _set(data, field, value)
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(PlanError) as err:
        Plans.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, "1"])
def test_schema_version_mismatch(plan_3d, version):
    data = plan_3d.to_dict()
    data["schema_version"] = version
    with pytest.raises(PlanError, match="schema_version .* is not supported"):
        Plans.from_dict(data)


def test_schema_version_is_reported_before_unknown_fields(plan_3d):
    data = plan_3d.to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    data["renamed_in_a_future_schema"] = 1  # a newer file format also has fields this version does not know
    with pytest.raises(PlanError, match="schema_version"):
        Plans.from_dict(data)


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"),
    ("[1, 2]", "plans: expected an object, got list"),
    ("null", "plans: expected an object"),
])
def test_not_a_plan(text, message):
    with pytest.raises(PlanError, match=message):
        Plans.from_json(text)


def test_load_missing_or_binary_file(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        Plans.load(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="bin.json"):
        Plans.load(tmp_path / "bin.json")


def test_integral_float_accepted_for_int_field(plan_3d):
    data = plan_3d.to_dict()
    data["configurations"]["3d_fullres"]["batch_size"] = 2.0
    assert Plans.from_dict(data).configuration("3d_fullres").batch_size == 2


def test_configuration_lookup_and_replace(plan_3d):
    with pytest.raises(PlanError, match="available"):
        plan_3d.configuration("3d_cascade")
    cfg = dataclasses.replace(plan_3d.configuration("3d_fullres"), name="3d_custom", batch_size=5)
    new = plan_3d.with_configuration(cfg)
    assert new.configuration("3d_custom").batch_size == 5 and "3d_custom" not in plan_3d.configurations
    assert Plans.from_json(new.to_json()) == new


@pytest.mark.parametrize("forward", [(0, 1, 2), (2, 0, 1), (1, 0, 2), (1, 2, 0)])
def test_transpose_backward_inverts_forward(plan_3d, forward):
    plans = dataclasses.replace(plan_3d, transpose_forward=forward)
    back = plans.transpose_backward
    assert [forward[b] for b in back] == [0, 1, 2]


def test_num_classes(plan_3d):
    assert plan_3d.num_classes == 3


# --- label values <-> training indices ---------------------------------------------------------------


@pytest.mark.parametrize("labels, values, value_type", [
    ({"background": 0, "a": 1, "b": 2}, (0, 1, 2), np.uint8),
    ({"background": 0, "a": 1, "b": 200}, (0, 1, 200), np.uint8),
    ({"b": 200, "background": 0, "a": 1}, (0, 1, 200), np.uint8),  # declaration order does not matter
    ({"background": 0, "a": 5, "b": 40000}, (0, 5, 40000), np.uint16),
    ({"background": 0, "a": 255}, (0, 255), np.uint8),
    ({"background": 0, "a": 256}, (0, 256), np.uint16),
    ({"background": 0, "a": 70000}, (0, 70000), np.int32),
    ({"background": 0, "a": 3, "b": 3}, (0, 3), np.uint8),  # two names, one value: one class
])
def test_label_mapping_round_trip(labels, values, value_type):
    assert label_values(labels) == values
    seg = np.array(values * 2 + values[::-1]).reshape(1, 3, -1)
    idx = values_to_indices(seg, values)
    assert idx.dtype == np.int8 and idx.shape == seg.shape
    np.testing.assert_array_equal(idx.ravel(), list(range(len(values))) * 2 + list(range(len(values)))[::-1])
    back = indices_to_values(idx, values)
    assert back.dtype == value_type
    np.testing.assert_array_equal(back, seg)
    # an argmax (int64) maps back the same way
    np.testing.assert_array_equal(indices_to_values(idx.astype(np.int64), values), seg)


def test_plans_label_methods(plan_3d):
    plans = dataclasses.replace(plan_3d, labels={"background": 0, "organ": 1, "lesion": 200})
    assert plans.label_values == (0, 1, 200) and plans.num_classes == 3
    seg = np.array([[0, 200], [1, 200]], dtype=np.int16)
    np.testing.assert_array_equal(plans.to_indices(seg), [[0, 2], [1, 2]])
    np.testing.assert_array_equal(plans.to_values(plans.to_indices(seg)), seg)
    assert Plans.from_json(plans.to_json()).label_values == (0, 1, 200)  # the labels dict is the whole record


@pytest.mark.parametrize("num_classes, dtype", [(2, np.int8), (128, np.int8), (129, np.int16), (300, np.int16),
                                                (40000, np.int32)])
def test_index_dtype_holds_every_index(num_classes, dtype):
    assert index_dtype(num_classes) == dtype
    values = tuple(range(0, 2 * num_classes, 2))
    idx = values_to_indices(np.array(values), values)
    assert idx.dtype == dtype and int(idx.max()) == num_classes - 1
    assert value_dtype(values) == (np.uint8 if values[-1] < 256 else np.uint16 if values[-1] < 65536 else np.int32)


@pytest.mark.parametrize("seg, message", [
    (np.array([0, 1, 3]), r"values \[3\] are not declared"),
    (np.array([0, -1]), r"values \[-1\] are not declared"),
    (np.array([0, 300]), r"values \[300\] are not declared"),
])
def test_values_to_indices_rejects_undeclared_values(seg, message):
    with pytest.raises(ValueError, match=message):
        values_to_indices(seg, (0, 1, 200))


@pytest.mark.parametrize("index_map", [np.array([0, 3]), np.array([-1, 0])])
def test_indices_to_values_rejects_out_of_range(index_map):
    with pytest.raises(ValueError, match="training indices"):
        indices_to_values(index_map, (0, 1, 200))


@pytest.mark.parametrize("labels", [{"a": 1}, {"background": 0, "ignore": -1}, {}])
def test_plan_labels_need_background_and_no_negative_value(plan_3d, labels):
    with pytest.raises(PlanError, match="background"):
        dataclasses.replace(plan_3d, labels=labels)
    data = plan_3d.to_dict()
    data["labels"] = labels
    with pytest.raises(PlanError, match="plans: labels"):
        Plans.from_dict(data)


@pytest.mark.parametrize("kwargs", [
    {"scheme": "ct", "clip_low": 0.0, "clip_high": 1.0, "mean": 0.5},
    {"scheme": "percentile"},
])
def test_channel_normalization_validation(kwargs):
    with pytest.raises(PlanError):
        ChannelNormalization(**kwargs)


@pytest.mark.parametrize("width,expected", [(4, 210.0), (8, 210.0), (64, 1400.0), (128, 1400.0)])
def test_device_gflops_at_ends(width, expected):
    assert CPU.gflops_at(width) == expected


def test_device_gflops_interpolates_log_linearly():
    g = CPU.gflops_at(12)
    assert 210.0 < g < 610.0
    assert g == pytest.approx((210.0 * 610.0) ** 0.5, rel=0.2)


NEW_DEVICE_FIELDS = ("gflops_by_width_2d", "window_voxels_per_s", "augment_voxels_per_s", "step_gflops_by_width",
                     "step_gflops_by_width_2d", "worker_placement", "placement_step_seconds")


@pytest.mark.parametrize("which", ["plan_3d", "plan_2d"])
def test_a_plan_from_before_the_data_calibration_loads_and_saves_unchanged(request, which):
    data = copy.deepcopy(request.getfixturevalue(which).to_dict())
    for name in NEW_DEVICE_FIELDS:
        data["device"].pop(name, None)
    text = json.dumps(data, indent=2) + "\n"
    loaded = Plans.from_json(text)
    assert all(getattr(loaded.device, name) is None for name in NEW_DEVICE_FIELDS)
    assert loaded.to_json() == text  # absent fields stay absent


def test_device_data_and_2d_fields_round_trip():
    device = dataclasses.replace(CPU, gflops_by_width_2d=((8, 100.0), (64, 900.0)), window_voxels_per_s=2e8,
                                 augment_voxels_per_s=((2, 6e6), (3, 5e6)), step_gflops_by_width=((8, 110.0),),
                                 step_gflops_by_width_2d=((8, 60.0), (32, 230.0)))
    data = to_jsonable(device)
    assert data["augment_voxels_per_s"] == [[2, 6e6], [3, 5e6]] and data["window_voxels_per_s"] == 2e8
    assert data["step_gflops_by_width_2d"] == [[8, 60.0], [32, 230.0]]
    assert from_jsonable(DeviceProfile, data, "device") == device
    assert "step_gflops_by_width" not in to_jsonable(CPU)  # null: left out


def test_worker_placement_is_saved_only_when_not_shared(plan_3d, tmp_path):
    data = plan_3d.to_dict()
    assert all("worker_placement" not in c["training"] for c in data["configurations"].values())  # as older plans
    assert Plans.from_dict(data).configuration("3d_fullres").training.worker_placement == "shared"
    config = plan_3d.configuration("3d_fullres")
    own = dataclasses.replace(config, training=dataclasses.replace(config.training, worker_placement="own_core"))
    plans = plan_3d.with_configuration(own)
    plans.save(tmp_path / "plans.json")
    text = (tmp_path / "plans.json").read_text()
    assert text.count('"worker_placement": "own_core"') == 1
    loaded = Plans.load(tmp_path / "plans.json")
    assert loaded.configuration("3d_fullres").training.worker_placement == "own_core" and loaded.to_json() == text


def test_device_placement_fields_round_trip():
    device = dataclasses.replace(CPU, worker_placement="own_core",
                                 placement_step_seconds=(("shared", 0.31), ("own_core", 0.27)))
    data = to_jsonable(device)
    assert data["worker_placement"] == "own_core" and data["placement_step_seconds"] == [["shared", 0.31],
                                                                                          ["own_core", 0.27]]
    assert from_jsonable(DeviceProfile, data, "device") == device
    assert "worker_placement" not in to_jsonable(CPU) and "placement_step_seconds" not in to_jsonable(CPU)


@pytest.mark.parametrize(("steps_3d", "steps_2d", "width", "dims", "expected"), [
    (None, None, 8, 3, None),  # not timed
    (((8, 110.0), (32, 440.0)), None, 16, 3, 220.0),  # log-linear between widths
    (((8, 110.0), (32, 440.0)), None, 64, 3, 440.0),
    (((8, 110.0), (32, 440.0)), None, 8, 2, None),  # 2D steps not timed: no 3D stand-in
    (None, ((8, 60.0),), 16, 2, 60.0),
])
def test_device_step_gflops_at(steps_3d, steps_2d, width, dims, expected):
    device = dataclasses.replace(CPU, step_gflops_by_width=steps_3d, step_gflops_by_width_2d=steps_2d)
    got = device.step_gflops_at(width, dims=dims)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(("table_2d", "width", "dims", "expected"), [
    (None, 8, 2, 210.0),  # no 2D timing: the 3D figures
    (((8, 100.0), (64, 900.0)), 8, 2, 100.0),
    (((8, 100.0), (64, 900.0)), 64, 2, 900.0),
    (((8, 100.0), (64, 900.0)), 8, 3, 210.0),  # 3D networks keep the 3D figures
])
def test_device_gflops_at_reads_the_2d_table(table_2d, width, dims, expected):
    assert dataclasses.replace(CPU, gflops_by_width_2d=table_2d).gflops_at(width, dims=dims) == expected


@pytest.mark.parametrize(("pairs", "dims", "expected"), [
    (None, 3, None), (((2, 6e6), (3, 5e6)), 3, 5e6), (((2, 6e6), (3, 5e6)), 2, 6e6), (((3, 5e6),), 2, None),
])
def test_device_augment_rate(pairs, dims, expected):
    assert dataclasses.replace(CPU, augment_voxels_per_s=pairs).augment_rate(dims) == expected


SHAPE_2D = StepShapeCost(2, ((8, 0.141), (16, 0.149), (32, 0.153)), 0.0106)


def test_device_step_shape_costs_round_trip():
    device = dataclasses.replace(CPU, step_gflops_by_width_2d=((8, 76.0),), step_shape_costs=(SHAPE_2D,))
    data = to_jsonable(device)
    assert data["step_shape_costs"] == [{"dims": 2, "parameters_per_gflop_by_width": [[8, 0.141], [16, 0.149],
                                                                                      [32, 0.153]],
                                         "seconds_per_m_parameters": 0.0106}]
    assert from_jsonable(DeviceProfile, data, "device") == device
    assert device.step_shape_cost(2) == SHAPE_2D and device.step_shape_cost(3) is None
    assert "step_shape_costs" not in to_jsonable(CPU) and CPU.step_shape_cost(2) is None


@pytest.mark.parametrize(("kw", "message"), [
    ({"dims": 4}, "dims must be 2 or 3"),
    ({"parameters_per_gflop_by_width": ()}, "parameters_per_gflop_by_width must hold"),
    ({"parameters_per_gflop_by_width": ((8, -1.0),)}, "parameters_per_gflop_by_width must hold"),
    ({"parameters_per_gflop_by_width": ((0, 0.1),)}, "parameters_per_gflop_by_width must hold"),
    ({"seconds_per_m_parameters": -0.1}, "seconds_per_m_parameters must be a number >= 0"),
    ({"seconds_per_m_parameters": float("nan")}, "seconds_per_m_parameters must be a number >= 0"),
])
def test_step_shape_cost_errors_name_the_field(kw, message):
    with pytest.raises(PlanError, match=f"step_shape_costs: {message}"):
        dataclasses.replace(SHAPE_2D, **kw)


def test_one_step_shape_cost_per_dims_with_its_timed_steps():
    with pytest.raises(PlanError, match="one entry per dims"):
        dataclasses.replace(CPU, step_gflops_by_width_2d=((8, 76.0),), step_shape_costs=(SHAPE_2D, SHAPE_2D))
    with pytest.raises(PlanError, match="needs the timed steps of its dims"):
        dataclasses.replace(CPU, step_shape_costs=(SHAPE_2D,))
