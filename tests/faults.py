"""Planted-fault datasets for the reliability suite, always built in a temporary folder.

`detection_faults(root)` copies ../shared/data/coco8 and plants, in both splits, every kind of bad
input a scraper or an annotation tool produces; `classification_faults(root)` does the same for a
tiny CIFAR-10 ImageFolder. Each returns a `Planted` record saying which files must be skipped,
which must be used as is, and which must be used with label rows dropped, so tests compare the
tools' reports against it.
"""
from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO8 = SHARED / "data" / "coco8"
CIFAR = SHARED / "data" / "cifar10"
EXIF_ORIENTATION = 0x0112


class _RunsCode:
    """Pickles to a call of os.system: what a hostile checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt that looks like a checkpoint but runs `touch marker` when unpickled by plain torch.load."""
    import torch

    payload = {"format": "yolov5-spd-checkpoint", "model": {"model.0.conv.weight": torch.zeros(16, 3, 6, 6)},
               "epoch": 0, "opt": {}, "state_dict": {}, "hook": _RunsCode(f"touch {marker}")}
    torch.save(payload, path)
    return path


def typo_yamls(root: Path) -> dict[str, Path]:
    """A dataset yaml, a hyperparameter yaml and a model config, each with one misspelt key."""
    root.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((COCO8 / "coco8.yaml").read_text())
    data["path"] = str(COCO8)
    data["trian"] = data.pop("train")
    hyp = yaml.safe_load((REPO / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp["lr_0"] = hyp.pop("lr0")
    cfg = yaml.safe_load((REPO / "models" / "yolov5n.yaml").read_text())
    cfg["bakbone"] = cfg.pop("backbone")
    out = {}
    for name, d in (("data", data), ("hyp", hyp), ("cfg", cfg)):
        out[name] = root / f"typo_{name}.yaml"
        out[name].write_text(yaml.safe_dump(d, sort_keys=False))
    return out


@dataclass
class Planted:
    """What was planted in one split: file paths (str) grouped by how a correct tool must treat them."""

    images: Path  # the split's image folder
    corrupt: list[str] = field(default_factory=list)  # must be skipped, reported once each
    usable: list[str] = field(default_factory=list)  # odd but valid: must be used, not reported
    trimmed: list[str] = field(default_factory=list)  # used, with bad label rows dropped and reported once
    good: list[str] = field(default_factory=list)  # the untouched originals
    orphan_labels: list[str] = field(default_factory=list)  # label files without an image

    @property
    def kept(self) -> list[str]:
        return sorted(self.good + self.usable + self.trimmed)

    @property
    def reported(self) -> list[str]:
        return sorted(self.corrupt + self.trimmed)


def _writable_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:  # the shared copy is read-only; ours must not be
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def exif_rotated_jpeg(original: Path, out: Path) -> None:
    """Store the pixels turned 90 degrees with EXIF orientation 6, so viewers show the original."""
    rgb = Image.open(original).convert("RGB")
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # orientation 6 means: turn 90 clockwise to view
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(out, quality=95, exif=exif.tobytes())


def cmyk_jpeg(original: Path, out: Path) -> None:
    Image.open(original).convert("CMYK").save(out, quality=95)


def gray_png(original: Path, out: Path) -> None:
    cv2.imwrite(str(out), cv2.imread(str(original), cv2.IMREAD_GRAYSCALE))


def png16(original: Path, out: Path) -> None:
    """A 16-bit colour PNG holding the same picture (8-bit values scaled by 257)."""
    cv2.imwrite(str(out), cv2.imread(str(original)).astype(np.uint16) * 257)


def _plant_split(root: Path, split: str, tag: str) -> Planted:
    """Plant the faults into images/<split> and labels/<split> of a coco8 copy."""
    img_dir, lb_dir = root / "images" / split, root / "labels" / split
    good = sorted(img_dir.glob("*.jpg"))
    src = good[0]
    src_label = (lb_dir / f"{src.stem}.txt").read_text()
    data = src.read_bytes()
    pl = Planted(images=img_dir, good=[str(p) for p in good])

    def add(kind: str, name: str, label: str | None, writer) -> None:
        f = img_dir / f"{tag}_{name}"
        writer(f)
        if label is not None:
            (lb_dir / f"{f.stem}.txt").write_text(label)
        getattr(pl, kind).append(str(f))

    # unreadable images
    add("corrupt", "truncated.jpg", src_label, lambda f: f.write_bytes(data[: len(data) // 2]))
    add("corrupt", "zerobyte.jpg", src_label, lambda f: f.write_bytes(b""))
    add("corrupt", "textfile.jpg", src_label, lambda f: f.write_text("<html>404 Not Found</html>\n"))
    # bad label files (image fine)
    add("corrupt", "fourcols.jpg", "0 0.5 0.5 0.2\n", lambda f: f.write_bytes(data))
    add("corrupt", "nan.jpg", "0 nan 0.5 0.2 0.2\n", lambda f: f.write_bytes(data))
    add("corrupt", "negative.jpg", "0 0.5 -0.1 0.2 0.2\n", lambda f: f.write_bytes(data))
    add("corrupt", "over1.jpg", "0 0.5 0.5 1.4 0.2\n", lambda f: f.write_bytes(data))
    # label rows that are dropped while the image is kept
    add("trimmed", "classid.jpg", src_label + "999 0.5 0.5 0.1 0.1\n", lambda f: f.write_bytes(data))
    first = src_label.splitlines()[0] + "\n"
    add("trimmed", "dupes.jpg", src_label + first + first, lambda f: f.write_bytes(data))
    # odd but valid images: the labels of the original apply to them unchanged
    add("usable", "exif6.jpg", src_label, lambda f: exif_rotated_jpeg(src, f))
    add("usable", "gray.png", src_label, lambda f: gray_png(src, f))
    add("usable", "deep16.png", src_label, lambda f: png16(src, f))
    add("usable", "cmyk.jpg", src_label, lambda f: cmyk_jpeg(src, f))
    # labels without images: a stray file and a whole label folder whose images never arrived
    ghost = lb_dir / f"{tag}_ghost.txt"
    ghost.write_text(src_label)
    pl.orphan_labels.append(str(ghost))
    return pl


def detection_faults(root: Path) -> tuple[Path, dict[str, Planted]]:
    """coco8 copy under root/faulty with faults in train and val; returns (dataset yaml, {split: Planted})."""
    ds = root / "faulty"
    _writable_copy(COCO8, ds)
    planted = {split: _plant_split(ds, split, tag=f"bad{split}") for split in ("train", "val")}
    lonely = ds / "labels" / "test"  # a label folder with no images anywhere
    lonely.mkdir()
    (lonely / "nothing.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    names = yaml.safe_load((COCO8 / "coco8.yaml").read_text())["names"]
    y = root / "faulty.yaml"
    y.write_text(yaml.safe_dump({"path": str(ds), "train": "images/train", "val": "images/val", "names": names}))
    return y, planted


def unusable_classification_dataset(root: Path) -> Path:
    """An ImageFolder whose files are all unreadable."""
    for split in ("train", "test"):
        d = root / split / "thing"
        d.mkdir(parents=True)
        (d / "a.jpg").write_bytes(b"")
        (d / "b.jpg").write_text("not an image")
    return root


def unusable_detection_dataset(root: Path) -> Path:
    """A dataset whose every image is unreadable or badly labelled: must stop with one clear error."""
    ds = root / "hopeless"
    for split in ("train", "val"):
        (ds / "images" / split).mkdir(parents=True)
        (ds / "labels" / split).mkdir(parents=True)
        (ds / "images" / split / "a.jpg").write_bytes(b"")
        (ds / "images" / split / "b.jpg").write_text("not an image")
        good = next((COCO8 / "images" / split).glob("*.jpg"))
        shutil.copy(good, ds / "images" / split / "c.jpg")
        (ds / "labels" / split / "c.txt").write_text("0 nan 0.5 0.2 0.2\n")
    names = yaml.safe_load((COCO8 / "coco8.yaml").read_text())["names"]  # so COCO weights fit it
    y = root / "hopeless.yaml"
    y.write_text(yaml.safe_dump({"path": str(ds), "train": "images/train", "val": "images/val", "names": names}))
    return y


def classification_faults(root: Path, classes: tuple[str, ...] = ("airplane", "cat", "ship"),
                          per_class: int = 4) -> tuple[Path, dict[str, Planted]]:
    """Tiny CIFAR-10 ImageFolder (train/ and test/) with unreadable and odd-but-valid images planted."""
    planted = {}
    for split in ("train", "test"):
        pl = Planted(images=root / split)
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for f in sorted((CIFAR / split / c).iterdir())[:per_class]:
                shutil.copy(f, d / f.name)
                pl.good.append(str(d / f.name))
                os.chmod(d / f.name, 0o644)
        d = root / split / classes[1]
        src = Path(pl.good[0])
        # a cut-off photo, large enough that OpenCV decodes its first half without an error
        photo = next((COCO8 / "images" / "train").glob("*.jpg")).read_bytes()
        for name, writer in (("truncated.jpg", lambda f: f.write_bytes(photo[: len(photo) // 2])),
                             ("zerobyte.jpg", lambda f: f.write_bytes(b"")),
                             ("textfile.jpg", lambda f: f.write_text("<html>404</html>\n"))):
            writer(d / f"bad{split}_{name}")
            pl.corrupt.append(str(d / f"bad{split}_{name}"))
        for name, writer in (("exif6.jpg", exif_rotated_jpeg), ("gray.png", gray_png), ("deep16.png", png16),
                             ("cmyk.jpg", cmyk_jpeg)):
            writer(src, d / f"odd{split}_{name}")
            pl.usable.append(str(d / f"odd{split}_{name}"))
        planted[split] = pl
    return root, planted


def onnx_with_metadata(src: Path, dst: Path, **meta: str) -> Path:
    """A copy of an ONNX file with some metadata_props replaced or added (hostile names, strides, ...)."""
    import onnx

    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key in meta:
            p.value = meta.pop(p.key)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(dst))
    return dst
