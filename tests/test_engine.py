"""The detection engine: the step guard, the checkpoint writer, the named validation result, the predictor,
and resume reproducing an uninterrupted run."""
from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from engine.guards import CheckpointWriter, StepGuard, TrainingInterrupted
from models.predictor import Predictor
from tests.conftest import shared_path
from utils.errors import UserError
from utils.logging import RESULT_KEYS
from utils.results import CSV_FIELDS, ValResult


def test_step_guard_restores_batchnorm_and_stops_after_max_bad():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = StepGuard(net, opt, max_bad=3)
    good_mean = net[1].running_mean.clone()
    net(torch.full((2, 3, 4, 4), float("nan")))  # a forward pass with NaNs poisons the running stats
    net[0].weight.grad = torch.ones_like(net[0].weight)
    assert torch.isnan(net[1].running_mean).all()
    assert not guard.finite(torch.tensor(float("nan")), distributed=False)
    guard.skip("non-finite loss nan", epoch=0, i=0)
    assert torch.equal(net[1].running_mean, good_mean) and net[0].weight.grad is None
    guard.skip("non-finite loss nan", epoch=0, i=1)
    guard.step_done()  # a good step in between resets the count
    guard.skip("x", 0, 2)
    guard.skip("x", 0, 3)
    with pytest.raises(UserError, match="3 non-finite losses"):
        guard.skip("x", 0, 4)


def test_step_guard_keeps_the_statistics_of_the_last_good_step():
    net = nn.BatchNorm1d(2)
    guard = StepGuard(net, torch.optim.SGD(net.parameters(), lr=0.1))
    net(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    guard.step_done()
    after_good = net.running_mean.clone()
    net(torch.tensor([[100.0, 100.0], [300.0, 300.0]]))
    guard.skip("bad", 0, 1)
    assert torch.equal(net.running_mean, after_good) and not torch.equal(after_good, torch.zeros(2))


def test_checkpoint_writer_defers_a_signal_until_the_files_are_written(tmp_path):
    written = []

    def make(epoch: int) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of a save
        written.append(epoch)
        return {"epoch": epoch, "w": torch.zeros(3)}

    with pytest.raises(TrainingInterrupted, match="SIGTERM"), CheckpointWriter(tmp_path, make) as writer:
        writer.save(4, is_best=True)
    assert written == [4]
    for f in ("last.pt", "best.pt"):
        assert torch.load(tmp_path / f, weights_only=True)["epoch"] == 4
    assert signal.getsignal(signal.SIGTERM) is not writer._on_signal  # handlers restored on exit


def test_checkpoint_writer_a_second_signal_does_not_cut_a_save_short(tmp_path):
    written = []

    def make(epoch: int) -> dict:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: a batch wait gives in, a checkpoint write does not
        written.append(epoch)
        return {"epoch": epoch}

    with pytest.raises(TrainingInterrupted, match="SIGINT"), CheckpointWriter(tmp_path, make) as writer:
        writer.save(2, is_best=False)
    assert written == [2] and torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def test_checkpoint_writer_turns_a_signal_between_saves_into_an_interrupt(tmp_path):
    with pytest.raises(TrainingInterrupted), CheckpointWriter(tmp_path, lambda e: {"epoch": e}):
        os.kill(os.getpid(), signal.SIGINT)
    assert not (tmp_path / "last.pt").exists()


def test_checkpoint_writer_interrupted_save_keeps_a_whole_epoch(tmp_path):
    writer = CheckpointWriter(tmp_path, lambda e: {"epoch": e})
    with writer:
        writer.save(2, is_best=False)
        writer.save_interrupted(2)  # interrupted after epoch 2 was saved: last.pt keeps epoch 2
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
        writer.save_interrupted(3)  # interrupted during epoch 3: last.pt is epoch 2's (3 is redone)
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "best.pt").exists()


def test_val_result_fills_the_results_csv_columns_by_name_and_ranks_by_fitness():
    r = ValResult(precision=0.5, recall=0.4, map50=0.6, map=0.3, aps=0.1, apm=0.2, apl=0.35, box_loss=0.05,
                  obj_loss=0.04, cls_loss=0.03)
    row = r.csv_values()
    assert list(row) == list(RESULT_KEYS[3:13])  # the file's own column order
    assert row["metrics/mAP_0.5"] == 0.6 and row["metrics/APs"] == 0.1 and row["val/cls_loss"] == 0.03
    assert r.fitness == pytest.approx(0.1 * 0.6 + 0.9 * 0.3)
    assert ValResult(map50=1.0, map=0.0).fitness < ValResult(map50=0.0, map=0.2).fitness  # mAP50-95 weighs most
    assert set(CSV_FIELDS.values()) <= set(ValResult.__dataclass_fields__)


class _FixedOutput(nn.Module):
    """A 'model' that predicts one box (cx 32, cy 16, w 8, h 8 in input pixels), class 1."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, augment=False):
        row = torch.tensor([32.0, 16.0, 8.0, 8.0, 0.9, 0.1, 0.95])
        return row.expand(x.shape[0], 1, 7).clone()


def test_predictor_maps_boxes_back_to_each_original_image():
    predictor = Predictor(_FixedOutput(), conf_thres=0.25, iou_thres=0.45)
    small = np.zeros((32, 64, 3), np.uint8)  # letterboxed 1:1 into a 32x64 batch
    big = np.zeros((64, 128, 3), np.uint8)  # same aspect, twice the size: boxes come back doubled
    x, dets = predictor.predict_images([small, big], size=(64, 64), stride=32)
    assert tuple(x.shape) == (2, 3, 32, 64)
    torch.testing.assert_close(dets[0][:, :4], torch.tensor([[28.0, 12.0, 36.0, 20.0]]))
    torch.testing.assert_close(dets[1][:, :4], torch.tensor([[56.0, 24.0, 72.0, 40.0]]))
    assert dets[0][0, 5].item() == 1 and dets[0][0, 4].item() == pytest.approx(0.9 * 0.95)
    assert all(t > 0 for t in predictor.times)


def _rows(run: Path) -> list[dict[str, float]]:
    with open(run / "results.csv", newline="") as f:
        return [{k.strip(): float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_resume_after_epoch_1_repeats_the_uninterrupted_epoch_2(tmp_path, monkeypatch, yolov5n_weights):
    args = ["--data", str(shared_path("data", "coco8", "coco8.yaml")), "--weights", str(yolov5n_weights),
            "--epochs", "3", "--img", "128", "--batch", "4", "--workers", "2", "--noautoanchor", "--noplots",
            "--device", "cpu", "--seed", "5", "--project", str(tmp_path)]
    train.main([*args, "--name", "whole"])

    real_end_of_epoch = train.end_of_epoch

    def killed_after_epoch_1(state, epoch, *a, **k):
        out = real_end_of_epoch(state, epoch, *a, **k)  # epoch 1 is validated, logged and saved ...
        if epoch == 1:
            raise TrainingInterrupted("SIGTERM")  # ... then the run is stopped
        return out

    monkeypatch.setattr(train, "end_of_epoch", killed_after_epoch_1)
    with pytest.raises(SystemExit):
        train.main([*args, "--name", "cut"])
    monkeypatch.undo()
    assert [r["epoch"] for r in _rows(tmp_path / "cut")] == [0, 1]
    train.main(["--resume", str(tmp_path / "cut" / "weights" / "last.pt"), "--device", "cpu", "--workers", "2"])

    whole, resumed = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for a, b in zip(whole, resumed):
        assert {k: round(v, 4) for k, v in a.items()} == {k: round(v, 4) for k, v in b.items()}
    assert whole[2]["train/box_loss"] != whole[1]["train/box_loss"]  # epoch 2 really trained
    a, b = (torch.load(tmp_path / r / "weights" / "last.pt", weights_only=True) for r in ("whole", "cut"))
    assert a["updates"] == b["updates"] > 0  # the EMA's own state came back, not only its weights
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
