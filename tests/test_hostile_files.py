"""Hostile and broken files: TorchScript code, class names used as paths, images that make decoders
raise, and the JPEG integrity check. Each attack either leaves a marker file that must never appear,
or must end in one `ERROR:` line and a non-zero exit, through every tool that opens that kind of file.
(Hostile pickles are in tests/test_hostile_pickles.py.)
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
import export
import val
from classify import predict as cls_predict
from classify import train as cls_train
from classify import val as cls_val
from models.backends import DetectMultiBackend
from models.checkpoints import load_model
from tests import faults
from tests.conftest import shared_path
from tests.faults import onnx_with_metadata
from utils.checkpoints import atomic_save, make_checkpoint
from utils.labels import verify_image_label
from utils.errors import UserError
from utils.files import safe_name
from utils.sources import check_jpeg, read_image

ROOT = Path(__file__).resolve().parents[1]


# ----- 1. TorchScript runs the archive's own code when loaded ------------------------------------
class _FileWriter(torch.nn.Module):
    """Scripted __setstate__ that creates (and could overwrite) a file: what torch.jit.load runs."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.buf = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.buf = torch.from_file(state[0], True, 16)  # shared=True: creates the file, writes 64 bytes


def hostile_torchscript(path: Path, marker: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.script(_FileWriter(str(marker)))
        meta = {"stride": 32, "names": {"0": "person"}, "nc": 1, "dynamic": True}
        m.save(str(path), _extra_files={"config.txt": json.dumps(meta)})
    return path


@pytest.fixture
def evil_ts(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER_torchscript_ran"
    return hostile_torchscript(tmp_path / "best.torchscript", marker), marker


def test_the_torchscript_payload_is_real_when_trusted(evil_ts):
    """Control: the payload does write a file once a user vouches for it, so the refusals below matter."""
    w, marker = evil_ts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DetectMultiBackend(w, trust_weights=True)
    assert marker.exists()


def test_hostile_torchscript_runs_nothing_in_any_tool(evil_ts, tmp_path, images_dir):
    w, marker = evil_ts
    coco8 = shared_path("data", "coco8", "coco8.yaml")
    calls = {
        "DetectMultiBackend": lambda: DetectMultiBackend(w),
        "detect.py": lambda: detect.run(weights=w, source=images_dir / "bus.jpg", project=tmp_path / "d", verbose=False),
        "val.py": lambda: val.run(data=coco8, weights=w, device="cpu", project=tmp_path / "v"),
        "torch.hub": lambda: torch.hub.load(str(ROOT), "custom", path=str(w), source="local", _verbose=False),
        "torch.hub raw": lambda: torch.hub.load(str(ROOT), "custom", path=str(w), source="local", autoshape=False),
        "export.py": lambda: export.run(weights=w, imgsz=[64], include=["onnx"]),
    }
    for tool, call in calls.items():
        with pytest.raises(UserError) as e:
            call()
        assert not marker.exists(), f"{tool} ran the TorchScript file's code"
        msg = str(e.value)
        assert ("TorchScript" in msg and "--trust-weights" in msg) or "export reads PyTorch .pt" in msg, (tool, msg)


@pytest.mark.slow
def test_hostile_torchscript_from_the_shell_is_one_line(evil_ts, tmp_path, images_dir):
    w, marker = evil_ts
    for script in ("detect.py", "val.py"):
        r = subprocess.run(_cli_args(script, w, images_dir, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and not marker.exists(), r.stderr[-2000:]
        assert "Traceback" not in r.stderr and r.stderr.count("ERROR:") == 1, r.stderr[-2000:]


def _cli_args(script: str, w: Path, images_dir: Path, tmp_path: Path) -> list[str]:
    common = [sys.executable, script, "--weights", str(w), "--device", "cpu", "--project", str(tmp_path)]
    if script == "detect.py":
        return common + ["--source", str(images_dir / "bus.jpg")]
    return common + ["--data", str(shared_path("data", "coco8", "coco8.yaml"))]


# ----- 2. class names from weights are data, not paths -------------------------------------------
def traversal_names(tmp_path: Path, n: int = 80) -> dict[int, str]:
    """Every class name tries to leave the run folder: relative climbs, absolute paths, dot names."""
    kinds = ["../../../../escaped/rel{i}", str(tmp_path / "escaped_abs" / "abs{i}"), "..", ".", "x/../../../escaped/y{i}",
             "..\\..\\escaped\\win{i}"]
    return {i: kinds[i % len(kinds)].format(i=i) for i in range(n)}


def files_outside(root: Path, inside: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and inside not in p.parents}


def test_safe_name_keeps_one_path_component():
    for bad in ("../../x", "/abs/x", "..", ".", "", "a\\..\\b", "C:\\x", "a\x00b", "\n"):
        s = safe_name(bad)
        assert s and "/" not in s and "\\" not in s and "\x00" not in s and s not in (".", "..") and not s.startswith(".")
    assert safe_name("traffic light") == "traffic light" and safe_name("person") == "person"


def _check_crops_stay_inside(weights: Path, tmp_path: Path, images_dir: Path) -> None:
    before = files_outside(tmp_path, tmp_path / "proj")
    out = detect.run(weights=weights, source=images_dir / "bus.jpg", imgsz=(320, 320), save_crop=True, save_txt=True,
                     project=tmp_path / "proj" / "a" / "b", name="exp", verbose=False)
    save_dir = out["save_dir"]
    assert sum(len(d) for _, d in out["results"]) > 0  # there were crops to write
    crops = list((save_dir / "crops").rglob("*.jpg"))
    assert crops and all(save_dir in c.parents for c in crops)
    assert files_outside(tmp_path, save_dir) == before  # nothing new anywhere else under tmp_path
    assert not (tmp_path / "escaped_abs").exists() and not list(tmp_path.rglob("escaped*"))


def test_traversal_class_names_in_a_pt_write_nothing_outside_the_run(tmp_path, yolov5n_weights, images_dir):
    model = load_model(yolov5n_weights, fuse=False)
    model.names = traversal_names(tmp_path)
    w = tmp_path / "named.pt"
    atomic_save(make_checkpoint(model), w)
    _check_crops_stay_inside(w, tmp_path, images_dir)
    # the torch.hub front end saves crops too
    hub = torch.hub.load(str(ROOT), "custom", path=str(w), source="local", _verbose=False)
    r = hub(str(images_dir / "bus.jpg"), size=320)
    r.crop(save_dir=tmp_path / "proj" / "hub")
    r.save(save_dir=tmp_path / "proj" / "hub_save")
    assert not list(tmp_path.rglob("escaped*"))
    assert list((tmp_path / "proj" / "hub" / "crops").rglob("*.jpg"))


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    w = shared_path("weights", "yolov5n.pt")
    d = tmp_path_factory.mktemp("onnx")
    return export.run(weights=shutil.copy(w, d / "yolov5n.pt"), imgsz=[320], include=["onnx"], dynamic=True)["onnx"]


def test_traversal_class_names_in_onnx_metadata_write_nothing_outside_the_run(tmp_path, onnx_export, images_dir):
    names = traversal_names(tmp_path)
    w = onnx_with_metadata(onnx_export, tmp_path / "named.onnx", names=json.dumps({str(k): v for k, v in names.items()}))
    _check_crops_stay_inside(w, tmp_path, images_dir)


# ----- 3. one bad image never stops a run ---------------------------------------------------------
def png_declaring(path: Path, w: int = 100000, h: int = 100000) -> Path:
    """A tiny valid-looking PNG whose header declares w x h pixels: cv2.imread raises on it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def strip_png(path: Path, h: int = 20, w: int = 20000) -> Path:
    """A valid image so wide that letterboxing it rounds its height to zero pixels."""
    im = np.full((h, w, 3), 90, np.uint8)
    im[:, ::50] = 200
    assert cv2.imwrite(str(path), im)
    return path


def test_the_bad_images_really_break_the_plain_decoders(tmp_path):
    with pytest.raises(cv2.error):
        cv2.imread(str(png_declaring(tmp_path / "huge.png")))
    im = cv2.imread(str(strip_png(tmp_path / "strip.png")))
    r = 320 / max(im.shape[:2])
    assert round(im.shape[0] * r) == 0  # what made cv2.resize raise in letterbox


def test_detect_skips_decoder_errors_and_degenerate_shapes_once(tmp_path, yolov5n_weights, images_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("bus.jpg", "zidane.jpg"):
        shutil.copy(images_dir / f, src / f)
    strip = strip_png(src / "strip.png")  # valid: letterboxed to at least one pixel per side, so used
    bad = [png_declaring(src / "huge.png")]
    os.symlink(tmp_path / "gone.jpg", src / "dangling.jpg")  # broken links are counted, not dropped
    bad.append(src / "dangling.jpg")
    out = detect.run(weights=yolov5n_weights, source=src, imgsz=(320, 320), project=tmp_path, save_txt=True)
    printed = capsys.readouterr().out
    assert sorted(Path(p).name for p, _ in out["results"]) == ["bus.jpg", "strip.png", "zidane.jpg"]
    for f in bad:
        assert printed.count(f"skipping {f}") == 1, printed
    assert "broken symbolic link" in printed and "decoder refused" in printed
    assert "2 of 5 files skipped" in printed and f"skipping {strip}" not in printed and "32x320" in printed
    assert {p.name for p in out["save_dir"].iterdir() if p.suffix in (".jpg", ".png")} == {"bus.jpg", "zidane.jpg", "strip.png"}


def test_read_image_reports_instead_of_raising(tmp_path):
    im, why = read_image(str(png_declaring(tmp_path / "huge.png")))
    assert im is None and "decoder refused" in why


@pytest.fixture(scope="module")
def cls_data_with_bad_images(tmp_path_factory):
    shared_path("data", "cifar10")
    root, planted = faults.classification_faults(tmp_path_factory.mktemp("clsbad") / "data", per_class=2)
    bad = {}
    for split in ("train", "test"):
        d = root / split / "cat"
        bad[split] = [str(png_declaring(d / f"huge_{split}.png")), str(strip_png(d / f"strip_{split}.png", 20, 20000))]
    return root, planted, bad


def test_classify_tools_skip_decoder_errors_and_degenerate_shapes_once(cls_data_with_bad_images, tmp_path, capsys):
    root, planted, bad = cls_data_with_bad_images
    out = cls_train.main(["--model", "resnet18", "--cutoff", "1", "--data", str(root), "--epochs", "2",
                          "--batch-size", "4", "--imgsz", "32", "--workers", "0", "--device", "cpu",
                          "--project", str(tmp_path), "--name", "t"])
    err = capsys.readouterr().err
    for split in ("train", "test"):
        huge, strip = bad[split]
        assert err.count(huge) == 1, (huge, err)  # reported once over both epochs
        assert strip not in err  # valid, only extreme: its centre square is used
    res = cls_val.run(out["best"], root, workers=0, device="cpu")
    err = capsys.readouterr().err
    assert err.count(bad["test"][0]) == 1
    n_test = len(planted["test"].good) + len(planted["test"].usable)
    assert res.n >= n_test
    results = cls_predict.run(out["best"], root / "train" / "cat", device="cpu", imgsz=32)
    printed = capsys.readouterr()
    got = {Path(p).name for p, _ in results}
    assert "huge_train.png" not in got and printed.out.count(f"skipping {bad['train'][0]}") == 1
    good = {Path(f).name for f in planted["train"].good + planted["train"].usable if "/cat/" in f}
    assert good | {"strip_train.png"} <= got


# ----- 4. JPEG integrity -------------------------------------------------------------------------
def _photo(flat_band: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    im = cv2.GaussianBlur((rng.random((240, 320, 3)) * 255).astype(np.uint8), (9, 9), 3)
    if flat_band:
        im[-64:] = 128  # a flat bottom band: what the old heuristic took for a truncated file
    return im


def _jpeg(progressive: bool, flat_band: bool = True) -> bytes:
    b = io.BytesIO()
    Image.fromarray(_photo(flat_band)).save(b, "JPEG", quality=90, progressive=progressive)
    return b.getvalue()


def _classify(tmp_path: Path, data: bytes) -> tuple[bool, bool, bool]:
    """(check_jpeg, read_image, dataset scan) verdicts on one file: True = used."""
    f = tmp_path / "images" / "x.jpg"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return check_jpeg(str(f))[0], read_image(str(f))[0] is not None, verify_image_label(str(f), str(tmp_path / "none.txt")).nc == 0


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("cut", [0.1, 0.3, 0.5, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("eoi", [False, True], ids=["cut", "cut+FFD9"])
def test_truncated_jpegs_are_refused(tmp_path, progressive, cut, eoi):
    d = _jpeg(progressive)
    data = d[: int(len(d) * cut)] + (b"\xff\xd9" if eoi else b"")
    assert _classify(tmp_path, data) == (False, False, False)


def test_progressive_jpeg_cut_between_scans_is_refused(tmp_path):
    d = _jpeg(True)
    sos = [i for i in range(len(d) - 1) if d[i] == 0xFF and d[i + 1] == 0xDA]
    assert len(sos) > 3
    for s in sos[1:]:  # a clean cut at a scan boundary decodes without any decoder warning
        assert _classify(tmp_path, d[:s] + b"\xff\xd9") == (False, False, False), s


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("variant", ["complete", "trailing-bytes", "no-end-marker", "no-marker-no-band"])
def test_complete_jpegs_are_kept(tmp_path, progressive, variant):
    d = _jpeg(progressive, flat_band=variant != "no-marker-no-band")
    data = {"complete": d, "trailing-bytes": d + b"\x00garbage after the image" * 3,
            "no-end-marker": d[:-2], "no-marker-no-band": d[:-2]}[variant]
    assert _classify(tmp_path, data) == (True, True, True)


def test_every_shared_jpeg_passes_the_check():
    files = sorted(shared_path("images").glob("*.jpg")) + sorted(shared_path("data", "coco8").rglob("*.jpg"))
    assert files and all(check_jpeg(str(f))[0] for f in files)
