"""ResNet / ResNet-SPD classifiers: architecture facts, SPD exactness, training loop, scripts, safety."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision

from classify import predict, train, val
from classify.checkpoint import load_pretrained, read_checkpoint
from classify.data import (
    ClassificationDataset,
    collate_skip_bad,
    find_eval_split,
    find_splits,
    list_samples,
    train_transforms,
)
from classify.engine import evaluate, topk_correct
from models.common import space_to_depth
from models.resnet import (
    MODEL_NAMES,
    SPDConv,
    build_model,
    spd_weight_from_strided,
    strided_layers,
    transfer_weights,
)
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
VIDEO = ROOT.parent / "shared" / "videos" / "car-detection.mp4"

# parameter counts (small stem: nc=10, imagenet stem: nc=1000); the imagenet baselines equal torchvision's
PARAMS = {
    ("resnet18", "small"): 11_173_962,
    ("resnet18-spd", "small"): 16_340_106,  # SPD -> 3x3 conv stem (12 -> 64): 7,040 parameters
    ("resnet50", "small"): 23_520_842,
    ("resnet50-spd", "small"): 41_073_290,
    ("resnet18-spd", "plain-small"): 16_334_922,  # 3x3 stride-1 stem (3 -> 64): 1,856 parameters
    ("resnet50-spd", "plain-small"): 41_068_106,
    ("resnet50-spd-authors", "small"): 27_654_026,  # the small stem is the authors' Focus here
    ("resnet18-spd-authors", "small"): 27_654_026,  # the authors' "resnet18_spd" is the same network
    ("resnet18", "imagenet"): 11_689_512,
    ("resnet18-spd", "imagenet"): 16_878_696,
    ("resnet50", "imagenet"): 25_557_032,
    ("resnet50-spd", "imagenet"): 43_132_520,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core box, two OpenMP threads stall badly under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics so equivalence checks cannot pass by BN being an identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("stem", ["small", "imagenet"])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes(name, stem, size):
    model = build_model(name, 7, stem=stem).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, size, size))
        y = model.head(feats)  # forward() is exactly head(features(x))
    assert y.shape == (2, 7)
    assert feats.shape[-2:] == (size // model.stride,) * 2  # the documented downsampling factor is the real one


def test_spd_variants_have_no_stride():
    for stem in ("small", "imagenet"):
        for name in ("resnet18-spd", "resnet50-spd"):
            model = build_model(name, 10, stem=stem)
            assert strided_layers(model) == [], f"{name}/{stem} still has strided layers"
            assert any(isinstance(m, SPDConv) for m in model.modules())
        base = build_model("resnet18", 10, stem=stem)
        # baseline: 3 stage convs + 3 projection shortcuts, plus 7x7/2 conv and max-pool for the imagenet stem
        assert len(strided_layers(base)) == (6 if stem == "small" else 8)
    imagenet_base = strided_layers(build_model("resnet18", 10, stem="imagenet"))
    assert "stem.0.conv" in imagenet_base and "stem.1" in imagenet_base  # the conv and the max-pool
    # the authors' released-code variant keeps exactly the three stride-2 1x1 shortcut convs
    released = strided_layers(build_model("resnet18-spd", 10, spd_shortcut=False))
    assert released == [f"layer{i}.0.shortcut.conv" for i in (2, 3, 4)]


def test_spd_uses_the_detector_space_to_depth():
    model = build_model("resnet18-spd", 10, stem="imagenet")
    spds = [m for m in model.modules() if isinstance(m, SPDConv)]
    assert len(spds) == 1 + 3 + 3  # stem, three stage convs, three shortcuts
    assert all(type(m.spd) is space_to_depth for m in spds)
    with pytest.raises(ValueError, match="even"):
        model(torch.randn(1, 3, 30, 30))  # SPD refuses odd sizes rather than dropping pixels


def test_small_stem_of_spd_variants_is_spd():
    """CIFAR: the -spd models' stem folds 2x2 pixels into channels (32 -> 16), the plain ones keep 32."""
    spd = build_model("resnet50-spd", 10, stem="small")
    assert isinstance(spd.stem[0], SPDConv) and spd.stem[0].conv.in_channels == 12 and spd.stride == 16
    assert spd.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (2, 2)  # the authors' 32 -> 2
    plain = build_model("resnet50", 10, stem="small")
    assert not isinstance(plain.stem[0], SPDConv) and plain.stride == 8


@pytest.mark.parametrize("name", ["resnet18-spd-authors", "resnet50-spd-authors"])
def test_authors_layout(name):
    """The released code: Focus(3, 64, k=1) stem, Conv3x3 s1 -> SPD -> BN(4c), Bottleneck [3, 4, 6, 3]."""
    from models.resnet import BottleneckBlock, ConvSPD

    m = build_model(name, 10, stem="small").eval()
    assert m.cfg["model"] == name and m.cfg["stem"] == "focus" and m.cfg["spd_shortcut"] is False
    assert isinstance(m.stem[0], SPDConv) and m.stem[0].conv.kernel_size == (1, 1) and m.stem[0].conv.in_channels == 12
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert all(isinstance(b, BottleneckBlock) for b in m.layer1)
    blk = m.layer2[0]
    assert isinstance(blk.cv2, ConvSPD) and list(blk.cv2._modules) == ["conv", "spd", "bn", "act"]
    assert blk.cv2.conv.stride == (1, 1) and blk.cv2.conv.out_channels == 128 and blk.cv2.bn.num_features == 512
    assert blk.cv3.conv.in_channels == 512  # the 1x1 expand reads all 4c SPD channels
    assert strided_layers(m) == [f"layer{i}.0.shortcut.conv" for i in (2, 3, 4)]  # stride-2 1x1 shortcuts kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert m.features(x).shape == (2, 2048, 2, 2) and m(x).shape == (2, 10)
        # ConvSPD computes exactly conv -> space_to_depth -> BN -> ReLU
        h = torch.randn(1, 128, 8, 8)
        ref = F.relu(blk.cv2.bn(space_to_depth()(F.conv2d(h, blk.cv2.conv.weight, padding=1))))
        torch.testing.assert_close(blk.cv2(h), ref)


def test_checkpoints_rebuild_authors_and_old_small_stem(tmp_path):
    """An authors-layout checkpoint reloads as that layout; an -spd checkpoint written before the SPD
    small stem (3x3 stride-1 stem weights) still rebuilds the architecture it holds."""
    from classify.checkpoint import make_checkpoint, model_from_checkpoint

    x = torch.randn(1, 3, 32, 32)
    for name, stem, cfg_stem in (("resnet50-spd-authors", "small", None), ("resnet18-spd", "plain-small", "small")):
        m = build_model(name, 3, stem=stem).eval()
        randomize_bn(m)
        ck = make_checkpoint(m, ["a", "b", "c"], 32, 0, 0.5)
        if cfg_stem:
            ck["stem"] = cfg_stem  # what such a file says
        torch.save(ck, tmp_path / "c.pt")
        back = model_from_checkpoint(read_checkpoint(tmp_path / "c.pt")).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x), m(x))


@pytest.mark.parametrize("key", sorted(PARAMS))
def test_parameter_counts(key):
    name, stem = key
    model = build_model(name, 1000 if stem == "imagenet" else 10, stem=stem)
    assert n_params(model) == PARAMS[key]


def test_baselines_match_torchvision_exactly():
    for arch in ("resnet18", "resnet50"):
        tv = getattr(torchvision.models, arch)().eval()
        randomize_bn(tv)
        ours = build_model(arch, 1000, stem="imagenet").eval()
        assert n_params(ours) == n_params(tv)
        loaded, total = transfer_weights(ours, tv.state_dict())
        assert loaded == total
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_spd_weight_reproduces_strided_conv(k):
    w = torch.randn(5, 3, k, k)
    x = torch.randn(2, 3, 16, 16)
    strided = F.conv2d(x, w, stride=2, padding=k // 2)
    spd = F.conv2d(space_to_depth()(x), spd_weight_from_strided(w), stride=1, padding=k // 2)
    torch.testing.assert_close(spd, strided, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_spd_model_from_baseline_is_same_function(arch):
    # with the stride-1 stem both share one resolution schedule, so every strided conv has an exact SPD twin
    base = build_model(arch, 10, stem="plain-small").eval()
    randomize_bn(base)
    spd = build_model(f"{arch}-spd", 10, stem="plain-small").eval()
    loaded, total = transfer_weights(spd, base.state_dict())
    assert loaded == total
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(spd(x), base(x), rtol=1e-4, atol=1e-4)


def test_cutoff_and_dropout():
    m = build_model("resnet18-spd", 5, stages=2, dropout=0.3)
    assert m.fc.in_features == 128 and m.stride == 4 and isinstance(m.drop, torch.nn.Dropout)  # SPD stem, layer2
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError):
        build_model("resnet34", 10)


def test_one_batch_overfit():
    torch.manual_seed(0)
    model = build_model("resnet18-spd", 4)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # 16 px: 3 SPD halvings, cheap
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    with torch.no_grad():  # still in train mode: batch statistics, as during the steps above
        assert (model(x).argmax(1) == y).all()


# ---------------------------------------------------------------- data and metrics


def make_dataset(root: Path, per_class: int = 4, classes=("airplane", "cat", "ship"), broken: bool = True) -> Path:
    """A tiny copy of CIFAR-10 (never written into ../shared), with one unreadable file."""
    for split, n in (("train", per_class), ("test", per_class)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for f in sorted((CIFAR / split / c).iterdir())[:n]:
                shutil.copy(f, d / f.name)
    if broken:
        (root / "train" / classes[1] / "broken.jpg").write_bytes(b"not an image")
    return root


def test_splits_and_samples(tmp_path):
    data = make_dataset(tmp_path / "d")
    s = find_splits(data)
    assert s.names == ["airplane", "cat", "ship"] and s.val_name == "test"
    assert find_eval_split(data) == data / "test"
    samples = list_samples(s.train, s.names, per_class=2)
    assert len(samples) == 6 and [lab for _, lab in samples] == [0, 0, 1, 1, 2, 2]
    (data / "test" / "dog").mkdir()
    with pytest.raises(UserError, match="dog"):
        find_splits(data)
    shutil.rmtree(data / "test")
    with pytest.raises(UserError, match="neither val/ nor test/"):
        find_splits(data)
    with pytest.raises(UserError, match="not found"):
        find_splits(tmp_path / "missing")


def test_unreadable_image_dropped_from_batch(tmp_path, capsys):
    data = make_dataset(tmp_path / "d")
    s = find_splits(data)
    ds = ClassificationDataset(list_samples(s.train, s.names), 32, augment=True)
    assert len(ds) == 13
    items = [ds[i] for i in range(len(ds))]
    assert sum(y == -1 for _, y in items) == 1
    assert "broken.jpg" in capsys.readouterr().err
    x, y = collate_skip_bad(items)
    assert x.shape == (12, 3, 32, 32) and y.tolist().count(1) == 4


def test_train_transforms_pad_crop_flip():
    torch.manual_seed(0)
    img = torch.arange(32 * 32 * 3, dtype=torch.uint8).reshape(3, 32, 32)
    t = train_transforms(32)
    outs = [t(img) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # random: crops/flips differ
    big = torch.zeros(3, 50, 80, dtype=torch.uint8)
    assert t(big).shape == (3, 32, 32)  # any input size ends as imgsz x imgsz


def test_topk_and_evaluate_counts():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 1, 1, 1, 1]])
    y = torch.tensor([0, 0, 1])
    assert topk_correct(logits, y, 1) == 2 and topk_correct(logits, y, 5) == 2
    assert topk_correct(logits, torch.tensor([1, 0, 0]), 5) == 1  # rows 2 and 3 rank class 0 last

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    xs = torch.arange(3).float()[:, None, None, None].expand(3, 3, 2, 2)
    loader = [(xs, y)]
    res = evaluate(Fixed(), loader, torch.device("cpu"), 6, progress=False)
    assert res.n == 3 and res.top1 == pytest.approx(2 / 3) and res.top5 == pytest.approx(2 / 3)
    assert res.confusion[0, 0] == 1 and res.confusion[0, 5] == 1 and res.confusion[1, 1] == 1
    assert res.per_class[0] == 0.5 and res.per_class[1] == 1.0 and np.isnan(res.per_class[2])


# ---------------------------------------------------------------- scripts end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    data = make_dataset(tmp / "data")
    out = train.train(train.parse_opt([
        "--model", "resnet18-spd", "--data", str(data), "--epochs", "2", "--batch-size", "4", "--imgsz", "32",
        "--workers", "0", "--project", str(tmp / "runs"), "--name", "t", "--seed", "1",
    ]))
    return tmp, data, out


def test_train_outputs(trained):
    tmp, data, out = trained
    save = out["save_dir"]
    for f in ("results.csv", "results.png", "confusion_matrix.png", "per_class.csv", "opt.yaml"):
        assert (save / f).is_file(), f
    df = pd.read_csv(save / "results.csv")
    assert list(df.columns) == ["epoch", "train/loss", "val/loss", "metrics/accuracy_top1",
                                "metrics/accuracy_top5", "lr/0"]
    assert len(df) == 2 and df["lr/0"].iloc[1] < df["lr/0"].iloc[0]  # linear decay
    ck = torch.load(out["best"], map_location="cpu", weights_only=True)  # plain data only
    assert ck["model"] == "resnet18-spd" and ck["names"] == ["airplane", "cat", "ship"] and ck["nc"] == 3
    assert ck["imgsz"] == 32 and ck["optimizer"] is None  # best.pt is stripped for use
    last = torch.load(out["last"], map_location="cpu", weights_only=True)
    assert last["optimizer"] is not None and last["epoch"] == 1
    acc = df["metrics/accuracy_top1"]
    assert out["top1"] == pytest.approx(acc.max())  # best.pt holds the epoch with the best top-1
    assert ck["best_fitness"] == pytest.approx(acc.max()) and ck["epoch"] == int(acc.idxmax())
    assert all(abs(a * 12 - round(a * 12)) < 1e-9 for a in acc)  # a count out of the 12 test images
    assert np.isfinite(df["train/loss"]).all() and (df["val/loss"] > 0).all()


def test_val_and_predict_accept_checkpoint(trained, tmp_path, capsys):
    _, data, out = trained
    res = val.run(out["best"], data, workers=0, save_dir=tmp_path / "val")
    assert res.n == 12 and res.top1 == pytest.approx(out["top1"])
    assert (tmp_path / "val" / "per_class.csv").is_file()
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(data / "test" / "cat" / "0000.jpg", images / "a.jpg")
    (images / "bad.jpg").write_bytes(b"junk")
    results = predict.run(out["best"], images, topk=5, save_dir=tmp_path / "pred", save_txt=True)
    assert len(results) == 1  # the unreadable file is skipped, not fatal
    path, top = results[0]
    assert [n for n, _ in top] and len(top) == 3 and sum(p for _, p in top) == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "pred" / "a.jpg").is_file() and (tmp_path / "pred" / "labels" / "a.txt").is_file()
    printed = capsys.readouterr().out
    assert "a.jpg" in printed and top[0][0] in printed


def test_predict_video(trained, tmp_path):
    _, _, out = trained
    results = predict.run(out["best"], VIDEO, save_dir=tmp_path / "pv", vid_stride=60)
    assert len(results) >= 3 and all(len(t) == 3 for _, t in results)
    assert (tmp_path / "pv" / "car-detection.mp4").stat().st_size > 0


def test_pretrained_from_torchvision_file(tmp_path):
    tv = torchvision.models.resnet18()
    f = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), f)
    model = build_model("resnet18-spd", 10, stem="imagenet")
    msg = load_pretrained(model, str(f))
    # all but the classifier (1000 vs 10 classes) transfer; strided convs are converted into SPD convs
    assert "transferred 120/122" in msg
    torch.testing.assert_close(model.layer2[0].cv1.conv.weight, spd_weight_from_strided(tv.layer2[0].conv1.weight))


@pytest.mark.slow
def test_tampered_checkpoint_is_refused(trained, tmp_path):
    _, data, _ = trained
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    code = (
        "import os, sys, torch\n"
        "class E:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\n"
        "torch.save({'model': 'resnet18', 'nc': 3, 'state_dict': {}, 'x': E()}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(evil)], check=True)
    assert evil.is_file() and not marker.exists()
    with pytest.raises(UserError, match="refusing"):
        read_checkpoint(evil)
    for main, args in ((val.main, ["--weights", str(evil), "--data", str(data)]),
                       (predict.main, ["--weights", str(evil), "--source", str(data / "test"), "--nosave"])):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    assert not marker.exists()


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=1, broken=False)
    r = subprocess.run([sys.executable, "classify/train.py", "--model", "resnet18-spd", "--imgsz", "36",
                        "--data", str(data), "--project", str(tmp_path / "runs")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("ERROR: --imgsz 36 must be a multiple of 16")


def test_benchmark_smoke(tmp_path):
    from benchmarks import classify_cifar10 as bench

    df = bench.run(bench.parse_opt(["--models", "resnet18", "resnet18-spd", "--train-per-class", "1",
                                    "--test-per-class", "1", "--batch-size", "5", "--latency-runs", "2",
                                    "--out", str(tmp_path)]))
    assert list(df.model) == ["resnet18", "resnet18-spd"] and (df.test_images == 10).all()
    assert df.params_M.iloc[1] == pytest.approx(PARAMS[("resnet18-spd", "small")] / 1e6)
    # resnet18 at 32: 1.111 GFLOPs; resnet18-spd's SPD stem halves every later stage: 0.375
    assert list(df.GFLOPs.round(3)) == [1.111, 0.375] and (df.cpu_ms_per_img_b1 > 0).all()
    md = (tmp_path / "results.md").read_text()
    assert "| resnet18-spd |" in md and "Command: `python benchmarks/classify_cifar10.py" in md
    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.model) == list(df.model) and saved.top1.tolist() == pytest.approx(df.top1.tolist())
