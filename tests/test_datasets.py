"""Dataset yamls, label checking and caching, rect batches, mosaic bookkeeping, loaders, generator."""
import os
import shutil
import signal
import stat
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from utils.data_config import ROOT, check_dataset, find_yaml
from utils.dataset import LoadImagesAndLabels
from utils.datasets import create_dataloader
from utils.labels import img2label_paths, verify_image_label
from utils.errors import UserError
from utils.smallobjects import generate
from utils.torch_utils import deferred_signals

SHARED = ROOT.parent / "shared"
COCO8 = SHARED / "data" / "coco8"
HYP_LOW = yaml.safe_load(open(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"))
needs_coco8 = pytest.mark.skipif(not COCO8.is_dir(), reason="../shared/data/coco8 not present")


# ----- helpers -----------------------------------------------------------------------------------
def write_dataset(root: Path, items, split="train"):
    """items: [(name, image (HxWx3) or None, label text or None)] -> images/<split>, labels/<split>."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for name, im, text in items:
        if im is not None:
            cv2.imwrite(str(root / "images" / split / f"{name}.jpg"), im)
        if text is not None:
            (root / "labels" / split / f"{name}.txt").write_text(text)
    return root / "images" / split


def noise_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----- paths and yamls ---------------------------------------------------------------------------
def test_img2label_paths():
    s = os.sep
    assert img2label_paths([f"{s}a{s}images{s}b{s}images{s}c.JPG"]) == [f"{s}a{s}images{s}b{s}labels{s}c.txt"]
    assert img2label_paths([f"{s}d{s}x.png"]) == [f"{s}d{s}x.txt"]  # no images/ folder: beside the image


def test_find_yaml_bare_name_and_missing_data_error():
    assert find_yaml("coco128.yaml") == ROOT / "data" / "coco128.yaml"
    assert find_yaml("coco128") == ROOT / "data" / "coco128.yaml"
    with pytest.raises(UserError, match="coco128"):
        check_dataset("coco128.yaml", autodownload=False)  # the ../datasets copy is not there
    with pytest.raises(UserError, match="not found"):
        find_yaml("no-such-dataset.yaml")


@needs_coco8
def test_relative_yaml_path_resolves_against_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from elsewhere: `path: ../shared/...` is still relative to ROOT
    d = check_dataset("../shared/data/coco8/coco8.yaml")
    assert d["path"] == COCO8.resolve()
    assert d["train"] == str(COCO8.resolve() / "images" / "train")
    assert d["nc"] == 80 and d["names"][79] == "toothbrush" and d["test"] is None


def _mini(tmp_path, **over):
    write_dataset(tmp_path, [("a", noise_image(32, 32), "0 0.5 0.5 0.2 0.2\n")], "val")
    d = dict(path=str(tmp_path), train="images/val", val="images/val", names=["cat", "dog"])
    d.update(over)
    return d


def test_names_list_and_map_and_nc(tmp_path):
    assert check_dataset(_mini(tmp_path))["names"] == {0: "cat", 1: "dog"}
    d = check_dataset(_mini(tmp_path, names={"1": "dog", "0": "cat"}, nc=2))
    assert d["names"] == {0: "cat", 1: "dog"} and d["nc"] == 2
    with pytest.raises(UserError, match="nc is 3"):
        check_dataset(_mini(tmp_path, nc=3))
    with pytest.raises(UserError, match="without gaps"):
        check_dataset(_mini(tmp_path, names={0: "a", 2: "b"}))
    again = check_dataset(check_dataset(_mini(tmp_path)))  # idempotent
    assert again["names"] == {0: "cat", 1: "dog"}


def test_normalize_names_one_form_for_every_source():
    from utils.names import normalize_names

    assert normalize_names(["cat", "dog"]) == {0: "cat", 1: "dog"}
    assert normalize_names(("cat",)) == {0: "cat"}
    assert list(normalize_names({"1": "dog", 0: "cat"}).items()) == [(0, "cat"), (1, "dog")]  # json keys, sorted
    assert normalize_names(None) == {}
    with pytest.raises(ValueError, match="'person'"):
        normalize_names({"person": 0})
    with pytest.raises(TypeError, match="string"):
        normalize_names("person")  # would otherwise become {0: 'p', 1: 'e', ...}


def test_unknown_key_is_one_clear_error(tmp_path):
    d = _mini(tmp_path)
    d["nmaes"] = d.pop("names")
    with pytest.raises(UserError) as e:
        check_dataset(d)
    assert "nmaes" in str(e.value) and "names" in str(e.value) and "\n" not in str(e.value)


def test_txt_lists_and_lists_of_folders(tmp_path):
    write_dataset(tmp_path, [("a", noise_image(32, 32), "0 0.5 0.5 0.2 0.2\n"), ("b", noise_image(40, 32), "")])
    (tmp_path / "train.txt").write_text("./images/train/a.jpg\nimages/train/b.jpg\n")
    y = tmp_path / "d.yaml"
    y.write_text(yaml.safe_dump(dict(path=str(tmp_path), train="train.txt", val=["images/train"], names=["x"])))
    d = check_dataset(y)
    assert d["train"] == str(tmp_path / "train.txt") and d["val"] == [str(tmp_path / "images" / "train")]
    ds = LoadImagesAndLabels(d["train"], img_size=64, batch_size=2)
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "b.jpg"]
    assert ds.cache_path == tmp_path / "train.cache"


def test_missing_data_without_download_names_the_path(tmp_path):
    d = dict(path=str(tmp_path / "nowhere"), train="images/train", val="images/val", names=["a"])
    with pytest.raises(UserError, match="nowhere"):
        check_dataset(d)


def test_download_snippet_runs_only_when_val_missing(tmp_path):
    marker = tmp_path / "marker"
    snippet = (
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "(Path(yaml['path']) / 'images' / 'val').mkdir(parents=True)\n"
    )
    d = dict(path=str(tmp_path / "ds"), train="images/val", val="images/val", names=["a"], download=snippet)
    with pytest.raises(UserError, match="automatic download is off"):
        check_dataset(dict(d), autodownload=False)
    assert not marker.exists()
    check_dataset(dict(d))
    assert marker.read_text() == "ran"
    marker.unlink()
    check_dataset(dict(d))  # data present now: the snippet must not run again
    assert not marker.exists()
    # the dataset root (`path`) existing or not is no reason to download
    d2 = dict(d, path=str(tmp_path / "ds2"), val=str(tmp_path / "ds" / "images" / "val"))
    check_dataset(d2)
    assert not marker.exists()


def test_bash_and_offline_url_downloads_fail_with_one_line(tmp_path):
    d = dict(path=str(tmp_path / "ds"), train="images/val", val="images/val", names=["a"])
    with pytest.raises(UserError, match="exit status 3"):
        check_dataset(dict(d, download="bash exit 3"))
    with pytest.raises(UserError, match="could not download") as e:
        check_dataset(dict(d, download="http://127.0.0.1:9/data.zip"))  # nothing listens on port 9
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="ZeroDivisionError"):
        check_dataset(dict(d, download="1 / 0"))


# ----- label checking ----------------------------------------------------------------------------
@needs_coco8
def test_planted_faults_scan_to_the_end(tmp_path, capsys):
    root = tmp_path / "coco8"
    shutil.copytree(COCO8, root)
    for p in root.rglob("*"):  # the shared copy is read-only; our copy must be writable
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    tr_img, tr_lb = root / "images" / "train", root / "labels" / "train"
    good = tr_img / "000000000009.jpg"
    data = good.read_bytes()

    def plant(name, img_bytes, label):
        (tr_img / f"{name}.jpg").write_bytes(img_bytes)
        if label is not None:
            (tr_lb / f"{name}.txt").write_text(label)

    plant("truncated", data[: len(data) // 2], "0 0.5 0.5 0.2 0.2\n")
    plant("textfile", b"this is not an image\n", "0 0.5 0.5 0.2 0.2\n")
    plant("zerobyte", b"", "0 0.5 0.5 0.2 0.2\n")
    plant("sixcols", data, "0 0.5 0.5 0.2 0.2 0.9\n")
    plant("coord13", data, "0 1.3 0.5 0.2 0.2\n")
    plant("nancoord", data, "0 nan 0.5 0.2 0.2\n")
    plant("class999", data, "1 0.5 0.5 0.2 0.2\n999 0.4 0.4 0.1 0.1\n")
    plant("dupes", data, "2 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n3 0.1 0.1 0.1 0.1\n")
    plant("emptylabel", data, "")
    plant("noendmarker", data[:-2], "4 0.5 0.5 0.2 0.2\n")

    ds = LoadImagesAndLabels(tr_img, img_size=64, batch_size=4, nc=80)
    out = capsys.readouterr().out
    names = sorted(Path(f).stem for f in ds.im_files)
    assert names == sorted(["000000000009", "000000000025", "000000000030", "000000000034",
                            "class999", "dupes", "emptylabel", "noendmarker"])
    for bad in ("truncated", "textfile", "zerobyte", "sixcols", "coord13", "nancoord", "class999", "dupes", "noendmarker"):
        assert out.count(f"{bad}.jpg") == 1, (bad, out)
    assert "6 corrupt" in out and "1 backgrounds" in out
    by_name = {Path(f).stem: lb for f, lb in zip(ds.im_files, ds.labels)}
    assert np.allclose(by_name["class999"], [[1, 0.5, 0.5, 0.2, 0.2]])
    assert len(by_name["dupes"]) == 2 and len(by_name["emptylabel"]) == 0
    # every kept image has its label rows: the shared coco8 files' line counts, and the planted ones by hand
    expected = {n: len((COCO8 / "labels" / "train" / f"{n}.txt").read_text().split("\n")) - 1
                for n in ("000000000009", "000000000025", "000000000030", "000000000034")}
    expected |= {"class999": 1, "dupes": 2, "emptylabel": 0, "noendmarker": 1}
    assert {n: len(lb) for n, lb in by_name.items()} == expected
    assert all(lb.shape[1:] == (5,) and ((lb[:, 1:] >= 0) & (lb[:, 1:] <= 1)).all() for lb in ds.labels)
    for i in range(ds.n):
        img, lbs, f, shapes = ds[i]  # every kept image really loads
        assert img.shape == (3, 64, 64)

    # second run: the .npz cache gives the same result and the same warnings, without pickle
    assert (root / "labels" / "train.cache").is_file()
    np.load(root / "labels" / "train.cache", allow_pickle=False)
    ds2 = LoadImagesAndLabels(tr_img, img_size=64, batch_size=4, nc=80)
    out2 = capsys.readouterr().out
    assert "(cached)" in out2 and "6 corrupt" in out2 and out2.count("coord13.jpg") == 1
    assert ds2.im_files == ds.im_files
    assert all(np.array_equal(a, b) for a, b in zip(ds.labels, ds2.labels))
    # a different nc changes which rows are dropped, so the cache must not be reused
    ds3 = LoadImagesAndLabels(tr_img, img_size=64, batch_size=4, nc=None, prefix="val: ")
    out3 = capsys.readouterr().out
    assert "(cached)" not in out3 and "val: WARNING: " in out3
    assert len({Path(f).stem: lb for f, lb in zip(ds3.im_files, ds3.labels)}["class999"]) == 2


def test_verify_polygons_exif_and_small_images(tmp_path):
    im = tmp_path / "images" / "a.jpg"
    im.parent.mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(im), noise_image(30, 60))
    lb = tmp_path / "labels" / "a.txt"
    lb.write_text("0 0.1 0.1 0.5 0.1 0.5 0.7\n")
    r = verify_image_label(str(im), str(lb), nc=1)
    assert r.shape == (60, 30) and r.nc == 0 and len(r.segments) == 1
    assert np.allclose(r.labels, [[0, 0.3, 0.4, 0.4, 0.6]])
    lb.write_text("0 0.1 0.1 0.5 0.1 0.5 0.7 0.2\n")  # odd count of polygon values
    assert verify_image_label(str(im), str(lb)).nc == 1
    cv2.imwrite(str(im), noise_image(8, 60))
    r = verify_image_label(str(im), str(lb))
    assert r.nc == 1 and "under 10 pixels" in r.msg
    # EXIF orientation 6 (rotated 90 degrees): the shape reported is the displayed one
    from PIL import Image

    pil = Image.fromarray(noise_image(20, 40))
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(im, exif=exif.tobytes())
    lb.unlink()
    r = verify_image_label(str(im), str(lb))
    assert r.shape == (20, 40) and r.nm == 1 and r.nc == 0


def test_unwritable_label_folder_warns_once(tmp_path, capsys):
    img_dir = write_dataset(tmp_path, [("a", noise_image(32, 32), "0 0.5 0.5 0.2 0.2\n")])
    labels_parent = tmp_path / "labels"
    labels_parent.chmod(0o555)
    try:
        LoadImagesAndLabels(img_dir, img_size=32, batch_size=1)
        LoadImagesAndLabels(img_dir, img_size=32, batch_size=1)
    finally:
        labels_parent.chmod(0o755)
    out = capsys.readouterr().out
    assert out.count("cannot write the label cache") == 1
    assert not (labels_parent / "train.cache").exists()


def test_no_usable_images_is_a_user_error(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images"):
        LoadImagesAndLabels(d, img_size=32)
    with pytest.raises(UserError, match="does not exist"):
        LoadImagesAndLabels(tmp_path / "missing", img_size=32)


# ----- rect, val items ---------------------------------------------------------------------------
def test_rect_batch_shapes(tmp_path):
    sizes = [(100, 50), (50, 100), (80, 80), (120, 60), (60, 90), (200, 50)]  # (w, h)
    img_dir = write_dataset(tmp_path, [(f"i{k}", noise_image(h, w, k), "") for k, (w, h) in enumerate(sizes)])
    ds = LoadImagesAndLabels(img_dir, img_size=64, batch_size=2, rect=True, stride=32, pad=0.5)
    ar = sorted(h / w for w, h in sizes)  # [0.25, 0.5, 0.5, 1, 1.5, 2]
    assert np.allclose(ds.shapes[:, 1] / ds.shapes[:, 0], ar)  # images sorted by aspect ratio
    expect = []
    for b in range(3):
        lo, hi = ar[2 * b], ar[2 * b + 1]
        s = [hi, 1] if hi < 1 else ([1, 1 / lo] if lo > 1 else [1, 1])
        expect.append(np.ceil(np.array(s) * 64 / 32 + 0.5).astype(int) * 32)
    assert ds.batch_shapes.tolist() == np.array(expect).tolist() == [[64, 96], [96, 96], [96, 64]]
    img, _, _, shapes = ds[0]
    assert tuple(img.shape[1:]) == tuple(ds.batch_shapes[0])


def test_val_item_shapes_and_labels_match_letterbox(tmp_path):
    img_dir = write_dataset(tmp_path, [("bus", noise_image(1080, 810), "1 0.5 0.25 0.2 0.1\n")])
    ds = LoadImagesAndLabels(img_dir, img_size=640, batch_size=1)
    img, labels, f, shapes = ds[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 640, 640)
    (h0, w0), ((rh, rw), (padw, padh)) = shapes
    assert (h0, w0) == (1080, 810) and rh == rw == pytest.approx(640 / 1080) and (padw, padh) == (80, 0)
    assert labels[0].tolist() == pytest.approx([0, 1, (0.5 * 480 + 80) / 640, 0.25, 0.2 * 480 / 640, 0.1], abs=1e-5)
    loaded, hw0, hw = ds.load_image(0)
    assert hw0 == (1080, 810) and hw == (640, 480)
    expect = cv2.resize(cv2.imread(f), (480, 640), interpolation=cv2.INTER_AREA)  # shrinking for val
    assert np.array_equal(loaded, expect)
    # RGB order: channel 0 of the tensor is the red channel of the letterboxed BGR image
    assert np.array_equal(img[0, :, 80:560].numpy(), expect[..., 2])


# ----- mosaic bookkeeping ------------------------------------------------------------------------
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255), (128, 255, 0)]


def _coloured_dataset(root):
    """4 images, 2 solid squares each, every square a unique colour on black."""
    items, k = [], 0
    for i in range(4):
        im = np.zeros((96, 128, 3), np.uint8)
        rows = []
        for x1, y1, s in ((10, 10, 30), (70, 40, 40)):
            im[y1 : y1 + s, x1 : x1 + s] = COLORS[k]
            rows.append(f"{k} {(x1 + s / 2) / 128} {(y1 + s / 2) / 96} {s / 128} {s / 96}")
            k += 1
        items.append((f"m{i}", im, "\n".join(rows) + "\n"))
    root.mkdir(parents=True, exist_ok=True)
    for name, im, text in items:  # PNG: lossless, so colours stay exact
        (root / "images").mkdir(exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "images" / f"{name}.png"), im)
        (root / "labels" / f"{name}.txt").write_text(text)
    return root / "images"


def test_mosaic_labels_follow_the_pixels(tmp_path):
    hyp = {k: 0.0 for k in HYP_LOW}
    hyp["mosaic"] = 1.0  # mosaic only: the crop is the one geometric change
    ds = LoadImagesAndLabels(_coloured_dataset(tmp_path), img_size=128, batch_size=4, augment=True, hyp=hyp)
    import random

    random.seed(0)
    for trial in range(24):
        img, labels, _, shapes = ds[trial % 4]
        assert shapes is None and tuple(img.shape) == (3, 128, 128)
        im = img.numpy().transpose(1, 2, 0)  # RGB
        lb = labels.numpy()
        assert ((lb[:, 2:] >= 0) & (lb[:, 2:] <= 1)).all()
        seen = set()
        for _, c, x, y, w, h in lb:
            x1, y1, x2, y2 = (x - w / 2) * 128, (y - h / 2) * 128, (x + w / 2) * 128, (y + h / 2) * 128
            crop = im[int(round(y1)) : int(round(y2)), int(round(x1)) : int(round(x2))]
            assert crop.size and (crop == np.array(COLORS[int(c)][::-1])).all(-1).mean() > 0.9  # BGR -> RGB
            seen.add(int(c))
        # every square that is visible enough (> 2 px and over 10% of it) has a label
        for k, col in enumerate(COLORS):
            mask = (im == np.array(col[::-1])).all(-1).astype(np.uint8)
            n, _, st, _ = cv2.connectedComponentsWithStats(mask)
            for x, y, w, h, area in st[1:]:
                full = 30 if k % 2 == 0 else 40
                if w > 3 and h > 3 and w * h > 0.15 * full * full:
                    assert k in seen, (trial, k, (x, y, w, h))


def _epoch_dataset(root):
    """8 noise images with two boxes each: enough that two shuffles of one seed practically never coincide."""
    items = [(f"e{i}", noise_image(48, 64, seed=i), f"{i % 3} 0.3 0.4 0.2 0.3\n{(i + 1) % 3} 0.7 0.6 0.3 0.2\n")
             for i in range(8)]
    return write_dataset(root, items)


def _samples(loader, epoch=None):
    """{path: (image, labels)} and the order of the paths, for one epoch of loader."""
    if epoch is not None:
        loader.set_epoch(epoch)
    out, order = {}, []
    for im, lb, paths, _ in loader:
        for k, f in enumerate(paths):
            out[f] = (im[k].clone(), lb[lb[:, 0] == k, 1:].clone())
            order.append(f)
    return out, order


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_batches_depend_only_on_seed_and_epoch(tmp_path, workers):
    """A resumed run (a fresh loader told its epoch) sees the batches of an uninterrupted one, also when the
    uninterrupted one kept its persistent workers: the epoch reaches them through shared memory."""
    img_dir = _epoch_dataset(tmp_path)
    hyp = dict(HYP_LOW, mosaic=1.0, mixup=0.5, degrees=5.0)
    make = lambda: create_dataloader(img_dir, 64, 2, 32, hyp=hyp, augment=True, workers=workers, shuffle=True, seed=3)[0]
    long = make()
    assert long.num_workers == min(os.cpu_count(), workers) and long.persistent_workers == (long.num_workers > 0)
    runs = [_samples(long, e) for e in range(3)]
    fresh = _samples(make(), 2)
    assert fresh[1] == runs[2][1]  # same order
    for f, (im, lb) in fresh[0].items():
        assert torch.equal(im, runs[2][0][f][0]) and torch.equal(lb, runs[2][0][f][1]), f
    assert len({tuple(o) for _, o in runs}) == 3  # every epoch its own order
    # and its own augmentation of each image (mosaic partners, crop, colours)
    assert all(not torch.equal(runs[1][0][f][0], runs[2][0][f][0]) for f in fresh[0])
    again = _samples(long)  # without set_epoch: the epoch after the last one
    assert again[1] == _samples(make(), 3)[1]


def test_seeded_loader_is_deterministic(tmp_path):
    img_dir = _coloured_dataset(tmp_path)
    hyp = dict(HYP_LOW, mixup=0.5, degrees=5.0)

    def epoch(seed):
        loader, _ = create_dataloader(img_dir, 64, 2, 32, hyp=hyp, augment=True, workers=2, shuffle=True, seed=seed)
        return [(im.clone(), lb.clone(), paths) for im, lb, paths, _ in loader]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 2
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_collate_fns(tmp_path):
    ds = LoadImagesAndLabels(_coloured_dataset(tmp_path), img_size=64, batch_size=4)
    batch = [ds[i] for i in range(4)]
    im, lb, paths, shapes = LoadImagesAndLabels.collate_fn(batch)
    assert im.shape == (4, 3, 64, 64) and lb[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    import random

    for seed in range(6):  # both branches: 2x2 tile or one image upscaled
        random.seed(seed)
        im4, lb4, p4, s4 = LoadImagesAndLabels.collate_fn4([ds[i] for i in range(4)])
        assert im4.shape == (1, 3, 128, 128) and len(p4) == 1
        assert (lb4[:, 0] == 0).all() and ((lb4[:, 2:] >= 0) & (lb4[:, 2:] <= 1)).all()
        assert len(lb4) in (2, 8)


# ----- the small-object generator ----------------------------------------------------------------
def test_smallobjects_generator_is_deterministic_and_small(tmp_path):
    a = generate(tmp_path / "a", n_train=4, n_val=2, img_size=128, seed=0)
    b = generate(tmp_path / "b", n_train=4, n_val=2, img_size=128, seed=0)
    c = generate(tmp_path / "c", n_train=4, n_val=2, img_size=128, seed=1)
    fa = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert len(fa) == 12 and fa == sorted(p.relative_to(b) for p in b.rglob("*.*"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in fa)
    labels = np.concatenate([np.loadtxt(f, ndmin=2) for f in a.rglob("labels/*/*.txt")])
    assert len(labels) >= 6 and set(labels[:, 0]) <= {0, 1, 2, 3}
    assert ((labels[:, 1:] > 0) & (labels[:, 1:] < 1)).all()
    x1, x2 = labels[:, 1] - labels[:, 3] / 2, labels[:, 1] + labels[:, 3] / 2
    assert (x1 >= 0).all() and (x2 <= 1).all()
    wh = labels[:, 3:] * 128
    assert wh.min() >= 3 and wh.max() <= 60 and np.median(wh) < 32
    # boxes are tight: the pixels at a box's centre differ from the image's typical background
    ds = LoadImagesAndLabels(a / "images" / "train", img_size=128, batch_size=2)
    assert ds.n == 4 and sum(len(x) for x in ds.labels) > 0


def test_smallobjects_yaml_download_step_generates(tmp_path):
    d = yaml.safe_load(open(ROOT / "data" / "smallobjects.yaml"))
    d["path"] = str(tmp_path / "so")
    assert "n_train=512, n_val=64" in d["download"]
    d["download"] = d["download"].replace("n_train=512, n_val=64", "n_train=2, n_val=2")
    out = check_dataset(d)
    assert len(list(Path(out["val"]).glob("*.jpg"))) == 2 and out["names"] == {0: "shape"}
    labels = np.concatenate([np.loadtxt(f, ndmin=2) for f in Path(d["path"]).rglob("labels/*/*.txt")])
    assert len(labels) and set(labels[:, 0]) == {0}  # every shape is one class in the demo set


def test_hyp_yamls_hold_yolov5_values():
    hyps = {n: yaml.safe_load(open(ROOT / "data" / "hyps" / f"hyp.{n}.yaml")) for n in ("scratch-low", "scratch-med", "scratch-high", "no-augmentation")}
    assert all(set(h) == set(HYP_LOW) and len(h) == 28 for h in hyps.values())
    low, med, high, none = (hyps[n] for n in ("scratch-low", "scratch-med", "scratch-high", "no-augmentation"))
    assert (low["lr0"], low["lrf"], low["momentum"], low["obj"], low["scale"], low["mosaic"]) == (0.01, 0.01, 0.937, 1.0, 0.5, 1.0)
    assert (med["lrf"], med["cls"], med["obj"], med["scale"], med["mixup"], med["copy_paste"]) == (0.1, 0.3, 0.7, 0.9, 0.1, 0.0)
    assert high == dict(med, copy_paste=0.1)
    assert none["mosaic"] == none["fliplr"] == none["hsv_s"] == none["scale"] == 0


@pytest.mark.parametrize("kind", ["detect", "classify"])
def test_persistent_workers_stop_with_their_loader_even_when_their_iterator_is_held(tmp_path, kind):
    """Workers ignore SIGTERM (ignore_interrupts), so the loader stops them itself (a finalizer, WorkerSafeDataLoader)."""
    import gc
    import multiprocessing

    if kind == "detect":
        loader, _ = create_dataloader(_coloured_dataset(tmp_path), 64, 2, 32, workers=2, seed=0)
    else:
        loader = _classify_loader(tmp_path, workers=2)
    for _ in loader:
        pass
    workers = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert len(workers) >= loader.num_workers == 2  # persistent: still there after the epoch
    held = loader._iterator  # as a reference cycle would hold it: the iterator's own clean-up never runs
    del loader
    gc.collect()
    for p in workers:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in workers)
    del held


@pytest.mark.slow
def test_a_process_exits_with_a_loader_still_alive(tmp_path):
    """multiprocessing's exit handler sends SIGTERM to leftover workers and then joins them: workers that ignore
    it must have been stopped before, or the process never exits (train.py hung so after its last line)."""
    import subprocess
    import sys

    code = f"""
import gc, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from utils.datasets import create_dataloader
gc.disable()  # the loader below stays alive until exit, as one held by a reference cycle does
loader = create_dataloader({str(_coloured_dataset(tmp_path))!r}, 64, 2, 32, workers=2, seed=0)[0]
loader.cycle = loader
for _ in loader:
    pass
print("done")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as in a terminal (a shell's background job starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_inside_deferred_signals_is_raised_when_the_block_ends(ctrl_c_raises):
    before = signal.getsignal(signal.SIGINT)
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # any bytecode here would have run the handler, were the signal not held back
            reached = True
    assert reached and signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_inside_deferred_signals_is_raised_at_once(ctrl_c_raises):
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: a batch that never comes must not trap the user
            time.sleep(0.05)
            reached = True
    assert not reached


def test_an_ignored_signal_stays_ignored_inside_deferred_signals():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. train.py started as `nohup ... &`
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def _interrupt_the_parent_while_it_waits(getitem):
    def wrapped(self, i):
        if i == 0:
            os.kill(os.getppid(), signal.SIGINT)  # the main process is waiting in the loader for this batch
            time.sleep(0.3)
        return getitem(self, i)
    return wrapped


def _classify_loader(root: Path, workers: int = 1):
    from classify.data import ClassificationDataset, build_loader

    (root / "a").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    return build_loader(ClassificationDataset([(str(root / "a" / "x.png"), 0)] * 4, 8, augment=False), 2, False, workers)


@pytest.mark.parametrize("kind", ["detect", "classify"])
def test_ctrl_c_while_a_batch_is_received_is_raised_after_it_not_inside_the_loader(tmp_path, monkeypatch, kind,
                                                                                 ctrl_c_raises):
    """A Ctrl-C raised inside the loader's receive could close a worker's shared-memory socket mid-handshake
    (a ConnectionResetError traceback from the worker on a clean stop): it must wait for the batch."""
    if kind == "detect":
        loader, _ = create_dataloader(_coloured_dataset(tmp_path), 64, 2, 32, workers=1, seed=0)
    else:
        loader = _classify_loader(tmp_path)
    cls = type(loader.dataset)
    monkeypatch.setattr(cls, "__getitem__", _interrupt_the_parent_while_it_waits(cls.__getitem__))  # workers fork after this
    with pytest.raises(KeyboardInterrupt) as e:
        for _ in loader:
            pass
    frames = [f.filename for f in traceback.extract_tb(e.value.__traceback__)]
    assert not any(f.endswith(os.path.join("torch", "utils", "data", "dataloader.py")) for f in frames), frames
