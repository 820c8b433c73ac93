"""Train a ResNet or ResNet-SPD classifier on an ImageFolder dataset (train/<class>/*, val/ or test/).

Usage:
    python classify/train.py --model resnet18-spd --data ../shared/data/cifar10 --epochs 1 --imgsz 32
    python classify/train.py --model resnet50 --data path/to/tiny-imagenet --imgsz 64 --stem imagenet

Writes runs/train-cls/exp*/: weights/last.pt and best.pt, results.csv, results.png,
confusion_matrix.png, per_class.csv/png, opt.yaml.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `models` and `utils` import when run as a script

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from classify.checkpoint import load_pretrained, make_checkpoint, plain  # noqa: E402
from classify.data import ClassificationDataset, build_loader, find_splits, list_samples  # noqa: E402
from classify.engine import evaluate, format_per_class, train_one_epoch, training_setup  # noqa: E402
from classify.plots import plot_confusion, save_per_class  # noqa: E402
from models.resnet import MODEL_NAMES, STEMS, ResNet, build_model, parse_model_name  # noqa: E402
from utils.checkpoints import atomic_save  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.files import increment_path  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.optim import OPTIMIZERS  # noqa: E402
from utils.plots import plot_results  # noqa: E402
from utils.torch_utils import count_flops, init_seeds, select_device  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a ResNet / ResNet-SPD image classifier")
    p.add_argument("--model", default="resnet18-spd", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--data", default="../shared/data/cifar10", help="ImageFolder root with train/ and val/ or test/")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=32, help="train/val image size (pixels)")
    p.add_argument("--stem", default="auto", choices=("auto", *STEMS),
                   help="small: 3x3 stride-1 conv (SPD -> 3x3 conv in -spd models); imagenet: 7x7/2 + max-pool "
                        "(SPD-Conv, no pool, in -spd models); plain-small: 3x3 stride-1 conv in every model; "
                        "focus: SPD -> 1x1 conv (the only stem of *-spd-authors); auto: small below 64 px, else imagenet")
    p.add_argument("--strided-shortcut", action="store_true",
                   help="-spd models: keep a stride-2 1x1 conv in the shortcut, as the authors' released code does")
    p.add_argument("--optimizer", default="Adam", choices=OPTIMIZERS)
    p.add_argument("--lr0", type=float, default=0.001, help="initial learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / Adam beta1")
    p.add_argument("--decay", type=float, default=5e-5, help="weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--cutoff", type=int, default=None,
                   help="keep only the first N (1-4) residual stages before the head")
    p.add_argument("--dropout", type=float, default=None, help="dropout before the classifier (0-1)")
    p.add_argument("--pretrained", nargs="?", const="torchvision", default=None,
                   help="initial weights: a checkpoint or torchvision .pth file; bare flag: torchvision ImageNet")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers (capped by CPU count)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--project", default="runs/train-cls", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--verbose", action="store_true", help="per-class accuracy after every epoch")
    return p.parse_args(argv)


def resolve_stem(stem: str, imgsz: int) -> str:
    """'auto' -> 'small' for images under 64 px (CIFAR), 'imagenet' from 64 px (Tiny ImageNet, the paper's layout)."""
    return ("small" if imgsz < 64 else "imagenet") if stem == "auto" else stem


def check_opt(opt: argparse.Namespace) -> None:
    """Reject bad numbers up front with one line each, before any data is read."""
    try:
        parse_model_name(opt.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    for name, value, lo in (("epochs", opt.epochs, 1), ("batch-size", opt.batch_size, 1), ("imgsz", opt.imgsz, 8)):
        if value < lo:
            raise UserError(f"--{name} must be at least {lo}, got {value}")
    if opt.cutoff is not None and not 1 <= opt.cutoff <= 4:
        raise UserError(f"--cutoff must be 1-4 (residual stages kept), got {opt.cutoff}")
    if opt.dropout is not None and not 0 <= opt.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {opt.dropout}")
    if not 0 <= opt.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {opt.label_smoothing}")
    if opt.lr0 <= 0:
        raise UserError(f"--lr0 must be positive, got {opt.lr0}")


def build_from_opt(opt: argparse.Namespace, nc: int) -> ResNet:
    stem = resolve_stem(opt.stem, opt.imgsz)
    model = build_model(opt.model, nc, stem=stem, spd_shortcut=not opt.strided_shortcut,
                        dropout=opt.dropout or 0.0, stages=opt.cutoff or 4)
    _, spd = parse_model_name(opt.model)
    if spd and opt.imgsz % model.stride:  # in -spd models every halving is an SPD layer, which needs even sizes
        raise UserError(f"--imgsz {opt.imgsz} must be a multiple of {model.stride} for {opt.model} "
                        f"with the {stem} stem (each SPD layer halves an even size)")
    return model


def train(opt: argparse.Namespace) -> dict:
    """Run a full training; returns {'save_dir', 'best', 'last', 'top1', 'top5'} for callers and tests."""
    check_opt(opt)
    init_seeds(opt.seed, deterministic=True)
    device = select_device(opt.device, opt.batch_size)
    splits = find_splits(opt.data)
    names, nc = splits.names, len(splits.names)
    model = build_from_opt(opt, nc)
    if opt.pretrained:
        LOGGER.info(load_pretrained(model, opt.pretrained))
    model = model.to(device)

    train_set = ClassificationDataset(list_samples(splits.train, names), opt.imgsz, augment=True)
    val_set = ClassificationDataset(list_samples(splits.val, names), opt.imgsz, augment=False)
    if not len(train_set) or not len(val_set):
        raise UserError(f"no images found in {splits.train if not len(train_set) else splits.val}")
    pin = device.type == "cuda"
    train_loader = build_loader(train_set, opt.batch_size, True, opt.workers, opt.seed, pin)
    val_loader = build_loader(val_set, opt.batch_size * 2, False, opt.workers, opt.seed, pin)

    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    wdir = save_dir / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    (save_dir / "opt.yaml").write_text(yaml.safe_dump(plain(vars(opt)), sort_keys=False))

    n_params = sum(p.numel() for p in model.parameters())
    gflops = count_flops(model, opt.imgsz)
    LOGGER.info(f"{opt.model} ({model.cfg['stem']} stem): {n_params:,} parameters, "
                f"{gflops:.2f} GFLOPs at {opt.imgsz}x{opt.imgsz}")
    LOGGER.info(f"data: {splits.root} - {nc} classes, {len(train_set)} train images, {len(val_set)} {splits.val_name} images")

    optimizer, scheduler, ema, criterion = training_setup(model, opt.epochs, opt.optimizer, opt.lr0, opt.momentum,
                                                          opt.decay, opt.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    last, best = wdir / "last.pt", wdir / "best.pt"
    rows, best_fitness, best_res = [], -1.0, None
    t0 = time.time()
    LOGGER.info(f"Training {opt.model} for {opt.epochs} epochs on {device}; results to {save_dir}")
    for epoch in range(opt.epochs):
        lr = optimizer.param_groups[0]["lr"]
        try:
            tloss = train_one_epoch(model, train_loader, optimizer, criterion, device, ema, scaler,
                                    desc=f"{epoch + 1}/{opt.epochs}")
        except FloatingPointError as e:
            raise UserError(str(e)) from None
        scheduler.step()
        res = evaluate(ema.ema, val_loader, device, nc, criterion, desc=splits.val_name)
        rows.append({"epoch": epoch, "train/loss": tloss, "val/loss": res.loss, "metrics/accuracy_top1": res.top1,
                     "metrics/accuracy_top5": res.top5, "lr/0": lr})
        pd.DataFrame(rows).to_csv(save_dir / "results.csv", index=False)
        LOGGER.info(f"epoch {epoch + 1}/{opt.epochs}: train loss {tloss:.4f}  {splits.val_name} loss {res.loss:.4f}  "
                    f"top1 {res.top1:.4f}  top5 {res.top5:.4f}")
        if opt.verbose:
            LOGGER.info(format_per_class(res, names))
        ckpt = make_checkpoint(ema.ema, names, opt.imgsz, epoch, max(best_fitness, res.top1), optimizer,
                               vars(opt), ema.updates)
        atomic_save(ckpt, last)  # a kill mid-write leaves the previous epoch's file, never a torn one
        if best_res is None or res.top1 > best_fitness:  # epoch 1 is kept even if its top-1 is nan
            best_fitness, best_res = res.top1, res
            atomic_save(ckpt, best)

    # best.pt keeps no optimizer state (it is for use, not for resuming); its scores are those of its epoch,
    # measured above with the very weights it holds, so no second pass over the val split is needed
    best_ckpt = torch.load(best, map_location="cpu", weights_only=True)
    best_ckpt["optimizer"] = None
    atomic_save(best_ckpt, best)
    final = best_res
    LOGGER.info(f"\nTraining complete ({(time.time() - t0) / 3600:.3f} hours)")
    LOGGER.info(f"Best {splits.val_name} top-1 {final.top1:.4f}, top-5 {final.top5:.4f} (epoch {best_ckpt['epoch'] + 1})")
    LOGGER.info(format_per_class(final, names))
    plot_results(save_dir / "results.csv")
    plot_confusion(final.confusion, names, save_dir / "confusion_matrix.png")
    save_per_class(final.per_class, final.support, names, save_dir)
    LOGGER.info(f"Results saved to {save_dir}\n"
                f"Validate: python classify/val.py --weights {best} --data {opt.data} --imgsz {opt.imgsz}\n"
                f"Predict:  python classify/predict.py --weights {best} --source path/to/image.jpg")
    return {"save_dir": save_dir, "best": best, "last": last, "top1": final.top1, "top5": final.top5}


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    return train(parse_opt(argv))


if __name__ == "__main__":
    main()
