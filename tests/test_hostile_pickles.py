"""Hostile .pt files that would really run code if the checkpoint allow-list were weaker.

torch's weights-only unpickler refuses `os.system` whatever the allow-list says (its module is
block-listed), so a test built on it cannot see an allow-list regression. Every payload here instead
reaches code through globals that torch *would* accept if they were allow-listed: builtins.eval/exec,
getattr chains (also through the allowed class models.common.Conv), functools.partial, importlib and a
torch-internal exec, with torch's own allowed `_rebuild_from_type_v2` doing the call where the payload
needs one; plus a real yolov5n.pt whose data.pkl was tampered with.

Each payload is checked twice: under `_official_allow_list() + <the globals it needs>` it does create its
marker file (so it is live), and under the real allow-list every tool that opens weights refuses it with
one error and the marker never appears.
"""
from __future__ import annotations

import builtins
import functools
import importlib
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import torch.fx.graph_module as fx_graph_module
import yaml

from models import checkpoints
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OFFICIAL = SHARED / "weights" / "yolov5n.pt"


# ------------------------------------------------------------------ pickle opcodes written by hand
def g(module: str, name: str) -> bytes:
    """GLOBAL: push module.name (what the allow-list decides on)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE: push a str."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via MARK ... TUPLE REDUCE: torch only calls allow-listed objects this way."""
    return func + b"(" + b"".join(args) + b"tR"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


GETATTR = g("builtins", "getattr")
REBUILD = g("torch._tensor", "_rebuild_from_type_v2")  # allowed by torch itself; calls func(*args)
TENSOR = g("torch", "Tensor")


def attr(obj: bytes, name: str) -> bytes:
    return call(GETATTR, obj, s(name))


def rebuild_call(func: bytes, new_type: bytes, *args: bytes) -> bytes:
    """Have torch's allowed _rebuild_from_type_v2 call an object that is not itself allow-listed."""
    return call(REBUILD, func, new_type, tup(*args), b"}")


def touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def payloads(marker: Path) -> dict[str, tuple[bytes, list]]:
    """name -> (pickled object, the extra allow-list entries under which it runs)."""
    code = touch_code(marker)
    builtin_fn_type = attr(GETATTR, "__class__")  # type(getattr): builtin_function_or_method
    exec_via_builtins_module = attr(attr(GETATTR, "__self__"), "exec")  # getattr.__self__ is builtins
    # through an allowed class: Conv.__init__.__builtins__.get('exec')
    conv_builtins = attr(attr(g("models.common", "Conv"), "__init__"), "__builtins__")
    exec_via_conv = rebuild_call(attr(conv_builtins, "get"), builtin_fn_type, s("exec"))
    os_module = call(g("importlib", "import_module"), s("os"))
    return {
        "eval": (call(g("builtins", "eval"), s(code)), [builtins.eval]),
        "exec": (call(g("builtins", "exec"), s(code)), [builtins.exec]),
        "getattr-chain": (rebuild_call(exec_via_builtins_module, TENSOR, s(code)), [builtins.getattr]),
        "getattr-through-Conv": (rebuild_call(exec_via_conv, TENSOR, s(code)), [builtins.getattr]),
        "functools.partial": (
            rebuild_call(call(g("functools", "partial"), exec_via_builtins_module, s(code)), TENSOR),
            [functools.partial, builtins.getattr],
        ),
        "importlib": (
            rebuild_call(attr(os_module, "system"), TENSOR, s(f"touch {marker}")),
            [importlib.import_module, builtins.getattr],
        ),
        "torch-internal-exec": (
            call(g("torch.fx.graph_module", "_exec_with_source"), s(code), b"}"),
            [fx_graph_module._exec_with_source],
        ),
    }


def write_pt(path: Path, data_pkl: bytes, template: Path) -> Path:
    """A torch zip checkpoint: `template`'s archive with its data.pkl replaced."""
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, body)
    return path


def dict_with(key: str, obj: bytes) -> bytes:
    """Protocol-2 pickle of {'model': 0, key: obj}."""
    return b"\x80\x02}" + s("model") + b"K\x00s" + s(key) + obj + b"s."


def tamper_official(dst: Path, obj: bytes) -> Path:
    """A copy of the real yolov5n.pt whose data.pkl also sets ckpt['x'] = obj (appended before STOP)."""
    with zipfile.ZipFile(OFFICIAL) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        orig = z.read(name)
    assert orig.endswith(b".")
    return write_pt(dst, orig[:-1] + s("x") + obj + b"s.", OFFICIAL)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tpl") / "plain.pt"
    torch.save({"model": 0}, p)
    return p


def hostile_files(tmp: Path, template: Path) -> list[tuple[str, Path, Path, list]]:
    """(name, file, marker, extra globals) for every payload, plus the tampered official file."""
    out = []
    for name, (obj, extra) in payloads(tmp / "marker-x").items():
        marker = tmp / f"marker-{name}"
        obj = payloads(marker)[name][0]
        out.append((name, write_pt(tmp / f"{name}.pt", dict_with("payload", obj), template), marker, extra))
    marker = tmp / "marker-tampered"
    if OFFICIAL.is_file():
        out.append(("tampered-yolov5n.pt", tamper_official(tmp / "yolov5n.pt", payloads(marker)["eval"][0]), marker,
                    [builtins.eval]))
    return out


# ------------------------------------------------------------------ the payloads are live
def test_each_payload_runs_when_its_globals_are_allowed(tmp_path, template, monkeypatch):
    """Positive control: with the extra globals allowed the marker appears, so the tests below would see
    an allow-list that let any of them in."""
    real = checkpoints._official_allow_list
    files = hostile_files(tmp_path, template)
    assert len(files) == 8 or not OFFICIAL.is_file()
    for name, path, marker, extra in files:
        monkeypatch.setattr(checkpoints, "_official_allow_list", lambda extra=extra: real() + extra)
        try:
            checkpoints.safe_load(path)
        except (UserError, Exception):  # noqa: BLE001 - several payloads raise after their code ran
            pass
        assert marker.exists(), f"{name}: payload did not run even with {extra} allowed"
    if OFFICIAL.is_file():  # the tampered file still is the real model
        monkeypatch.setattr(checkpoints, "_official_allow_list", lambda: real() + [builtins.eval])
        info = checkpoints.read_checkpoint(tmp_path / "yolov5n.pt")
        assert info["official"] and len(info["names"]) == 80


def test_allow_list_refuses_every_payload(tmp_path, template):
    for name, path, marker, _ in hostile_files(tmp_path, template):
        with pytest.raises(UserError, match="refusing to load"):
            checkpoints.safe_load(path)
        assert not marker.exists(), name


# ------------------------------------------------------------------ through every tool that opens weights
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A copy of coco8 (train = val) outside ../shared, so nothing is ever written there."""
    src = SHARED / "data" / "coco8"
    if not src.is_dir():
        pytest.skip("../shared/data/coco8 not present")
    root = tmp_path_factory.mktemp("coco8")
    shutil.copytree(src / "images", root / "images")
    shutil.copytree(src / "labels", root / "labels")
    names = yaml.safe_load((src / "coco8.yaml").read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "names": names}))
    return root


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> Path:
    src = SHARED / "data" / "cifar10"
    if not src.is_dir():
        pytest.skip("../shared/data/cifar10 not present")
    root = tmp_path_factory.mktemp("cls")
    for split in ("train", "test"):
        for c in ("airplane", "cat"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((src / split / c).iterdir())[:2]:
                shutil.copy(f, root / split / c / f.name)
    return root


def tools(weights: Path, tmp: Path, data: Path, cls: Path) -> dict:
    """name -> zero-argument call that opens `weights` the way the tool does."""
    import detect
    import export
    import hubconf
    import train
    import val
    from classify import predict as cls_predict
    from classify import train as cls_train
    from classify import val as cls_val
    from models import spd

    image = SHARED / "images" / "bus.jpg"
    yaml_file = str(data / "data.yaml")
    common = ["--device", "cpu", "--workers", "0"]
    return {
        "train --weights": lambda: train.main(["--weights", str(weights), "--data", yaml_file, "--epochs", "1",
                                                "--img", "64", "--project", str(tmp), *common]),
        "train --resume": lambda: train.main(["--resume", str(weights), *common]),
        "val": lambda: val.main(["--weights", str(weights), "--data", yaml_file, "--img", "64", *common,
                                 "--project", str(tmp)]),
        "detect": lambda: detect.main(["--weights", str(weights), "--source", str(image), "--project", str(tmp)]),
        "export": lambda: export.main(["--weights", str(weights), "--include", "torchscript"]),
        "hubconf.custom": lambda: hubconf.custom(path=str(weights), _verbose=False),
        "models.spd convert": lambda: spd.main(["convert", "--weights", str(weights), "--cfg", "yolov5n-spd.yaml",
                                                "--out", str(tmp / "out.pt")]),
        "classify/train --pretrained": lambda: cls_train.main(["--model", "resnet18", "--data", str(cls), "--epochs",
                                                               "1", "--pretrained", str(weights), "--workers", "0",
                                                               "--project", str(tmp)]),
        "classify/val": lambda: cls_val.main(["--weights", str(weights), "--data", str(cls)]),
        "classify/predict": lambda: cls_predict.main(["--weights", str(weights), "--source", str(image),
                                                      "--nosave"]),
    }


def test_every_tool_refuses_every_payload(tmp_path, template, small_data, cls_data, capsys):
    files = hostile_files(tmp_path, template)
    for name, path, marker, _ in files:
        for tool, run in tools(path, tmp_path / "runs", small_data, cls_data).items():
            with pytest.raises((SystemExit, UserError)) as e:
                run()
            if e.type is SystemExit:
                assert e.value.code not in (0, None), f"{tool} / {name}"
                err = capsys.readouterr().err
                assert "refusing to load" in err and "Traceback" not in err, f"{tool} / {name}: {err[-500:]}"
            else:
                assert "refusing to load" in str(e.value), f"{tool} / {name}"
            assert not marker.exists(), f"{tool} ran the {name} payload"
    assert not list(tmp_path.glob("marker-*"))
