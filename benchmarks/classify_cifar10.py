"""ResNet18 vs ResNet18-SPD and ResNet50 vs ResNet50-SPD on CIFAR-10 at 32x32, same budget and seed.

Every model gets the same recipe as classify/train.py (Adam 1e-3, linear decay to 1e-5, label
smoothing 0.1, weight EMA, pad-4 random crop + flip), the same training images in the same order
(same seed) and the same number of epochs; the EMA weights are then scored on the test split.
Reported per model: top-1, top-5, parameters, GFLOPs at 32x32, CPU latency per image at batch 1,
and training wall time. Writes results.csv and results.md to --out.

Usage:
    python benchmarks/classify_cifar10.py --threads 1     # the README table: the CPU budget below
    python benchmarks/classify_cifar10.py --train-per-class 0 --test-per-class 0 --epochs 30 --batch-size 64 \
        --device 0                                          # the issue's full budget (all images), on a GPU

Default budget (fits about 20 minutes on a shared 2-core CPU): 100 training images per class for one epoch
at batch 16, scored on 200 test images per class. 0 for a per-class count means every image.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from classify.data import ClassificationDataset, build_loader, find_splits, list_samples  # noqa: E402
from classify.engine import evaluate, train_one_epoch, training_setup  # noqa: E402
from models.resnet import MODEL_NAMES, build_model  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.torch_utils import count_flops, forward_times_ms, init_seeds, select_device  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    # resnet18-spd-authors is the same network as resnet50-spd-authors (the authors' code), so one of them
    p.add_argument("--models", nargs="+", default=[m for m in MODEL_NAMES if m != "resnet18-spd-authors"],
                   choices=MODEL_NAMES)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-per-class", type=int, default=100, help="training images per class (0: all, 1000 here)")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (0: all, 1000 here)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=32)
    p.add_argument("--lr0", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="0: load in the main process (no competition for 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 forward passes per model")
    p.add_argument("--device", default="cpu", help="training device; latency is always measured on the CPU")
    p.add_argument("--out", default="runs/benchmark-cls", help="folder for results.csv / results.md")
    opt = p.parse_args(argv)
    opt.argv = list(sys.argv[1:] if argv is None else argv)  # to print the exact command under the table
    return opt


def cpu_latency_ms(model: torch.nn.Module, imgsz: int, runs: int, warmup: int = 5) -> float:
    """Median wall time of one batch-1 forward pass on the CPU, in milliseconds."""
    return statistics.median(forward_times_ms(model.cpu().eval(), torch.randn(1, 3, imgsz, imgsz), runs, warmup))


def bench_model(name: str, opt: argparse.Namespace, splits, train_samples, test_samples, device) -> dict:
    """Train `name` under the shared budget, score it on the test samples, measure its cost."""
    init_seeds(opt.seed)  # same initial RNG state, so the same data order and augmentations for every model
    nc = len(splits.names)
    model = build_model(name, nc, stem="small").to(device)
    params = sum(p.numel() for p in model.parameters())
    gflops = count_flops(model, opt.imgsz)
    train_loader = build_loader(ClassificationDataset(train_samples, opt.imgsz, augment=True), opt.batch_size, True,
                                opt.workers, opt.seed)
    test_loader = build_loader(ClassificationDataset(test_samples, opt.imgsz, augment=False), 256, False,
                               opt.workers, opt.seed)
    optimizer, scheduler, ema, criterion = training_setup(model, opt.epochs, lr0=opt.lr0)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None  # fp16 autocast needs loss scaling
    torch.manual_seed(opt.seed)  # model inits drew different amounts of randomness: equalise the augmentations
    t0 = time.time()
    loss = float("nan")
    for epoch in range(opt.epochs):
        loss = train_one_epoch(model, train_loader, optimizer, criterion, device, ema, scaler,
                               desc=f"{name} {epoch + 1}/{opt.epochs}")
        scheduler.step()
    train_s = time.time() - t0
    t0 = time.time()
    res = evaluate(ema.ema, test_loader, device, nc, criterion, desc=f"{name} test")
    test_s = time.time() - t0
    latency = cpu_latency_ms(ema.ema, opt.imgsz, opt.latency_runs)
    row = {
        "model": name, "stem": model.cfg["stem"], "top1": res.top1, "top5": res.top5, "test_loss": res.loss, "train_loss": loss,
        "params_M": params / 1e6, "GFLOPs": gflops, "cpu_ms_per_img_b1": latency,
        "train_s": train_s, "test_s": test_s, "test_images": res.n,
    }
    print(f"{name}: top1 {res.top1:.4f} top5 {res.top5:.4f} params {params / 1e6:.2f}M "
          f"{gflops:.2f} GFLOPs {latency:.1f} ms/img (CPU b1), trained in {train_s:.0f}s", flush=True)
    return row


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table (pandas' to_markdown needs the optional tabulate package)."""
    cols = ["model", "stem", "top1", "top5", "params_M", "GFLOPs", "cpu_ms_per_img_b1", "train_s"]
    head = ["Model", "Stem", "Top-1 (%)", "Top-5 (%)", "Params (M)", "GFLOPs @32", "CPU ms/img (b=1)", "Train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df[cols].iterrows():
        lines.append(f"| {r.model} | {r.stem} | {100 * r.top1:.2f} | {100 * r.top5:.2f} | {r.params_M:.2f} | {r.GFLOPs:.3f} "
                     f"| {r.cpu_ms_per_img_b1:.1f} | {r.train_s:.0f} |")
    return "\n".join(lines)


def run(opt: argparse.Namespace) -> pd.DataFrame:
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = select_device(opt.device)
    splits = find_splits(opt.data)
    train_samples = list_samples(splits.train, splits.names, opt.train_per_class or None)
    test_samples = list_samples(splits.val, splits.names, opt.test_per_class or None)
    if not train_samples or not test_samples:
        raise UserError(f"no images under {splits.train} or {splits.val}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, train device {device}")
    print(f"CIFAR-10 benchmark: {len(train_samples)} train images x {opt.epochs} epoch(s), "
          f"{len(test_samples)} {splits.val_name} images, seed {opt.seed}; {machine}; load average {load:.1f}")
    rows = [bench_model(m, opt, splits, train_samples, test_samples, device) for m in opt.models]
    df = pd.DataFrame(rows)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cmd = shlex.join(["python", "benchmarks/classify_cifar10.py", *opt.argv])
    md = (f"{to_markdown(df)}\n\nBudget: {len(train_samples)} training images "
          f"({opt.train_per_class or 'all'} per class) "
          f"x {opt.epochs} epoch(s), batch {opt.batch_size}, seed {opt.seed}; scored on {len(test_samples)} "
          f"{splits.val_name} images. Machine: {machine}; 1-min load average {load:.1f} at start, {load_end:.1f} "
          f"at end. {datetime.now():%Y-%m-%d %H:%M}.\n\nCommand: `{cmd}`\n")
    (out / "results.md").write_text(md)
    print("\n" + md)
    return df


@report_user_errors
def main(argv: list[str] | None = None) -> pd.DataFrame:
    return run(parse_opt(argv))


if __name__ == "__main__":
    main()
