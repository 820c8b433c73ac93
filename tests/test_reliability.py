"""Fault injection across the tool set: kills and Ctrl-C, planted bad data, bad arguments, hostile
files, NaN losses and memory over epochs. Each test states the guarantee it proves in its name;
tests/RELIABILITY.md lists them for users.
"""
from __future__ import annotations

import csv
import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch
import yaml

import detect
import train
import val
from classify import predict as cls_predict
from classify import train as cls_train
from classify import val as cls_val
from tests import faults
from tests.conftest import shared_path
from utils.checkpoints import atomic_save, make_checkpoint
from utils.dataset import LoadImagesAndLabels
from utils.errors import UserError
from utils.loss import ComputeLoss
from utils.sources import LoadImages

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--img", "128", "--workers", "0", "--noautoanchor", "--device", "cpu", "--noplots"]
KILL_SEED = 20240611  # kill points are random but reproducible


# ----- shared fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco8() -> Path:
    return shared_path("data", "coco8", "coco8.yaml")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[Path, dict]:
    shared_path("data", "coco8")
    return faults.detection_faults(tmp_path_factory.mktemp("faulty"))


@pytest.fixture(scope="module")
def faulty_cls(tmp_path_factory) -> tuple[Path, dict]:
    shared_path("data", "cifar10")
    return faults.classification_faults(tmp_path_factory.mktemp("faulty_cls") / "data", per_class=2)


def read_epochs(run: Path) -> list[int]:
    with open(run / "results.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def one_error_line(err: str) -> str:
    """The single `ERROR:` line of a failed command; fails on a traceback or several errors."""
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def fails_cleanly(main, argv: list[str], capsys) -> str:
    """Run a CLI main in-process; it must exit 2 with exactly one ERROR line. Returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return one_error_line(capsys.readouterr().err)


# ----- kill -9, Ctrl-C and resume ----------------------------------------------------------------
class TrainProcess:
    """train.py in its own process group, output going to files the test polls."""

    def __init__(self, args: list[str], logs: Path, tag: str):
        self.out, self.err = logs / f"{tag}.out", logs / f"{tag}.err"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=o, stderr=e, env=env,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_until(self, condition, timeout: float = 420, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            rc = self.proc.poll()
            assert rc is None, f"train.py ended (rc {rc}) before the kill point:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(poll)

    def signal(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=300)


@pytest.mark.slow
def test_kill_at_random_points_and_ctrl_c_then_resume_finishes_the_plan(coco8, tmp_path):
    """SIGKILL during an epoch, during validation and during a checkpoint write, then Ctrl-C: each
    time last.pt loads, and resuming ends with exactly the planned epochs in results.csv."""
    epochs, rng = 12, random.Random(KILL_SEED)  # enough epochs that an idle machine is still training at each kill point
    run = tmp_path / "kill"
    last = run / "weights" / "last.pt"
    first = ["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", str(epochs), "--batch", "2",
             "--project", str(tmp_path), "--name", "kill", *FAST]
    resume = ["--resume", str(last), "--device", "cpu", "--workers", "0"]

    def started(p: TrainProcess):
        return lambda: "Starting training" in p.out.read_text(errors="replace")

    def kill_during_epoch(p: TrainProcess, remaining: int) -> None:
        nth = rng.randint(1, min(2, remaining))  # in the first or the second epoch this process trains
        p.wait_until(lambda: p.out.read_text(errors="replace").count("GPU_mem") >= nth)  # an epoch's header
        time.sleep(rng.uniform(0.1, 1.5))
        p.signal(signal.SIGKILL)

    def kill_during_validation(p: TrainProcess, remaining: int) -> None:
        p.wait_until(lambda: "mAP50-95" in p.err.read_text(errors="replace"), poll=0.01)  # val's progress bar
        time.sleep(rng.uniform(0.0, 0.2))
        p.signal(signal.SIGKILL)

    def kill_during_checkpoint_write(p: TrainProcess, remaining: int) -> bool:
        # atomic_save writes .last.pt.<random>.tmp, then renames it: strike while the temporary exists
        p.wait_until(lambda: last.exists() and any(last.parent.glob(".last.pt.*.tmp")), poll=0.001)
        p.signal(signal.SIGKILL)
        return any(last.parent.glob(".last.pt.*.tmp"))  # still there: the write really was cut short

    def check_last() -> int:
        assert last.is_file(), "no last.pt after the kill"
        ckpt = torch.load(last, map_location="cpu", weights_only=True)  # complete and plain data
        assert -1 <= ckpt["epoch"] < epochs
        return ckpt["epoch"]

    plan = [kill_during_epoch, kill_during_validation, kill_during_checkpoint_write]
    rng.shuffle(plan)
    events = []  # (kill, epoch in last.pt afterwards): shown when an assertion fails
    def next_args() -> tuple[list[str], int]:
        """Resume what the last kill left; if it struck after the final epoch, start the run afresh."""
        if not last.exists():
            return first, epochs
        done = check_last() + 1
        if done >= epochs:  # nothing left to resume: a fast machine finished before the kill point
            shutil.rmtree(run)
            return first, epochs
        return resume, epochs - done

    for k, kill in enumerate(plan):
        args, remaining = next_args()
        hit = kill(TrainProcess(args, tmp_path, f"run{k}"), remaining)
        if kill is kill_during_checkpoint_write and not hit:  # the rename won the race: one more try
            args, remaining = next_args()
            kill(TrainProcess(args, tmp_path, f"run{k}b"), remaining)
        events.append((kill.__name__, check_last()))

    # Ctrl-C: last.pt is saved and the message says how to resume
    args, _ = next_args()
    p = TrainProcess(args, tmp_path, "interrupted")
    p.wait_until(started(p))
    time.sleep(rng.uniform(0.2, 1.5))
    assert p.signal(signal.SIGINT) == 130, events
    text = p.text()
    assert f"Resume with: python train.py --resume {last}" in text and "Traceback" not in text, text[-3000:]
    events.append(("ctrl_c", check_last()))

    done = subprocess.run([sys.executable, "train.py", *resume], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (events, done.stderr[-3000:])
    assert read_epochs(run) == list(range(epochs)), events
    assert check_last() == epochs - 1


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_write_waits_for_it_then_stops_cleanly(coco8, tmp_path):
    """A Ctrl-C that lands inside torch.save must neither tear the file nor turn into a crash: the write
    finishes, the run stops with 130 and the resume message, and --resume continues after that epoch."""
    epochs = 4
    run = tmp_path / "ckpt"
    last = run / "weights" / "last.pt"
    first = ["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", str(epochs), "--batch", "2",
             "--project", str(tmp_path), "--name", "ckpt", *FAST]
    for attempt in range(3):  # the rename may win the race; then try again from scratch
        shutil.rmtree(run, ignore_errors=True)
        p = TrainProcess(first, tmp_path, f"int{attempt}")
        p.wait_until(lambda: "Starting training" in p.out.read_text(errors="replace"))  # past the epoch -1 save
        p.wait_until(lambda: any(last.parent.glob(".*.pt.*.tmp")), poll=0.001)
        mid_write = any(last.parent.glob(".*.pt.*.tmp"))
        rc = p.signal(signal.SIGINT)
        text = p.text()
        assert rc == 130 and "Traceback" not in text, text[-3000:]
        assert f"Resume with: python train.py --resume {last}" in text
        if mid_write:
            break
    saved = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert saved >= 0  # the end-of-epoch checkpoint that was being written is kept, not rolled back
    assert not list(last.parent.glob(".*.tmp"))
    done = subprocess.run([sys.executable, "train.py", "--resume", str(last), "--device", "cpu", "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_epochs(run) == list(range(epochs))
    assert not list(last.parent.glob("*.tmp")), "a killed write left its temporary file behind"
    torch.load(run / "weights" / "best.pt", map_location="cpu", weights_only=True)


# ----- planted bad data --------------------------------------------------------------------------
def assert_reported_once(out: str, planted: faults.Planted) -> None:
    # (the closing hint of a training run names a good val image to draw detections on: not a report)
    out = "\n".join(ln for ln in out.splitlines() if not ln.startswith("See its detections:"))
    for f in planted.reported:
        assert out.count(f) == 1, (f, out.count(f))
    for f in planted.usable + planted.good:
        assert f not in out, f"{f} is a valid image but was reported"
    assert out.count(Path(planted.orphan_labels[0]).name) == 1


def scan_line(out: str, split: str) -> str:
    """The summary line of a split's label scan (fresh or from the cache)."""
    return next(ln for ln in out.splitlines()
                if "Scanning" in ln and (f"/images/{split}" in ln or f"/labels/{split}.cache" in ln))


@pytest.mark.slow
def test_train_on_planted_faults_reports_each_once_and_finishes(faulty, tmp_path, capsys):
    data, planted = faulty
    train.main(["--data", str(data), "--cfg", "yolov5n.yaml", "--epochs", "2", "--batch", "4", "--noval",
                "--project", str(tmp_path), "--name", "run", *FAST, "--img", "100"])
    out = capsys.readouterr().out
    assert "--imgsz 100 must be a multiple of max stride 32, updating to 128" in out
    for split in ("train", "val"):
        assert_reported_once(out, planted[split])
        n_bad = len(planted[split].corrupt)
        assert scan_line(out, split).endswith(f"{n_bad} corrupt")
    assert read_epochs(tmp_path / "run") == [0, 1]
    assert (tmp_path / "run" / "weights" / "best.pt").is_file()


def test_val_on_planted_faults_reports_each_once(faulty, yolov5n_weights, tmp_path, capsys):
    data, planted = faulty
    metrics = val.run(data, weights=yolov5n_weights, imgsz=100, batch_size=4, workers=0, device="cpu",
                      project=tmp_path, plots=False)
    out = capsys.readouterr().out
    assert "updating to 128" in out
    assert_reported_once(out, planted["val"])
    assert scan_line(out, "val").endswith(f"{len(planted['val'].corrupt)} corrupt")
    assert f"{'all':>22}{len(planted['val'].kept):>11}" in out  # every usable image evaluated
    assert all(np.isfinite([metrics.precision, metrics.recall, metrics.map50, metrics.map]))


def test_detect_on_planted_faults_skips_unreadable_files_once(faulty, yolov5n_weights, tmp_path, capsys):
    _, planted = faulty
    images = planted["train"].images
    out = detect.run(weights=yolov5n_weights, source=images, imgsz=[100], project=tmp_path, nosave=True)
    printed = capsys.readouterr().out
    unreadable = [f for f in planted["train"].corrupt
                  if Path(f).stem.split("_")[1] in ("truncated", "zerobyte", "textfile")]  # the rest are label faults
    n_files = len(list(images.iterdir()))
    assert "updating to [128]" in printed
    for f in unreadable:
        assert printed.count(f) == 1, f
    assert f"{len(unreadable)} of {n_files} files skipped as unreadable" in printed
    assert len(out["results"]) == n_files - len(unreadable)


def test_odd_but_valid_images_decode_like_the_original(faulty):
    """EXIF-rotated, grey, 16-bit and CMYK files give the picture the labels were made on."""
    _, planted = faulty
    pl = planted["train"]
    src = pl.good[0]
    by_kind = {Path(f).stem.split("_")[1]: f for f in pl.usable}
    files = [src, by_kind["exif6"], by_kind["gray"], by_kind["deep16"], by_kind["cmyk"]]
    ims = {Path(path).stem.split("_")[-1]: im0 for path, _, im0, _, _ in LoadImages(files, img_size=128)}
    orig = ims.pop(Path(src).stem).astype(float)
    assert ims["deep16"].dtype == np.uint8 and np.array_equal(ims["deep16"], orig.astype(np.uint8))
    assert ims["exif6"].shape == orig.shape and np.abs(ims["exif6"] - orig).mean() < 3  # turned upright
    assert np.abs(ims["cmyk"] - orig).mean() < 6
    gray, luma = ims["gray"], cv2.cvtColor(orig.astype(np.uint8), cv2.COLOR_BGR2GRAY)
    assert (gray[..., 0] == gray[..., 1]).all() and np.abs(gray[..., 0] - luma.astype(float)).mean() < 3
    # the training loader sees the same upright images
    ds = LoadImagesAndLabels(pl.images, img_size=128, batch_size=4, nc=80)
    loaded = {Path(f).stem.split("_")[-1]: ds.load_image(i)[0].astype(float) for i, f in enumerate(ds.im_files)}
    base = loaded[Path(src).stem]
    assert np.abs(loaded["exif6"] - base).mean() < 3 and np.abs(loaded["cmyk"] - base).mean() < 6


def test_classify_on_planted_faults_reports_each_once(faulty_cls, tmp_path, capsys):
    data, planted = faulty_cls
    out = cls_train.main(["--model", "resnet18", "--cutoff", "1", "--data", str(data), "--epochs", "2",
                          "--batch-size", "4", "--imgsz", "32", "--workers", "0", "--device", "cpu",
                          "--project", str(tmp_path), "--name", "t"])
    err = capsys.readouterr().err
    for split, folder in (("train", "train"), ("test", "test")):
        pl = planted[split]
        for f in pl.corrupt:
            assert err.count(f) == 1, (f, err.count(f))
        for f in pl.usable:
            assert f not in err
        n = len(pl.good) + len(pl.usable) + len(pl.corrupt)
        assert err.count(f"{len(pl.corrupt)} of {n} images in {data / folder} were unreadable and skipped") == 1
    assert "truncated JPEG" in err  # OpenCV alone would have used the grey-padded half picture
    res = cls_val.run(out["best"], data, workers=0, device="cpu")
    assert res.n == len(planted["test"].good) + len(planted["test"].usable)
    results = cls_predict.run(out["best"], data / "train" / "cat", device="cpu")
    assert len(results) == len(list((data / "train" / "cat").iterdir())) - len(planted["train"].corrupt)


def test_nothing_usable_is_one_clear_error(tmp_path, yolov5n_weights, capsys):
    shared_path("data", "coco8")
    hopeless = faults.unusable_detection_dataset(tmp_path)
    line = fails_cleanly(train.main, ["--data", str(hopeless), "--cfg", "yolov5n.yaml", "--epochs", "1",
                                      "--project", str(tmp_path), *FAST], capsys)
    assert "no usable images" in line
    line = fails_cleanly(val.main, ["--data", str(hopeless), "--weights", str(yolov5n_weights), "--device", "cpu",
                                    "--project", str(tmp_path)], capsys)
    assert "no usable images" in line
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"")
    (junk / "b.png").write_text("not an image")
    line = fails_cleanly(detect.main, ["--weights", str(yolov5n_weights), "--source", str(junk), "--device", "cpu",
                                       "--project", str(tmp_path)], capsys)
    assert "none of the 2 files" in line
    cls_data = faults.unusable_classification_dataset(tmp_path / "cls")
    line = fails_cleanly(cls_train.main, ["--model", "resnet18", "--data", str(cls_data), "--epochs", "1",
                                          "--imgsz", "32", "--workers", "0", "--device", "cpu",
                                          "--project", str(tmp_path)], capsys)
    assert "none of the 2 images" in line


# ----- bad arguments -----------------------------------------------------------------------------
def bad_argument_cases(tmp: Path, coco8: Path, weights: Path, cls_data: Path) -> list[tuple]:
    """(tool main, argv, text the one error line must contain)."""
    typo = faults.typo_yamls(tmp / "typos")
    proj = ["--project", str(tmp / "runs")]
    tr = ["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "1", *FAST, *proj]
    return [
        (train.main, [*tr, "--weights", "missing.pt"], "'missing.pt' not found"),
        (train.main, [*tr, "--cfg", "yolov5q.yaml"], "'yolov5q.yaml' not found"),
        (train.main, [*tr, "--cfg", str(typo["cfg"])], "bakbone"),
        (train.main, [*tr, "--data", str(typo["data"])], "trian"),
        (train.main, [*tr, "--hyp", str(typo["hyp"])], "lr_0"),
        (train.main, [*tr, "--batch-size", "0"], "--batch-size must be at least 1"),
        (train.main, [*tr, "--device", "7"], "--device 7"),
        (val.main, ["--data", str(coco8), "--weights", "missing.pt", *proj], "'missing.pt' not found"),
        (val.main, ["--data", "no-such-data.yaml", "--weights", str(weights), *proj], "no-such-data.yaml"),
        (val.main, ["--data", str(typo["data"]), "--weights", str(weights), *proj], "trian"),
        (val.main, ["--data", str(coco8), "--weights", str(weights), "--batch-size", "0", *proj], "--batch-size"),
        (val.main, ["--data", str(coco8), "--weights", str(weights), "--device", "7", *proj], "--device 7"),
        (detect.main, ["--weights", "missing.pt", *proj], "'missing.pt' not found"),
        (detect.main, ["--weights", str(weights), "--source", str(tmp / "no.jpg"), *proj], "does not exist"),
        (detect.main, ["--weights", str(weights), "--data", str(typo["data"]), *proj], "trian"),
        (detect.main, ["--weights", str(weights), "--device", "7", *proj], "--device 7"),
        (cls_train.main, ["--model", "resnet19", "--data", str(cls_data), *proj], "resnet19"),
        (cls_train.main, ["--data", str(cls_data), "--batch-size", "0", *proj], "--batch-size"),
        (cls_train.main, ["--data", str(tmp / "nowhere"), *proj], "not found"),
        (cls_train.main, ["--data", str(cls_data), "--pretrained", "missing.pt", "--device", "cpu", *proj],
         "missing.pt"),
        (cls_train.main, ["--data", str(cls_data), "--device", "7", *proj], "--device 7"),
        (cls_val.main, ["--weights", "missing.pt", "--data", str(cls_data), "--device", "cpu", *proj], "missing.pt"),
        (cls_val.main, ["--weights", "missing.pt", "--data", str(cls_data), "--device", "7", *proj], "--device 7"),
        (cls_predict.main, ["--weights", "missing.pt", "--device", "cpu", *proj], "missing.pt"),
        (cls_predict.main, ["--weights", "missing.pt", "--device", "7", *proj], "--device 7"),
    ]


def test_bad_arguments_give_one_clear_line_each(tmp_path, coco8, yolov5n_weights, faulty_cls, capsys):
    cases = bad_argument_cases(tmp_path, coco8, yolov5n_weights, faulty_cls[0])
    for main, argv, expect in cases:
        line = fails_cleanly(main, argv, capsys)
        assert expect in line, (main.__module__, argv, line)


@pytest.mark.slow
def test_bad_arguments_from_the_shell_print_only_the_error(tmp_path, yolov5n_weights):
    """The scripts themselves, as users run them: exit status 2 and a one-line stderr, no usage dump."""
    commands = [
        ["train.py", "--batch-size", "0"],
        ["val.py", "--weights", str(yolov5n_weights), "--device", "7"],
        ["detect.py", "--weights", str(tmp_path / "missing.pt")],
        ["classify/predict.py", "--weights", str(tmp_path / "missing.pt")],
    ]
    procs = [subprocess.Popen([sys.executable, *c, "--project", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    for cmd, p in zip(commands, procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, (cmd, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("ERROR: "), (cmd, err)


# ----- untrusted files ---------------------------------------------------------------------------
def test_hostile_checkpoint_is_refused_by_every_tool(tmp_path, coco8, faulty_cls, capsys):
    import export
    import hubconf
    from models import spd
    from utils.errors import report_user_errors

    marker = tmp_path / "PWNED"
    evil = faults.hostile_checkpoint(tmp_path / "evil.pt", marker)
    run_dir = tmp_path / "stolen" / "exp"
    (run_dir / "weights").mkdir(parents=True)
    evil_last = run_dir / "weights" / "last.pt"
    evil_last.write_bytes(evil.read_bytes())
    image = shared_path("images", "bus.jpg")
    cls_data = faulty_cls[0]
    proj = ["--project", str(tmp_path / "runs")]
    cases = [
        (train.main, ["--data", str(coco8), "--weights", str(evil), "--cfg", "yolov5n.yaml", *FAST, *proj]),
        (train.main, ["--resume", str(evil_last), "--device", "cpu"]),
        (val.main, ["--data", str(coco8), "--weights", str(evil), "--device", "cpu", *proj]),
        (detect.main, ["--weights", str(evil), "--source", str(image), "--device", "cpu", *proj]),
        (export.main, ["--weights", str(evil), "--include", "onnx"]),
        (report_user_errors(spd.main), ["convert", "--weights", str(evil), "--cfg", "yolov5n-spd.yaml",
                                        "--out", str(tmp_path / "spd.pt")]),
        (cls_train.main, ["--data", str(cls_data), "--pretrained", str(evil), "--device", "cpu", *proj]),
        (cls_val.main, ["--weights", str(evil), "--data", str(cls_data), "--device", "cpu", *proj]),
        (cls_predict.main, ["--weights", str(evil), "--source", str(image), "--device", "cpu", *proj]),
    ]
    for main, argv in cases:
        line = fails_cleanly(main, argv, capsys)
        assert "refusing to load" in line and "system" in line, (argv, line)
    with pytest.raises(UserError, match="refusing to load"):
        hubconf.custom(path=str(evil), _verbose=False)
    assert not marker.exists()
    assert not (tmp_path / "spd.pt").exists()


def resumable_runs(root: Path, datas: list) -> list[Path]:
    """Run folders holding a plain-data last.pt (epoch 0 of 3) whose saved options name each of `datas`."""
    from models.yolo import Model

    model = Model("yolov5n.yaml", verbose=False)
    model.names = {i: str(i) for i in range(80)}
    defaults = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(train.parse_opt([])).items()}
    lasts = []
    for k, data in enumerate(datas):
        opt = {**defaults, "data": data, "cfg": "yolov5n.yaml", "epochs": 3, "project": str(root), "name": f"exp{k}"}
        lasts.append(root / f"exp{k}" / "weights" / "last.pt")
        ckpt = make_checkpoint(model, model, epoch=0, best_fitness=0.0, updates=0, optimizer=None, opt=opt)
        atomic_save(ckpt, lasts[-1])
    return lasts


def test_download_snippet_runs_only_for_a_yaml_the_user_names(tmp_path, capsys):
    marker = tmp_path / "DOWNLOADED"
    snippet = f"from pathlib import Path\nPath({str(marker)!r}).touch()\nraise RuntimeError('offline')\n"
    spec = {"path": str(tmp_path / "missing"), "train": "images/train", "val": "images/val", "names": ["a"],
            "download": snippet}
    y = tmp_path / "remote.yaml"
    y.write_text(yaml.safe_dump(spec))

    # named by a checkpoint's saved options (--resume of a stranger's run), as a dict or a yaml path: never run
    as_dict, as_path = resumable_runs(tmp_path / "stranger", [spec, str(y)])
    line = fails_cleanly(train.main, ["--resume", str(as_dict), "--device", "cpu"], capsys)
    assert "not plain values" in line
    line = fails_cleanly(train.main, ["--resume", str(as_path), "--device", "cpu"], capsys)
    assert "automatic download is off" in line
    # detect.py only reads class names from --data
    assert "automatic download is off" in fails_cleanly(detect.main, ["--weights", "x.pt", "--data", str(y),
                                                                      "--device", "cpu"], capsys)
    assert not marker.exists()
    # the user names the yaml for training: its download step runs (and its failure is one line)
    line = fails_cleanly(train.main, ["--data", str(y), "--cfg", "yolov5n.yaml", "--project", str(tmp_path), *FAST],
                         capsys)
    assert marker.exists() and "download step failed: RuntimeError: offline" in line


# ----- numerical faults --------------------------------------------------------------------------
def poison_training_steps(monkeypatch, nan_loss: set[int], nan_grad: set[int] = frozenset()) -> dict:
    """Make chosen training steps (0-based, validation excluded) give a NaN loss, or a finite loss whose
    gradient is NaN (the square root of zero's slope is infinite)."""
    real = ComputeLoss.__call__
    seen = {"steps": 0}

    def poisoned(self, p, targets):
        loss, items = real(self, p, targets)
        if torch.is_grad_enabled():  # validation runs under no_grad
            k = seen["steps"]
            seen["steps"] += 1
            if k in nan_loss:
                loss = loss * float("nan")
            elif k in nan_grad:
                loss = loss + torch.sqrt((p[0] * 0).sum())
        return loss, items

    monkeypatch.setattr(ComputeLoss, "__call__", poisoned)
    return seen


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nan_loss_and_nan_gradient_steps_are_skipped(coco8, tmp_path, monkeypatch, capsys):
    # one optimizer step per epoch (batch 4 of 4 images): epoch 1 has a NaN loss, epoch 2 a NaN
    # gradient, so after epoch 0 nothing may change
    poison_training_steps(monkeypatch, nan_loss={1}, nan_grad={2})
    train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "3", "--batch", "4", "--noval",
                "--save-period", "1", "--project", str(tmp_path), "--name", "nan", *FAST])
    out = capsys.readouterr().out
    assert out.count("non-finite loss nan at epoch 1") == 1
    assert out.count("non-finite gradient norm nan at epoch 2") == 1
    w = tmp_path / "nan" / "weights"
    final = torch.load(w / "last.pt", weights_only=True)
    before = torch.load(w / "epoch0.pt", weights_only=True)
    after_epoch1 = torch.load(w / "epoch1.pt", weights_only=True)
    assert final["epoch"] == 2
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in final[key].values() if v.is_floating_point())
        assert same_tensors(after_epoch1[key], before[key]), f"the NaN-loss step changed the {key} weights"
        halved = {k: v.half() if v.is_floating_point() else v for k, v in before[key].items()}  # final files are fp16
        assert same_tensors(final[key], halved), f"skipped steps changed the {key} weights"


@pytest.mark.slow
def test_ten_nan_steps_in_a_row_stop_the_run_keeping_the_last_good_weights(coco8, tmp_path, monkeypatch, capsys):
    # 4 steps per epoch; every step from epoch 1 on is NaN, so the 10th bad step comes in epoch 3
    poison_training_steps(monkeypatch, nan_loss=set(range(4, 100)))
    line = fails_cleanly(train.main, ["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "6", "--batch", "1",
                                      "--noval", "--save-period", "1", "--project", str(tmp_path), "--name", "nan",
                                      *FAST], capsys)
    w = tmp_path / "nan" / "weights"
    assert "10 non-finite losses or gradients in a row" in line and str(w / "last.pt") in line
    last = torch.load(w / "last.pt", weights_only=True)
    good = torch.load(w / "epoch0.pt", weights_only=True)
    assert last["epoch"] == 2 and not (w / "epoch3.pt").exists()
    assert same_tensors(last["model"], good["model"]) and same_tensors(last["ema"], good["ema"])


# ----- long runs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_resident_memory_does_not_grow_across_epochs(coco8, tmp_path, monkeypatch):
    from utils.logging import ResultsLogger

    rss = []
    real_log = ResultsLogger.log

    def log_and_measure(self, epoch, values):
        real_log(self, epoch, values)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)

    monkeypatch.setattr(ResultsLogger, "log", log_and_measure)
    train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--epochs", "5", "--batch", "4",
                "--project", str(tmp_path), "--name", "mem", *FAST])
    assert len(rss) == 5
    growth = max(rss[2:]) / rss[1] - 1
    assert growth < 0.10, f"resident memory grew {growth:.1%} after epoch 2: {[r >> 20 for r in rss]} MiB"
