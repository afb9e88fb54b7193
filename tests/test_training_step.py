"""One optimisation step as training takes it: the plan's optimizer and the step on a loader batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automedseg.losses import DeepSupervisionLoss
from automedseg.network import build_network, output_strides
from automedseg.planning import network_for
from automedseg.plans import TrainingPlan
from automedseg.training_step import make_optimizer, train_step


@pytest.mark.parametrize(("optimizer", "cls"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_make_optimizer(optimizer: str, cls: type) -> None:
    plan = TrainingPlan(epochs=1, iterations_per_epoch=1, optimizer=optimizer, initial_lr=0.02, weight_decay=1e-4)
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), plan)
    group = opt.param_groups[0]
    assert type(opt) is cls and (group["lr"], group["weight_decay"]) == (0.02, 1e-4)
    if optimizer == "sgd":
        assert group["nesterov"] and group["momentum"] == plan.momentum


def test_train_step_on_a_loader_batch() -> None:
    torch.manual_seed(0)
    net, patch = network_for([1.0, 1.0], [16, 16], dims=2, base=4)
    model = build_network(net, in_channels=1, num_classes=2, dims=2).train()
    strides = output_strides(net)
    rng = np.random.default_rng(0)
    batch = {"data": rng.standard_normal((2, 1, *patch), dtype=np.float32),
             "target": [rng.integers(0, 2, (2, 1, *(p // s[0] for p in patch))).astype(np.float32) for s in strides]}
    optimizer = make_optimizer(model.parameters(), TrainingPlan(epochs=1, iterations_per_epoch=1, optimizer="adamw",
                                                                initial_lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, batch, optimizer=optimizer, loss_fn=DeepSupervisionLoss(len(strides)),
                      device=torch.device("cpu"))
    assert np.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
