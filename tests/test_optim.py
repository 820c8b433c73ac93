"""Tests for utils/optim.py: parameter groups, LR schedules, warm-up, EMA and early stopping."""
from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.optim import EarlyStopping, ModelEMA, linear_lr, one_cycle, smart_optimizer, warmup

HYP = dict(lr0=0.01, lrf=0.01, momentum=0.937, warmup_momentum=0.8, warmup_bias_lr=0.1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4, 2),
    )  # fmt: skip


# --------------------------------------------------------------------------------- optimizer
def test_every_parameter_in_exactly_one_group_and_norm_weights_not_decayed():
    net = _net()
    opt = smart_optimizer(net, "SGD", lr=0.01, momentum=0.937, decay=5e-4)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(ids) == len(set(ids))
    biases, weights, norms = opt.param_groups
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in net.modules() if getattr(m, "bias", None) is not None}
    assert {id(p) for p in norms["params"]} == {id(net[1].weight), id(net[4].weight)}
    assert {id(p) for p in weights["params"]} == {id(net[0].weight), id(net[3].weight), id(net[6].weight)}
    assert biases["weight_decay"] == 0.0 and norms["weight_decay"] == 0.0 and weights["weight_decay"] == 5e-4
    assert isinstance(opt, torch.optim.SGD) and biases["nesterov"] and biases["momentum"] == 0.937


def test_optimizer_kinds_and_summary(capsys):
    net = _net()
    adam = smart_optimizer(net, "Adam", lr=0.001, momentum=0.9, decay=1e-5)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.999)
    adamw = smart_optimizer(net, "AdamW", lr=0.001, momentum=0.85)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.0
    assert adamw.param_groups[1]["weight_decay"] == 1e-5 and adamw.param_groups[0]["betas"] == (0.85, 0.999)
    assert isinstance(smart_optimizer(net, "RMSProp"), torch.optim.RMSprop)
    out = capsys.readouterr().out
    assert "Adam(lr=0.001) with parameter groups 2 weight(decay=0.0), 3 weight(decay=1e-05), 4 bias" in out
    with pytest.raises(ValueError, match="SGD, Adam, AdamW, RMSProp"):
        smart_optimizer(net, "Lion")


# --------------------------------------------------------------------------------- schedules
def test_linear_schedule_values():
    lf = linear_lr(lrf=0.01, epochs=100)
    assert lf(0) == pytest.approx(1.0)
    assert lf(50) == pytest.approx(0.505)
    assert lf(100) == pytest.approx(0.01)


def test_cosine_schedule_values():
    lf = one_cycle(1, 0.01, 100)
    assert lf(0) == pytest.approx(1.0)
    assert lf(25) == pytest.approx(1 - 0.99 * (1 - math.cos(math.pi / 4)) / 2)
    assert lf(50) == pytest.approx(0.505)
    assert lf(100) == pytest.approx(0.01)


def test_schedule_drives_lambdalr():
    net = _net()
    opt = smart_optimizer(net, "SGD", lr=0.01, momentum=0.9)
    lf = linear_lr(0.1, 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lf)
    for _ in range(4):
        opt.step()
        sched.step()
    assert all(g["lr"] == pytest.approx(0.01 * lf(4)) for g in opt.param_groups)


# ----------------------------------------------------------------------------------- warm-up
def test_warmup_values_at_known_iterations():
    net = _net()
    opt = smart_optimizer(net, "SGD", lr=HYP["lr0"], momentum=HYP["momentum"])
    lf = linear_lr(HYP["lrf"], 10)
    torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lf)  # sets initial_lr as train.py's scheduler does
    nw, nbs, bs = 100, 64, 16

    acc = warmup(0, nw, 0, lf, opt, HYP, nbs, bs)
    assert acc == 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.0, 0.0])
    assert all(g["momentum"] == pytest.approx(0.8) for g in opt.param_groups)

    acc = warmup(50, nw, 0, lf, opt, HYP, nbs, bs)
    assert acc == 2  # round(interp(50, [0, 100], [1, 4])) = round(2.5) = 2 (half to even)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.055, 0.005, 0.005])
    assert all(g["momentum"] == pytest.approx(0.8685) for g in opt.param_groups)

    acc = warmup(100, nw, 1, lf, opt, HYP, nbs, bs)
    assert acc == 4
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * lf(1)] * 3)  # lf(1) = 0.901
    assert all(g["momentum"] == pytest.approx(0.937) for g in opt.param_groups)


def test_warmup_leaves_adam_betas_alone():
    opt = smart_optimizer(_net(), "Adam", lr=0.001, momentum=0.9)
    acc = warmup(10, 100, 0, linear_lr(0.01, 10), opt, HYP, 64, 64)
    assert acc == 1
    assert all("momentum" not in g and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.1 * (0.001 - 0.1))


# ---------------------------------------------------------------------------------------- EMA
def test_ema_moves_toward_model_at_computed_rate():
    net = _net()
    ema = ModelEMA(net, decay=0.9999, tau=2000)
    assert not ema.ema.training and not any(p.requires_grad for p in ema.ema.parameters())
    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # model weights move by +1 and stay there
        net[1].running_mean.add_(2.0)
        net[1].num_batches_tracked += 7
    prod = 1.0
    for x in range(1, 4):
        ema.update(net)
        prod *= 0.9999 * (1 - math.exp(-x / 2000))
    assert ema.updates == 3
    assert ema.decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    # ema - model = (start - model) * product of decays
    got = ema.ema.state_dict()
    w0 = start["0.weight"]
    assert torch.allclose(got["0.weight"], (w0 + 1) - prod, atol=1e-6)
    assert torch.allclose(got["1.running_mean"], (start["1.running_mean"] + 2) - 2 * prod, atol=1e-6)
    assert got["1.num_batches_tracked"] == start["1.num_batches_tracked"]  # integers are not averaged


def test_ema_late_updates_barely_move():
    net = _net()
    ema = ModelEMA(net, updates=100000)
    before = ema.ema[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.ema[0].weight - before, torch.full_like(before, 1e-4), atol=1e-6)


def test_ema_update_attr_save_and_pickle():
    net = _net()
    net.names = {0: "a", 1: "b"}
    net.hyp = {"lr0": 0.01}
    net.reducer = object()
    ema = ModelEMA(net)
    net.names = {0: "x", 1: "y"}
    ema.update_attr(net, include=("names", "hyp", "reducer"), exclude=("reducer",))
    assert ema.ema.names == {0: "x", 1: "y"}
    assert ema.ema.reducer is not net.reducer  # excluded: still the deep copy's own

    ema.update(net)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = ModelEMA(_net())
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.ema.state_dict().values(), ema.ema.state_dict().values()))
    clone = pickle.loads(pickle.dumps(ema))  # no lambdas inside: the object itself pickles
    assert clone.decay(10) == ema.decay(10)


# -------------------------------------------------------------------------------- early stop
def test_early_stopping(capsys):
    stopper = EarlyStopping(patience=3)
    fits = [0.1, 0.2, 0.2, 0.15, 0.19, 0.18, 0.17]
    stops = [stopper(e, f) for e, f in enumerate(fits)]
    assert stops == [False, False, False, False, False, True, True]  # best at epoch 2 (ties count)
    assert stopper.best_epoch == 2 and stopper.possible_stop
    assert "3 epochs" in capsys.readouterr().out


def test_patience_zero_never_stops():
    stopper = EarlyStopping(patience=0)
    assert not any(stopper(e, 0.5 - e * 0.01) for e in range(200))


def test_warmup_accumulate_is_python_int():
    opt = smart_optimizer(_net(), "SGD")
    acc = warmup(37, 100, 0, linear_lr(0.01, 3), opt, HYP, 64, 8)
    assert type(acc) is int and acc == int(np.interp(37, [0, 100], [1, 8]).round())
