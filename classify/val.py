"""Evaluate a classify/train.py checkpoint on an ImageFolder split: top-1, top-5, per-class accuracy.

Usage:
    python classify/val.py --weights runs/train-cls/exp/weights/best.pt --data ../shared/data/cifar10

Evaluates <data>/val (else <data>/test, or --split NAME); writes per_class.csv/png and
confusion_matrix.png to runs/val-cls/exp*.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `models` and `utils` import when run as a script

import torch.nn as nn  # noqa: E402

from classify.checkpoint import load_classifier  # noqa: E402
from classify.data import ClassificationDataset, build_loader, class_dirs, find_eval_split, list_samples  # noqa: E402
from classify.engine import EvalResult, evaluate, format_per_class  # noqa: E402
from classify.plots import plot_confusion, save_per_class  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.files import increment_path  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Validate a ResNet / ResNet-SPD classifier checkpoint")
    p.add_argument("--data", default="../shared/data/cifar10", help="ImageFolder root (or a split folder)")
    p.add_argument("--weights", required=True, help="checkpoint from classify/train.py")
    p.add_argument("--split", default=None, help="split folder to evaluate (default: val, else test)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None, help="default: the training size")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--verbose", action="store_true", help="print per-class accuracy")
    p.add_argument("--project", default="runs/val-cls")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    return p.parse_args(argv)


def run(
    weights: str | Path,
    data: str | Path,
    split: str | None = None,
    batch_size: int = 128,
    imgsz: int | None = None,
    device: str = "",
    workers: int = 8,
    verbose: bool = False,
    save_dir: Path | None = None,
) -> EvalResult:
    """Evaluate `weights` on a split of `data`; plots and per_class.csv go to save_dir when given."""
    dev = select_device(device)
    model, ckpt = load_classifier(weights, dev)
    names = list(ckpt["names"])
    imgsz = imgsz or int(ckpt["imgsz"])
    if ckpt["model"].endswith("-spd") and imgsz % model.stride:
        raise UserError(f"--imgsz {imgsz} must be a multiple of {model.stride} for this {ckpt['model']} model")
    split_dir = find_eval_split(data, split)
    unknown = sorted(set(class_dirs(split_dir)) - set(names))
    if unknown:
        raise UserError(f"{split_dir} has classes the model was not trained on: {', '.join(unknown[:10])}")
    samples = list_samples(split_dir, names)
    if not samples:
        raise UserError(f"no images found in {split_dir}")
    loader = build_loader(ClassificationDataset(samples, imgsz, augment=False), batch_size, False, workers,
                          pin=dev.type == "cuda")
    LOGGER.info(f"{ckpt['model']} ({ckpt.get('stem', 'small')} stem, {len(names)} classes) on {split_dir}: "
                f"{len(samples)} images at {imgsz}x{imgsz}")
    result = evaluate(model, loader, dev, len(names), nn.CrossEntropyLoss(), desc=split_dir.name)
    LOGGER.info(f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  loss {result.loss:.4f}  ({result.n} images)")
    if verbose:
        LOGGER.info(format_per_class(result, names))
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        plot_confusion(result.confusion, names, save_dir / "confusion_matrix.png")
        save_per_class(result.per_class, result.support, names, save_dir)
        LOGGER.info(f"Results saved to {save_dir}")
    return result


@report_user_errors
def main(argv: list[str] | None = None) -> EvalResult:
    opt = parse_opt(argv)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    return run(opt.weights, opt.data, opt.split, opt.batch_size, opt.imgsz, opt.device, opt.workers,
               opt.verbose, save_dir)


if __name__ == "__main__":
    main()
