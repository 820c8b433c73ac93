"""train.py end to end on coco8: outputs, checkpoints, determinism, DDP with gloo, kill-and-resume."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import detect
import train
import val
from tests.conftest import shared_path

pytestmark = pytest.mark.slow  # every test here trains (in-process or in subprocesses)

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--img", "128", "--batch", "4", "--workers", "0", "--noautoanchor", "--device", "cpu"]


def read_results(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def coco8() -> Path:
    return shared_path("data", "coco8", "coco8.yaml")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, coco8, yolov5n_weights) -> Path:
    project = tmp_path_factory.mktemp("train")
    train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--weights", str(yolov5n_weights), "--epochs", "2",
                "--project", str(project), "--name", "run", *COMMON])
    return project / "run"


def test_outputs_and_checkpoints(short_run, coco8, tmp_path):
    for name in ("results.csv", "results.png", "labels.jpg", "train_batch0.jpg", "opt.yaml", "hyp.yaml",
                 "weights/last.pt", "weights/best.pt"):
        assert (short_run / name).is_file(), name
    assert list(short_run.glob("events.out.tfevents.*"))
    rows = read_results(short_run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"metrics/mAP_0.5:0.95", "metrics/APs", "train/box_loss", "x/lr0"} <= set(rows[0])
    for ckpt in ("last.pt", "best.pt"):
        raw = torch.load(short_run / "weights" / ckpt, weights_only=True)  # plain data only
        assert raw["names"][0] == "person"
    # fine-tuned from COCO weights, the model still finds things on coco8
    assert float(rows[-1]["metrics/mAP_0.5"]) > 0.3
    metrics = val.run(coco8, weights=short_run / "weights" / "best.pt", imgsz=128, batch_size=4,
                            project=tmp_path, plots=False)
    assert metrics.map50 > 0.3
    out = detect.run(weights=short_run / "weights" / "last.pt", source=shared_path("images", "bus.jpg"),
                     imgsz=[256], project=tmp_path, nosave=True, verbose=False)
    assert len(out["results"]) == 1


def test_same_seed_same_first_epoch_losses(coco8, tmp_path):
    losses = []
    for name in ("a", "b"):
        train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "1", "--noval", "--noplots",
                    "--project", str(tmp_path), "--name", name, "--seed", "3", *COMMON])
        row = read_results(tmp_path / name)[0]
        losses.append([row["train/box_loss"], row["train/obj_loss"], row["train/cls_loss"]])
    assert losses[0] == losses[1]


def test_ddp_two_processes_gloo(coco8, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "train.py", "--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "1", "--noplots",
           "--project", str(tmp_path), "--name", "ddp", *COMMON]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["ddp"]
    assert len(read_results(runs[0])) == 1
    assert sorted(p.name for p in (runs[0] / "weights").iterdir()) == ["best.pt", "last.pt"]
    # both ranks trained (4 images, batch 4 over 2 ranks: one batch of 2 each) and all-reduce kept them in sync
    m = re.search(r"DDP: rank 0 trained (\d+) batches, weight sum (\S+); rank 1 trained (\d+) batches, weight sum (\S+)\n",
                  r.stdout)
    assert m, r.stdout[-3000:]
    assert int(m.group(1)) == int(m.group(3)) == 1
    assert float(m.group(2)) == float(m.group(4))  # identical replicas after the optimizer steps


def test_sigkill_then_resume_finishes_planned_epochs(coco8, tmp_path):
    epochs = 10  # enough that even an idle machine is mid-run when the kill lands
    cmd = [sys.executable, "train.py", "--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", str(epochs),
           "--noplots", "--project", str(tmp_path), "--name", "kill", *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "kill" / "weights" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # last.pt is written before epoch 0: now a few steps into training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint before the kill"
    torch.load(last, weights_only=True)  # never half-written (a killed write leaves only its temporary file)
    r = subprocess.run([sys.executable, "train.py", "--resume", str(last), "--device", "cpu", "--workers", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs_logged = [int(row["epoch"]) for row in read_results(tmp_path / "kill")]
    assert epochs_logged == list(range(epochs))
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1
    assert not list(last.parent.glob("*.tmp"))  # temporaries of a killed write are cleaned up by the next run


def test_returns_to_the_shell_with_loader_workers(coco8, tmp_path):
    """With loader workers (the default everywhere but these tests' COMMON), train.py must exit after its
    last line. The workers ignore SIGTERM, so any still alive at interpreter exit blocked multiprocessing's
    exit handler for ever: this exact command hung every time before train() stopped them itself."""
    cmd = [sys.executable, "train.py", "--data", str(coco8), "--cfg", "yolov5n-spd.yaml", "--weights", "",
           "--img", "64", "--batch", "16", "--epochs", "1", "--workers", "2", "--device", "cpu",
           "--project", str(tmp_path), "--name", "w"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert (tmp_path / "w" / "weights" / "best.pt").is_file()
