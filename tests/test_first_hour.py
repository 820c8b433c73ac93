"""What a new user and a YOLOv5 user meet first: which model a command trains, AutoBatch, warm-up on short
runs, val.py agreeing with training, Ctrl-C with loader workers, one log per DDP run, readable log lines."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import detect
import train
import val
from tests.conftest import shared_path
from utils.autobatch import fit_batch
from utils.optim import warmup_iterations, warmup_warning
from utils.smallobjects import generate
from utils.torch_utils import describe_transfer
from utils.words import plural

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img", "64", "--epochs", "1", "--device", "cpu", "--noautoanchor", "--noplots"]


def results_rows(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


def all_row(text: str) -> list[str]:
    """The numbers of the last 'all' row of a printed validation table."""
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] == ["all"]]
    assert rows, text[-2000:]
    return rows[-1][1:]


def saved_layers(ckpt: Path) -> set[str]:
    cfg = torch.load(ckpt, map_location="cpu", weights_only=True)["cfg"]
    return {str(layer[2]) for layer in cfg["backbone"] + cfg["head"]}


@pytest.fixture(scope="module")
def coco8() -> Path:
    return shared_path("data", "coco8", "coco8.yaml")


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory, coco8, yolov5n_weights) -> tuple[Path, str]:
    """`train.py --weights yolov5n.pt --data coco8.yaml` with no --cfg, as a YOLOv5 user types it."""
    project = tmp_path_factory.mktemp("ft")
    with _captured() as out:
        train.main(["--weights", str(yolov5n_weights), "--data", str(coco8), "--batch-size", "4", "--workers", "0",
                    "--project", str(project), "--name", "run", *TINY])
    return project / "run", out.text


class _captured:
    """stdout of an in-process CLI run as text (capsys is function-scoped; the fixtures are per module)."""

    def __enter__(self):
        import io

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.text = self._buf.getvalue()
        return False


# ----- which model a command trains ---------------------------------------------------------------
@pytest.mark.slow
def test_weights_without_cfg_fine_tune_their_own_plain_architecture(fine_tune):
    run, out = fine_tune
    assert "space_to_depth" not in saved_layers(run / "weights" / "last.pt")
    assert saved_layers(run / "weights" / "last.pt") >= {"Conv", "C3", "SPPF", "Detect"}
    transfers = [ln for ln in out.splitlines() if ln.startswith("Transferred")]
    assert transfers == ["Transferred 349/349 tensors exactly from yolov5n.pt into its own architecture (from the weights)"]
    assert out.count("Results saved to") == 1


@pytest.mark.slow
def test_weights_with_spd_cfg_train_spd_through_the_exact_transfer(tmp_path, coco8, yolov5n_weights, capsys):
    train.main(["--weights", str(yolov5n_weights), "--cfg", "yolov5n-spd.yaml", "--data", str(coco8),
                "--batch-size", "-1", "--workers", "0", "--noval", "--project", str(tmp_path), "--name", "spd", *TINY])
    out = capsys.readouterr().out
    assert "space_to_depth" in saved_layers(tmp_path / "spd" / "weights" / "last.pt")
    transfers = [ln for ln in out.splitlines() if ln.startswith("Transferred")]
    assert len(transfers) == 1 and transfers[0].startswith("Transferred ")
    assert " tensors exactly from yolov5n.pt into yolov5n-spd.yaml" in transfers[0]
    # AutoBatch has no GPU memory to measure here: YOLOv5's CPU fallback, said once
    assert out.count("AutoBatch: no CUDA device, using --batch-size 16") == 1
    assert yaml.safe_load((tmp_path / "spd" / "opt.yaml").read_text())["batch_size"] == 16


def test_transfer_line_names_what_was_reinitialised_and_why():
    model = {"model.0.conv.weight": 0, "model.0.bn.weight": 0, "model.24.m.0.weight": 0, "model.24.m.0.bias": 0,
             "model.24.anchors": 0}
    loaded = {"model.0.conv.weight": 0, "model.0.bn.weight": 0}
    line = describe_transfer(loaded, model, "a.pt", "b.yaml", "model.24.", nc_from=80, nc_to=4)
    assert line == ("Transferred 2/5 tensors exactly from a.pt into b.yaml; re-initialised 2 Detect outputs "
                    "(nc=4, the weights have nc=80), 1 anchors (from this run's config/AutoAnchor)")
    assert describe_transfer(model, model, "a.pt", "b.yaml", "model.24.", 80, 80) == \
        "Transferred 5/5 tensors exactly from a.pt into b.yaml"


def test_autobatch_fit_picks_the_batch_that_fills_the_budget():
    # 100 MB fixed + 50 MB per image: a 1,100 MB budget holds 20 images
    sizes = [1, 2, 4, 8, 16]
    mems = [100e6 + 50e6 * b for b in sizes]
    assert fit_batch(sizes, mems, budget_bytes=1100e6) == 20
    assert fit_batch(sizes, mems, budget_bytes=50e6) == 1  # never below one image
    assert fit_batch(sizes, [5e8] * 5, budget_bytes=1e9) == 16  # flat probe: the largest size that ran


def test_batch_size_minus_one_is_accepted_and_other_negatives_are_not():
    assert train.parse_opt(["--batch-size", "-1"]).batch_size == -1
    with pytest.raises(Exception, match="AutoBatch"):
        train.parse_opt(["--batch-size", "-2"])


# ----- warm-up on short runs ----------------------------------------------------------------------
def test_warmup_length_and_its_warning():
    assert warmup_iterations(3.0, 16) == 100  # YOLOv5's 100-iteration floor
    assert warmup_iterations(3.0, 500) == 1500
    assert warmup_iterations(0.0, 500) == 0  # 0 disables warm-up
    assert warmup_warning(100, 300) is None  # an ordinary run: three times the warm-up or more
    line = warmup_warning(100, 75)
    assert line.startswith("WARNING: warm-up is 100 iterations") and "75 planned" in line and "warmup_epochs" in line
    assert "100%" in line
    assert warmup_warning(0, 10) is None


def shapes_set(folder: Path, n_train: int, seed: int) -> Path:
    """A generated 64-px small-object set with its data yaml."""
    root = generate(folder / "so", n_train=n_train, n_val=4, img_size=64, seed=seed, sizes=(6, 20))
    data = folder / "so.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": {0: "circle", 1: "square", 2: "triangle", 3: "cross"}}))
    return data


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return shapes_set(tmp_path_factory.mktemp("so"), n_train=75, seed=3)  # 75 steps of batch 1


@pytest.mark.slow
def test_a_75_iteration_run_says_it_is_mostly_warm_up(tmp_path, tiny_set, capsys):
    train.main(["--data", str(tiny_set), "--cfg", "yolov5n.yaml", "--batch-size", "1", "--workers", "0", "--noval",
                "--nosave", "--project", str(tmp_path), "--name", "w", *TINY])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("WARNING: warm-up")]
    assert len(lines) == 1 and "75 planned" in lines[0]


@pytest.mark.slow
def test_warmup_epochs_zero_trains_at_lr0_from_the_first_step(tmp_path, coco8, capsys):
    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    lr_at_end_of_epoch0 = {}
    for warm in (0.0, 3.0):
        hyp_file = tmp_path / f"hyp{warm}.yaml"
        hyp_file.write_text(yaml.safe_dump({**hyp, "warmup_epochs": warm}))
        train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--hyp", str(hyp_file), "--batch-size", "4",
                    "--workers", "0", "--noval", "--nosave", "--project", str(tmp_path), "--name", f"w{warm}", *TINY])
        row = results_rows(tmp_path / f"w{warm}")[0]
        lr_at_end_of_epoch0[warm] = [float(row[f"x/lr{j}"]) for j in range(3)]
    out = capsys.readouterr().out
    assert lr_at_end_of_epoch0[0.0] == [hyp["lr0"]] * 3  # every group at lr0 (lf(0) = 1), no warm-up ramp
    assert lr_at_end_of_epoch0[3.0] != [hyp["lr0"]] * 3  # (with warm-up the first step's LR is not lr0)
    assert out.count("WARNING: warm-up") == 1  # the 3-epoch warm-up run says so; warm-up 0 does not


# ----- val.py agrees with the training's final validation -----------------------------------------
@pytest.mark.slow
def test_val_on_best_pt_reproduces_the_final_validation(fine_tune, coco8, tmp_path, capsys):
    run, out = fine_tune
    final = out.split("Validating ")[-1]
    val.main(["--weights", str(run / "weights" / "best.pt"), "--data", str(coco8), "--device", "cpu",
              "--project", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Using batch size 8, --img 64 from the training's final validation in best.pt" in printed
    assert all_row(printed) == all_row(final)
    assert "Fusing layers... " in printed and " summary: " in printed


@pytest.mark.slow
def test_explicit_val_options_still_win(fine_tune, coco8, tmp_path, capsys):
    run, _ = fine_tune
    val.main(["--weights", str(run / "weights" / "best.pt"), "--data", str(coco8), "--device", "cpu", "--img", "96",
              "--batch-size", "2", "--project", str(tmp_path), "--name", "explicit"])
    printed = capsys.readouterr().out
    assert "from the training's final validation" not in printed
    assert "at shape (2, 3, 96, 96)" in printed


# ----- log lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n,expected", [
    ("bus", 30, "buses"), ("bus", 1, "bus"), ("person", 4, "persons"), ("tie", 2, "ties"), ("skis", 3, "skis"),
    ("knife", 2, "knives"), ("mouse", 2, "mice"), ("potted plant", 2, "potted plants"), ("box", 2, "boxes"),
    ("battery", 2, "batteries"), ("toy", 2, "toys"), ("sheep", 5, "sheep"), ("R2", 2, "R2"),
])
def test_class_names_are_pluralised_as_english(name, n, expected):
    assert plural(name, n) == expected


def test_speed_line_shows_the_input_shapes_that_ran(yolov5n_weights, images_dir, tmp_path, capsys):
    detect.run(weights=yolov5n_weights, source=images_dir / "bus.jpg", imgsz=[416], project=tmp_path, nosave=True)
    out = capsys.readouterr().out
    assert "at shape (1, 3, 416, 320)" in out  # bus.jpg is 810x1080: letterboxed to 416 high, 320 wide
    assert re.search(r"Fusing layers\.\.\. .*summary: \d+ layers, [\d,]+ parameters, 0 gradients", out)


def test_near_zero_metrics_keep_their_significant_digits():
    assert val.format_metric(7.78e-05) == "7.78e-05"
    assert val.format_metric(0.3481) == "0.348"
    assert val.format_metric(0.0) == "0"
    assert val.format_metric(-1.0) == "n/a"


@pytest.mark.slow
def test_verbose_lists_every_class_with_labels(coco8, yolov5n_weights, tmp_path, capsys):
    # at 64 px yolov5n.pt misses whole classes of coco8: their rows must still be listed
    val.main(["--weights", str(yolov5n_weights), "--data", str(coco8), "--img", "64", "--verbose", "--device", "cpu",
              "--project", str(tmp_path)])
    out = capsys.readouterr().out
    labels = np.concatenate([np.loadtxt(f, ndmin=2) for f in (coco8.parent / "labels" / "val").glob("*.txt")])
    names = yaml.safe_load(coco8.read_text())["names"]
    with_labels = [names[int(c)] for c in np.unique(labels[:, 0])]
    listed = [n for n in with_labels if any(re.match(rf"^\s*{re.escape(n)}\s+4\s+\d+\s", ln) for ln in out.splitlines())]
    assert listed == with_labels


# ----- Ctrl-C from a terminal with loader workers -------------------------------------------------
@pytest.fixture(scope="module")
def ctrl_c_set(tmp_path_factory) -> Path:
    # long enough epochs (80 steps of 2 images) that the Ctrl-C lands while the workers are busy
    return shapes_set(tmp_path_factory.mktemp("cc"), n_train=160, seed=5)


def _interrupt_then_resume(tmp: Path, data: Path, tag: str) -> None:
    run, last = tmp / tag, tmp / tag / "weights" / "last.pt"
    args = ["--data", str(data), "--cfg", "yolov5n.yaml", "--epochs", "2", "--batch-size", "2", "--workers", "2",
            "--img", "64", "--device", "cpu", "--noautoanchor", "--noplots", "--project", str(tmp), "--name", tag]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out, err = tmp / f"{tag}.out", tmp / f"{tag}.err"
    with open(out, "w") as o, open(err, "w") as e:
        # its own process group: a terminal's Ctrl-C reaches the main process and every loader worker
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=o, stderr=e, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while "Starting training" not in out.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:] + err.read_text()[-2000:]
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are up and prefetching batches
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=300)
    text, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    assert rc == 130, text[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-3000:]
    assert f"Resume with: python train.py --resume {last}" in text
    done = subprocess.run([sys.executable, "train.py", "--resume", str(last), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(r["epoch"]) for r in results_rows(run)] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_to_the_process_group_with_workers_stops_cleanly_and_resumes(tmp_path, ctrl_c_set, attempt):
    _interrupt_then_resume(tmp_path, ctrl_c_set, f"int{attempt}")


# ----- DDP: one log per run -----------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_prints_each_line_once(coco8, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "train.py", "--data", str(coco8), "--cfg", "yolov5n.yaml", "--batch-size", "4", "--workers", "0",
           "--project", str(tmp_path), "--name", "ddp", *TINY]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Starting training") == 1, r.stdout[-3000:]
    assert r.stdout.count("hyperparameters: ") == 1
    assert r.stdout.count("Results saved to") == 1


# ----- fixed-shape exports say what they force -----------------------------------------------------
def test_val_on_a_fixed_shape_export_says_it_forces_size_and_batch(tmp_path, coco8, yolov5n_weights, capsys):
    import shutil

    import export

    w = Path(shutil.copy(yolov5n_weights, tmp_path / "n.pt"))
    f = export.run(weights=w, imgsz=[64], batch_size=1, include=["onnx"])["onnx"]
    capsys.readouterr()
    val.main(["--weights", str(f), "--data", str(coco8), "--img", "128", "--batch-size", "4", "--device", "cpu",
              "--project", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fixed-shape export: evaluating at its export batch 1 (not --batch-size 4) and size 64 (not --imgsz 128)" in out
    assert "at shape (1, 3, 64, 64)" in out


def test_pycocotools_summary_prints_significant_digits(tmp_path, capsys):
    import json

    from utils.coco import predictions_to_coco_json, run_pycocotools, yolo_labels_to_coco_gt

    # one object found only below 99 higher-scored false positives: AP about 0.0099, which pycocotools'
    # own summary would print as 0.010
    labels = [np.array([[0, 10, 10, 20, 20]])]
    gt = (tmp_path / "gt.json")
    gt.write_text(json.dumps(yolo_labels_to_coco_gt(["1.jpg"], labels, [(400, 400)], ["a"])))
    fps = [[200 + i, 200, 210 + i, 210, 0.9, 0] for i in range(99)]
    preds = predictions_to_coco_json([("1.jpg", np.array([*fps, [10, 10, 20, 20, 0.1, 0]], dtype=float))])
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(preds))
    stats = run_pycocotools(gt, pred)
    out = capsys.readouterr().out
    assert 0 < stats[0] < 0.02
    assert f"area=   all | maxDets=100 ] = {stats[0]:.4g}" in out and f"{stats[0]:.4g}" != f"{stats[0]:.3f}"
    assert out.count(" = n/a") == 4  # medium and large: no ground truth, undefined (-1) rather than a number
