"""Checkpoint loading: official YOLOv5 pickles, this project's own format, and hostile files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_model, read_checkpoint, safe_load
from models.yolo import Model
from utils.checkpoints import atomic_save, make_checkpoint, resolve_weights
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class _Evil:
    """Pickles to a call of os.system: what a hostile checkpoint would contain."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def plant_evil_checkpoint(path: Path, marker: Path) -> None:
    model = Model("yolov5n.yaml", verbose=False)
    torch.save({"model": model.state_dict(), "payload": _Evil(f"touch {marker}")}, path,
               _use_new_zipfile_serialization=True)


def test_official_checkpoint_loads_with_identical_keys(yolov5n_weights):
    info = read_checkpoint(yolov5n_weights)
    assert info["official"]
    fresh = Model(info["cfg"], verbose=False)
    assert list(fresh.state_dict()) == list(info["state_dict"])
    assert info["names"][0] == "person" and len(info["names"]) == 80
    model = load_model(yolov5n_weights, fuse=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, info["state_dict"][k].to(v.dtype))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    plant_evil_checkpoint(bad, marker)
    with pytest.raises(UserError, match="system"):
        load_model(bad)
    assert not marker.exists()


@pytest.mark.slow
def test_hostile_pickle_refused_by_cli_without_traceback(tmp_path, images_dir):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    plant_evil_checkpoint(bad, marker)
    r = subprocess.run([sys.executable, "detect.py", "--weights", str(bad), "--source", str(images_dir / "bus.jpg"),
                        "--project", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "refusing to load" in r.stderr
    assert not marker.exists()


def test_own_checkpoint_is_plain_data(tmp_path):
    model = Model("yolov5n-spd.yaml", nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    path = tmp_path / "own.pt"
    atomic_save(make_checkpoint(model, epoch=4, best_fitness=0.5), path)
    raw = torch.load(path, weights_only=True)  # no allow-list needed: tensors and plain values only
    assert raw["epoch"] == 4 and raw["names"] == {0: "a", 1: "b", 2: "c"}
    loaded = load_model(path, fuse=False)
    assert loaded.names[2] == "c"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model.half().float().eval()(x)[0], atol=1e-3, rtol=1e-3)
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_weights(tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        safe_load(junk)


def test_missing_official_weights_offline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import io
    import urllib.error
    import urllib.request

    from utils.checkpoints import resolve_weights

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    class CutOff(io.BytesIO):  # the connection drops after the first megabyte
        headers = {"Content-Length": str(4 << 20)}

        def __init__(self):
            super().__init__(b"x" * (1 << 20))
            self.calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection reset by peer")
            return super().read(n)

    target = tmp_path / "yolov5s.pt"
    for fake in (offline, lambda *a, **k: CutOff()):
        monkeypatch.setattr(urllib.request, "urlopen", fake)
        with pytest.raises(UserError) as e:
            resolve_weights(target)
        msg = str(e.value)
        assert "\n" not in msg and "could not download" in msg and str(target.resolve()) in msg
        assert not list(tmp_path.iterdir())  # neither the weights nor a half-written .part are left behind
