"""Broken files and absurd arguments: label caches, damaged checkpoints and configs, bad ONNX metadata,
out-of-range options, full and read-only disks, bounds, streams, concurrent runs and `activation:`.
Each input must give one `ERROR:` line and exit status 2 (no traceback, no segfault), keeping what the
run had already written; or be repaired with one warning line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import detect
import export
import train
import val
from classify import predict as cls_predict
from classify import val as cls_val
from models.checkpoints import load_model
from tests.conftest import shared_path
from tests.faults import onnx_with_metadata
from utils.checkpoints import FORMAT, atomic_save, make_checkpoint
from utils.dataset import LoadImagesAndLabels
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--img", "128", "--workers", "0", "--noautoanchor", "--device", "cpu", "--noplots"]


def fails_cleanly(main, argv: list[str], capsys) -> str:
    """A CLI main run in-process exits 2 with exactly one ERROR line and no traceback; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def coco8_copy(tmp_path_factory) -> Path:
    """A writable coco8 (so its label cache can be written, cut and forged)."""
    src = shared_path("data", "coco8")
    d = tmp_path_factory.mktemp("c8") / "coco8"
    shutil.copytree(src, d)
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    for c in d.rglob("*.cache"):
        c.unlink()
    y = d / "coco8.yaml"
    spec = yaml.safe_load((src / "coco8.yaml").read_text())
    spec["path"] = str(d)
    y.write_text(yaml.safe_dump(spec))
    return y


# ----- 5. label cache ----------------------------------------------------------------------------
def _dataset(coco8_copy: Path, capsys) -> tuple[LoadImagesAndLabels, str]:
    capsys.readouterr()
    ds = LoadImagesAndLabels(coco8_copy.parent / "images" / "train", img_size=128, batch_size=2, nc=80)
    return ds, capsys.readouterr().out


def test_truncated_label_cache_is_rebuilt_with_one_line(coco8_copy, capsys):
    ds, _ = _dataset(coco8_copy, capsys)
    cache, labels = ds.cache_path, [lb.copy() for lb in ds.labels]
    assert cache.is_file()
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # an interrupted copy
    ds, out = _dataset(coco8_copy, capsys)
    assert out.count("is unreadable") == 1 and "rebuilding it" in out
    assert all(np.array_equal(a, b) for a, b in zip(labels, ds.labels))
    _, out = _dataset(coco8_copy, capsys)  # rebuilt: read as a cache again, silently
    assert "(cached)" in out and "rebuilding" not in out
    cache.write_text("not a cache at all\n")
    _, out = _dataset(coco8_copy, capsys)
    assert out.count("is unreadable") == 1


def _forge(cache: Path, **changes) -> None:
    with np.load(cache, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}  # the hash stays: it only fingerprints the file list
    for k, fn in changes.items():
        arrays[k] = fn(arrays[k].copy())
    with open(cache, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("forgery", ["nan-box", "class-999", "outside-image", "coords-over-1", "lengths"])
def test_forged_label_cache_is_validated_like_a_fresh_scan(coco8_copy, capsys, forgery, tmp_path):
    ds, _ = _dataset(coco8_copy, capsys)
    clean = [lb.copy() for lb in ds.labels]
    outside = tmp_path / "secret.jpg"
    shutil.copy(ds.im_files[0], outside)

    def set_label(col, v):
        def f(a):
            a[0, col] = v
            return a
        return f

    change = {
        "nan-box": {"labels": set_label(1, np.nan)},
        "class-999": {"labels": set_label(0, 999)},
        "coords-over-1": {"labels": set_label(3, 7.0)},
        "outside-image": {"im_files": lambda a: np.array([str(outside)] + list(a[1:]), dtype=str)},
        "lengths": {"counts": lambda a: a + 1},
    }[forgery]
    _forge(ds.cache_path, **change)
    ds, out = _dataset(coco8_copy, capsys)
    assert out.count("rebuilding it") == 1, out
    assert str(outside) not in ds.im_files
    assert all(np.array_equal(a, b) for a, b in zip(clean, ds.labels))


# ----- 6. damaged weights: one line in every loader ----------------------------------------------
def _damaged_files(tmp_path: Path, weights: Path) -> dict[str, Path]:
    d = tmp_path / "damaged"
    d.mkdir()
    out = {"zero-byte": d / "empty.pt", "text": d / "text.pt", "lfs": d / "lfs.pt"}
    out["zero-byte"].write_bytes(b"")
    out["text"].write_text("<html><body>404 Not Found</body></html>\n")
    out["lfs"].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3900000\n")
    ck = make_checkpoint(load_model(weights, fuse=False))
    for name, edit in {
        "missing-cfg": lambda c: c.pop("cfg"),
        "missing-model": lambda c: (c.pop("model"), c.update(ema=None)),
        "cfg-is-text": lambda c: c.update(cfg="yolov5n.yaml"),
        "cfg-bad-rows": lambda c: c["cfg"].update(backbone=[[-1, 1, "Conv"]]),
        "cfg-bad-args": lambda c: c["cfg"]["backbone"][0].__setitem__(3, ["x", "y"]),
        "names-bad": lambda c: c.update(names={"a": "person"}),
    }.items():
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ck.items()}
        c["cfg"] = yaml.safe_load(yaml.safe_dump(ck["cfg"]))
        edit(c)
        out[name] = d / f"{name}.pt"
        torch.save(c, out[name])
    return out


def test_damaged_weights_give_one_line_in_every_loader(tmp_path, yolov5n_weights, images_dir, capsys):
    coco8 = shared_path("data", "coco8", "coco8.yaml")
    files = _damaged_files(tmp_path, yolov5n_weights)
    for kind, w in files.items():
        tools = [
            (detect.main, ["--weights", str(w), "--source", str(images_dir / "bus.jpg"), "--project", str(tmp_path)]),
            (val.main, ["--weights", str(w), "--data", str(coco8), "--device", "cpu", "--project", str(tmp_path)]),
            (export.main, ["--weights", str(w), "--include", "onnx"]),
            (train.main, ["--weights", str(w), "--data", str(coco8), "--epochs", "1", "--project", str(tmp_path), *FAST]),
        ]
        if kind in ("zero-byte", "text", "lfs"):  # the classifier loaders read .pt files too
            tools += [(cls_predict.main, ["--weights", str(w), "--source", str(images_dir), "--project", str(tmp_path)]),
                      (cls_val.main, ["--weights", str(w), "--data", str(tmp_path)])]
        for main, argv in tools:
            line = fails_cleanly(main, argv, capsys)
            assert str(w) in line or (main is train.main and "model config" in line), (kind, main.__module__, line)
        with pytest.raises(UserError):
            torch.hub.load(str(ROOT), "custom", path=str(w), source="local", _verbose=False)
    assert "empty (0 bytes)" in fails_cleanly(detect.main, ["--weights", str(files["zero-byte"])], capsys)
    assert "Git LFS pointer" in fails_cleanly(detect.main, ["--weights", str(files["lfs"])], capsys)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    w = shared_path("weights", "yolov5n.pt")
    d = tmp_path_factory.mktemp("onnx")
    return export.run(weights=shutil.copy(w, d / "yolov5n.pt"), imgsz=[160], include=["onnx"], dynamic=True)["onnx"]


@pytest.mark.parametrize("meta", [{"names": json.dumps({"a": "x", "b": "y"})}, {"stride": "abc"}, {"stride": "0"},
                                  {"stride": "nan"}, {"stride": "-32"}, {"nc": "lots"}],
                         ids=["names-keys", "stride-abc", "stride-0", "stride-nan", "stride-neg", "nc-text"])
def test_bad_onnx_metadata_is_one_line(onnx_export, tmp_path, images_dir, capsys, meta):
    meta = dict(meta)
    if "nc" in meta:
        meta["names"] = ""
    w = onnx_with_metadata(onnx_export, tmp_path / "bad.onnx", **meta)
    line = fails_cleanly(detect.main, ["--weights", str(w), "--source", str(images_dir / "bus.jpg"),
                                       "--project", str(tmp_path)], capsys)
    assert "metadata" in line


# ----- 6/7. out-of-range arguments ---------------------------------------------------------------
def test_out_of_range_arguments_are_one_line_each(tmp_path, yolov5n_weights, images_dir, capsys):
    coco8 = shared_path("data", "coco8", "coco8.yaml")
    d = ["--weights", str(yolov5n_weights), "--source", str(images_dir / "bus.jpg"), "--project", str(tmp_path)]
    v = ["--weights", str(yolov5n_weights), "--data", str(coco8), "--device", "cpu", "--project", str(tmp_path)]
    t = ["--cfg", "yolov5n.yaml", "--data", str(coco8), "--epochs", "1", "--project", str(tmp_path),
         "--img", "128", "--noautoanchor", "--device", "cpu", "--noplots"]
    cases = [
        (detect.main, d + ["--conf-thres", "1.5"], "--conf-thres"),
        (detect.main, d + ["--iou-thres", "-0.1"], "--iou-thres"),
        (detect.main, d + ["--max-det", "-1"], "--max-det"),
        (detect.main, d + ["--line-thickness", "-5"], "--line-thickness"),  # was a segfault in cv2.putText
        (detect.main, d + ["--img", "100000"], "YOLOV5_MAX_IMGSZ"),
        (val.main, v + ["--conf-thres", "2"], "--conf-thres"),
        (val.main, v + ["--workers", "-1"], "--workers"),
        (train.main, t + ["--workers", "-1"], "--workers"),
        (train.main, t + ["--workers", "0", "--quad", "--batch-size", "2"], "multiple of 4"),
        (train.main, t + ["--workers", "0", "--freeze", "1000"], "--freeze"),
        (train.main, t + ["--workers", "0", "--img", "100000"], "YOLOV5_MAX_IMGSZ"),
    ]
    for main, argv, expect in cases:
        line = fails_cleanly(main, argv, capsys)
        assert expect in line, (argv, line)
    assert not list(tmp_path.rglob("*.jpg"))  # refused before anything was written


def test_read_only_project_is_one_line(tmp_path, yolov5n_weights, images_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # read-only by its mode bits, which the check honours for root too
    try:
        coco8 = shared_path("data", "coco8", "coco8.yaml")
        for main, argv in (
            (detect.main, ["--weights", str(yolov5n_weights), "--source", str(images_dir / "bus.jpg")]),
            (val.main, ["--weights", str(yolov5n_weights), "--data", str(coco8), "--device", "cpu"]),
            (train.main, ["--cfg", "yolov5n.yaml", "--data", str(coco8), "--epochs", "1", *FAST]),
        ):
            line = fails_cleanly(main, argv + ["--project", str(ro / "runs")], capsys)
            assert "read-only" in line and str(ro) in line
    finally:
        ro.chmod(0o755)
    assert not list(ro.iterdir())


# ----- 9. full disks: checked writes -------------------------------------------------------------
@pytest.mark.parametrize("what", ["image", "label"])  # crops go through the same write_image
def test_full_disk_during_detect_is_one_line_and_keeps_earlier_results(tmp_path, yolov5n_weights, images_dir, capsys,
                                                                        what):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full (a device whose writes fail with ENOSPC) is Linux-only")
    src = tmp_path / "src"
    src.mkdir()
    for f in ("bus.jpg", "zidane.jpg"):
        shutil.copy(images_dir / f, src / f)
    run = tmp_path / "p" / "exp"
    (run / "labels").mkdir(parents=True)
    target = {"image": run / "zidane.jpg", "label": run / "labels" / "zidane.txt"}[what]
    os.symlink("/dev/full", target)  # the second image's output lands on a full disk
    line = fails_cleanly(detect.main, ["--weights", str(yolov5n_weights), "--source", str(src), "--img", "320",
                                       "--project", str(tmp_path / "p"), "--name", "exp", "--exist-ok",
                                       "--save-txt", "--save-crop"], capsys)
    assert "disk is full" in line and "zidane" in line
    assert (run / "bus.jpg").stat().st_size > 0 and (run / "labels" / "bus.txt").stat().st_size > 0  # kept


@pytest.mark.slow
def test_full_disk_during_training_is_one_line(tmp_path, coco8_copy):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = subprocess.run([sys.executable, "train.py", "--cfg", "yolov5n.yaml", "--data", str(coco8_copy),
                            "--epochs", "1", "--project", str(mnt), "--name", "x", *FAST],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
        assert len(errors) == 1 and "disk is full" in errors[0], r.stderr[-3000:]
        assert (mnt / "x" / "opt.yaml").is_file()  # what was written before is kept
    finally:
        subprocess.run(["umount", str(mnt)])


# ----- 6. --resume after the dataset's classes changed -------------------------------------------
@pytest.mark.slow
def test_resume_after_dataset_nc_changed_is_one_line(tmp_path, coco8_copy, capsys):
    train.main(["--cfg", "yolov5n.yaml", "--data", str(coco8_copy), "--epochs", "2", "--project", str(tmp_path),
                "--name", "r", *FAST])
    last = tmp_path / "r" / "weights" / "last.pt"
    ck = torch.load(last, weights_only=True)
    ck["epoch"] = 0  # as if killed after the first of two epochs
    atomic_save(ck, last)
    spec = yaml.safe_load(coco8_copy.read_text())
    changed = dict(spec, names={i: f"c{i}" for i in range(5)})
    coco8_copy.write_text(yaml.safe_dump(changed))
    try:
        before = sorted(p.name for p in (tmp_path / "r").iterdir())
        line = fails_cleanly(train.main, ["--resume", str(last), "--device", "cpu"], capsys)
        assert "nc=80" in line and "nc=5" in line
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
        assert torch.load(last, weights_only=True)["epoch"] == 0  # the checkpoint is untouched
    finally:
        coco8_copy.write_text(yaml.safe_dump(spec))


# ----- 8. bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,limit", [({"depth_multiple": 3000}, "YOLOV5_MAX_MULTIPLE"),
                                        ({"width_multiple": 3.9}, "YOLOV5_MAX_PARAMS"),
                                        ({"nc": 10**7}, "YOLOV5_MAX_CHANNELS")])
def test_tiny_checkpoint_asking_for_a_huge_model_is_one_line(tmp_path, yolov5n_weights, images_dir, capsys, edit,
                                                             limit, monkeypatch):
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg.update(edit)
    cfg["backbone"][-1][3][0] = 16384  # the widest layer the channel limit lets through
    tiny = {"format": FORMAT, "version": 1, "cfg": cfg, "names": {0: "a"}, "stride": [8.0, 16.0, 32.0], "model": {}}
    w = tmp_path / "tiny.pt"
    torch.save(tiny, w)
    assert w.stat().st_size < 4000
    monkeypatch.setenv("YOLOV5_MAX_PARAMS", "200e6")  # a model over this is refused before it is allocated
    line = fails_cleanly(detect.main, ["--weights", str(w), "--source", str(images_dir / "bus.jpg"),
                                       "--project", str(tmp_path)], capsys)
    assert limit in line and "limit" in line


def test_zip_bomb_is_refused_before_unpacking(tmp_path):
    from utils.data_config import download

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.bin", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(120):
            f.write(chunk)
    assert bomb.stat().st_size < 1e6
    dest = tmp_path / "datasets"
    with pytest.raises(UserError, match="YOLOV5_MAX_UNZIP_RATIO"):
        download([bomb.as_uri()], dest, unzip=True, delete=False)
    assert not (dest / "zeros.bin").exists()


# ----- 10. streams, concurrent runs, YOLOv5's download form --------------------------------------
class _StallingCapture:
    """A camera that sends 3 frames, then hangs in grab() as a stalled MJPEG stream does."""

    def __init__(self, *a):
        self.n = 0
        self.release_event = threading.Event()

    def isOpened(self):
        return not self.release_event.is_set()

    def get(self, prop):
        return 25.0 if prop == 5 else 0  # CAP_PROP_FPS

    def read(self):
        return True, np.full((64, 96, 3), 7, np.uint8)

    def grab(self):
        self.n += 1
        if self.n > 3:
            self.release_event.wait(30)  # no more data
        return True

    def retrieve(self):
        return True, np.full((64, 96, 3), self.n, np.uint8)

    def release(self):
        self.release_event.set()


def test_stalled_stream_ends_with_one_line_without_repeating_frames(monkeypatch, capsys):
    import utils.sources as sources

    monkeypatch.setattr(sources.cv2, "VideoCapture", _StallingCapture)
    ds = sources.LoadStreams("rtsp://camera/stream", img_size=64, stride=32, timeout=0.5)
    t = time.monotonic()
    frames = [im0[0][0, 0, 0] for _, _, im0, _, _ in ds]
    assert time.monotonic() - t < 10
    assert len(frames) == len(set(frames)) <= 4  # each frame handed out once, the stall not re-processed
    out = capsys.readouterr().out
    assert out.count("sent no new frame") == 1


def test_second_live_run_into_the_same_folder_is_refused(tmp_path, yolov5n_weights, images_dir, capsys):
    run = tmp_path / "p" / "same"
    run.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".run.lock").write_text(str(other.pid))  # a live run owns the folder
        argv = ["--weights", str(yolov5n_weights), "--source", str(images_dir / "bus.jpg"), "--img", "320",
                "--project", str(tmp_path / "p"), "--name", "same", "--exist-ok"]
        line = fails_cleanly(detect.main, argv, capsys)
        assert f"pid {other.pid}" in line
        assert not (run / "bus.jpg").exists()
    finally:
        other.kill()
        other.wait()
    detect.main(argv)  # the owner is gone: its stale lock is taken over
    assert (run / "bus.jpg").is_file()


def test_yolov5_bash_dash_c_download_form_runs(tmp_path):
    from utils.data_config import run_download_step

    marker = tmp_path / "from_bash_c"
    run_download_step(f"bash -c 'touch {marker}'", {"path": str(tmp_path / "ds")})
    assert marker.exists()


# ----- 11. activation: in a model config ---------------------------------------------------------
def _acts(m: nn.Module) -> set[str]:
    return {type(x).__name__ for x in m.modules() if isinstance(x, (nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish))}


def test_activation_key_builds_that_activation_and_does_not_leak():
    from models.yolo import DetectionModel

    cfg = yaml.safe_load((ROOT / "models" / "yolov5n-spd.yaml").read_text())
    relu = DetectionModel(dict(cfg, activation="nn.ReLU()"), verbose=False)
    assert _acts(relu) == {"ReLU"}
    leaky = DetectionModel(dict(cfg, activation="nn.LeakyReLU(0.1)"), verbose=False)
    assert _acts(leaky) == {"LeakyReLU"} and all(m.negative_slope == 0.1 for m in leaky.modules()
                                                 if isinstance(m, nn.LeakyReLU))
    assert _acts(DetectionModel(cfg, verbose=False)) == {"SiLU"}  # the next model is not affected


def test_activation_survives_a_checkpoint_round_trip(tmp_path):
    from models.yolo import DetectionModel

    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    model = DetectionModel(dict(cfg, activation="nn.LeakyReLU(0.1)"), verbose=False).eval()
    w = tmp_path / "leaky.pt"
    atomic_save(make_checkpoint(model, half=False), w)
    back = load_model(w, fuse=False)
    x = torch.rand(1, 3, 128, 128)
    assert _acts(back) == {"LeakyReLU"}
    with torch.no_grad():
        assert torch.allclose(model(x)[0], back(x)[0], atol=1e-4)
