"""Train a YOLOv5 or YOLOv5-SPD detector on a YOLO-format dataset.

Usage:
    python train.py                       # yolov5n-spd on the offline small-object set (generated on first use)
    python train.py --data coco128.yaml --cfg yolov5s-spd.yaml --weights '' --batch-size 16
    python train.py --data coco128.yaml --weights yolov5n.pt --cfg yolov5n-spd.yaml   # exact SPD transfer
    python -m torch.distributed.run --nproc_per_node 2 train.py --device 0,1 --batch-size 64
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from utils.slicing import parse_slice_size  # noqa: E402
from engine.guards import CheckpointWriter, StepGuard, TrainingInterrupted  # noqa: E402
from engine.state import TrainState, build_train_state, checkpoint, strip_checkpoint  # noqa: E402
from engine.trainer import epoch_rng, reweight_images, train_one_epoch  # noqa: E402
from models.checkpoints import safe_load  # noqa: E402
from utils.checkpoints import atomic_save  # noqa: E402
from utils.checks import check_loader_args  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.files import check_writable, claim_run_dir, increment_path  # noqa: E402
from utils.logging import LOGGER, RESULT_KEYS, ResultsLogger, WarningsOnly, colorstr, set_verbosity  # noqa: E402
from utils.optim import EarlyStopping, warmup_warning  # noqa: E402
from utils.plots import plot_results  # noqa: E402
from utils.results import ValResult, fitness_of  # noqa: E402
from utils.sizes import SIZES_HELP, parse_sizes, size_csv_values  # noqa: E402
from utils.torch_utils import LOCAL_RANK, RANK, WORLD_SIZE, ddp_rank_summary, de_parallel, init_seeds, select_device  # noqa: E402
from utils.torch_utils import torch_distributed_zero_first  # noqa: E402

HYPS_DIR = ROOT / "data" / "hyps"
DEFAULT_CFG = "yolov5n-spd.yaml"  # what `python train.py` trains when neither --cfg nor --weights is given
DEFAULT_DATA = "smallobjects.yaml"
STANDARD_DEFAULTS = {"epochs": 100, "imgsz": 320, "hyp": "hyp.scratch-low.yaml", "optimizer": "SGD"}
# `python train.py` alone: a from-scratch run that shows a working detector on a 2-core CPU within minutes
# (README, quick start); each option given on the command line still wins
DEMO_DEFAULTS = {"epochs": 20, "imgsz": 128, "hyp": "hyp.smallobjects.yaml", "optimizer": "AdamW"}
MAX_BAD_STEPS = 10  # consecutive non-finite losses before a run is stopped


def load_hyp(hyp: str | Path | dict) -> dict:
    if isinstance(hyp, dict):
        return dict(hyp)
    p = Path(hyp)
    if not p.is_file() and (HYPS_DIR / p.name).is_file():
        p = HYPS_DIR / p.name
    if not p.is_file():
        raise UserError(f"hyperparameter file '{hyp}' not found (see {HYPS_DIR})")
    d = yaml.safe_load(p.read_text()) or {}
    required = {"lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "box",
                "cls", "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma", "hsv_h", "hsv_s", "hsv_v", "degrees",
                "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste"}
    missing, unknown = required - set(d), set(d) - required - {"anchors", "label_smoothing"}
    if missing or unknown:
        raise UserError(f"hyperparameter file {p}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return d


def save_opt(save_dir: Path, opt: argparse.Namespace) -> None:
    (save_dir / "opt.yaml").write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}, sort_keys=False))


def prepare_run_dir(save_dir: Path, hyp: dict, opt: argparse.Namespace) -> None:
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    claim_run_dir(save_dir)  # before anything is written: a second live run into this folder is refused
    (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
    save_opt(save_dir, opt)


def load_data(opt: argparse.Namespace) -> tuple[dict, dict]:
    """The dataset dict and the class names to train with."""
    with torch_distributed_zero_first(LOCAL_RANK):
        # on --resume the dataset name comes from a file, not from the user: never run its download step
        data = check_dataset(opt.data, autodownload=not opt.resume)
    names = {0: "item"} if opt.single_cls and len(data["names"]) != 1 else dict(data["names"])
    return data, names


def end_of_epoch(state: TrainState, epoch: int, mloss: torch.Tensor, lr: list[float], results: ValResult,
                 opt: argparse.Namespace, stopper: EarlyStopping, logger: ResultsLogger, writer: CheckpointWriter) -> tuple[ValResult, bool]:
    """On the saving rank: validate the EMA, log the row, keep best.pt; returns (results, stop)."""
    state.ema.update_attr(state.model, include=["yaml", "nc", "hyp", "names", "stride", "class_weights"])
    final_epoch = (epoch + 1 == opt.epochs) or stopper.possible_stop
    sizes = parse_sizes(getattr(opt, "sizes", "coco"))
    if not opt.noval or final_epoch:
        results = evaluate(state.ema.ema, state.val_loader, state.nc, state.names, single_cls=opt.single_cls,
                           amp=state.amp, compute_loss=state.compute_loss, sizes=sizes, slicing=state.slicing,
                           imgsz=state.imgsz)
        state.maps = results.maps
    fi = results.fitness
    stop = stopper(epoch=epoch, fitness=fi)
    if fi > state.best_fitness:
        state.best_fitness = fi
    values = {**dict(zip(RESULT_KEYS[:3], mloss.tolist())), **results.csv_values(), **dict(zip(RESULT_KEYS[-3:], lr))}
    # the --sizes bins after YOLOv5's columns, so readers that go by column position still find theirs
    logger.log(epoch, {**{k: values[k] for k in RESULT_KEYS}, **size_csv_values(sizes, results.sizes)})
    if not opt.nosave or final_epoch:
        writer.save(epoch, is_best=state.best_fitness == fi, final=final_epoch)
    return results, stop


def run_epochs(state: TrainState, opt: argparse.Namespace, save_dir: Path, writer: CheckpointWriter) -> tuple[ValResult, int, int]:
    """The epoch loop; returns (last validation results, last epoch, batches trained on this rank)."""
    main_rank = RANK in {-1, 0}
    guard = StepGuard(de_parallel(state.model), state.optimizer, MAX_BAD_STEPS, writer.last)
    stopper = EarlyStopping(patience=opt.patience)
    logger = ResultsLogger(save_dir, start_epoch=state.start_epoch, tensorboard=main_rank) if main_rank else None
    results, epoch, trained = ValResult(), state.start_epoch, 0
    try:
        # printed once last.pt exists and Ctrl-C saves it: from here on a run can always be resumed
        tiles = f" (random {state.dataset.slice_size}-px tiles; sliced validation)" if state.slicing else ""
        LOGGER.info(f"Image sizes {state.imgsz} train, {state.imgsz} val{tiles}\n"
                    f"Using {state.train_loader.num_workers * WORLD_SIZE} dataloader workers\n"
                    f"Logging results to {colorstr('bold', str(save_dir))}\nStarting training for {opt.epochs} epochs...")
        for epoch in range(state.start_epoch, opt.epochs):
            rng = epoch_rng(opt.seed, epoch)
            if opt.image_weights:
                reweight_images(state, rng)
            state.train_loader.set_epoch(epoch)  # shuffle and augmentation seeded by (seed, epoch): resumable
            mloss, n = train_one_epoch(state, epoch, guard, rng=rng, multi_scale_on=opt.multi_scale, quad=opt.quad,
                                       plots_dir=None if opt.noplots else save_dir, show_progress=main_rank)
            trained += n
            lr = [x["lr"] for x in state.optimizer.param_groups]  # the rates this epoch trained with
            state.scheduler.step()
            stop = False
            if main_rank:
                results, stop = end_of_epoch(state, epoch, mloss, lr, results, opt, stopper, logger, writer)
            if RANK != -1:  # every rank stops together
                flag = [stop if RANK == 0 else None]
                dist.broadcast_object_list(flag, 0)
                stop = flag[0]
            if stop:
                break
    except TrainingInterrupted as e:
        if main_rank:
            writer.save_interrupted(epoch)
            logger.close()
            LOGGER.info(f"\nTraining interrupted ({e}) during epoch {epoch}. Saved {writer.last}.\n"
                        f"Resume with: python train.py --resume {writer.last}")
        raise SystemExit(130)
    if logger:
        logger.close()
    return results, epoch, trained


def finish(state: TrainState, opt: argparse.Namespace, save_dir: Path, data: dict, results: ValResult,
           writer: CheckpointWriter) -> ValResult:
    """After the last epoch: halve the final checkpoints, plot, validate best.pt, say what to do next."""
    last, best = writer.last, writer.best
    for f in (last, best):
        if f.exists():
            strip_checkpoint(f)
    if not opt.noplots and (save_dir / "results.csv").exists():
        plot_results(save_dir / "results.csv")
    if best.exists() and not opt.noval:
        LOGGER.info(f"\nValidating {best}...")
        # the training val_loader: re-scanning the split would report every bad file a second time
        results = validate.run(data, weights=best, batch_size=state.val_batch, imgsz=state.imgsz,
                               single_cls=opt.single_cls, project=save_dir.parent, name=save_dir.name, exist_ok=True,
                               plots=not opt.noplots, verbose=True, half=False, dataloader=state.val_loader,
                               slice=state.slicing, sizes=getattr(opt, "sizes", "coco"))
    else:  # (the final validation above prints where the results are)
        LOGGER.info(f"Results saved to {colorstr('bold', str(save_dir))}")
    LOGGER.info(next_steps(save_dir, best if best.exists() else last,
                           state.val_loader.dataset.im_files if state.val_loader else [], state.imgsz,
                           state.dataset.slice_size))
    return results


def train(hyp: dict, opt: argparse.Namespace, device: torch.device) -> ValResult:
    """One training run into opt.save_dir; returns the final validation results."""
    save_dir, main_rank = Path(opt.save_dir), RANK in {-1, 0}
    if main_rank:
        prepare_run_dir(save_dir, hyp, opt)
    LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
    init_seeds(opt.seed + 1 + RANK, deterministic=True)
    data, names = load_data(opt)
    resume_ckpt = safe_load(opt.weights) if opt.resume else None

    def chosen_batch_size(b: int) -> None:  # --resume continues with the batch size AutoBatch chose
        opt.batch_size = b
        if main_rank:
            save_opt(save_dir, opt)

    state = build_train_state(opt, hyp, data, names, device, save_dir, resume_ckpt, on_batch_size=chosen_batch_size)
    t0 = time.time()
    if main_rank and (msg := warmup_warning(state.nw, (opt.epochs - state.start_epoch) * state.nb)):
        LOGGER.warning(msg.removeprefix("WARNING: "))
    writer = CheckpointWriter(save_dir / "weights", lambda e: checkpoint(state, e, opt), opt.save_period)
    if main_rank and resume_ckpt is None and not opt.nosave:
        atomic_save(checkpoint(state, -1, opt), writer.last)  # a run killed in its first epoch can still be resumed
    with writer if main_rank else contextlib.nullcontext():
        results, epoch, trained = run_epochs(state, opt, save_dir, writer)

    ranks = ddp_rank_summary(state.model, trained)
    if ranks and main_rank:
        LOGGER.info("DDP: " + "; ".join(f"rank {r} trained {n} batches, weight sum {w:.10g}" for r, (n, w) in enumerate(ranks)))
    if main_rank:
        LOGGER.info(f"\n{epoch - state.start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        results = finish(state, opt, save_dir, data, results, writer)
    torch.cuda.empty_cache()
    return results


def next_steps(save_dir: Path, weights: Path, val_images: list, imgsz: int, tile: int | None = None) -> str:
    """Where the run's files are, and the command that draws the trained model's detections."""
    plots = sorted(p.name for p in save_dir.glob("*.png"))
    lines = [f"Weights: {weights.parent}/ ({', '.join(sorted(p.name for p in weights.parent.glob('*.pt')))})"]
    if plots:
        lines.append(f"Plots: {save_dir}/ ({', '.join(plots[:4])}{', ...' if len(plots) > 4 else ''})")
    if val_images:
        sliced = f" --slice {tile}" if tile else ""
        lines.append(f"See its detections: python detect.py --weights {weights} --img {imgsz}{sliced} --source {val_images[0]}")
    return "\n".join(lines)


def is_demo_run(opt: argparse.Namespace) -> bool:
    """`python train.py` without --data, --cfg or --weights: the built-in demo."""
    return opt.data == DEFAULT_DATA and not opt.cfg and not str(opt.weights).strip()


def apply_defaults(opt: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left out: YOLOv5's defaults, or the demo's where the demo run is asked for."""
    defaults = DEMO_DEFAULTS if is_demo_run(opt) else STANDARD_DEFAULTS
    for k, v in defaults.items():
        if getattr(opt, k) is None:
            setattr(opt, k, v)
    return opt


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="", help="initial weights path ('' trains from scratch)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml (default: the weights' own architecture; "
                        f"{DEFAULT_CFG} when training from scratch)")
    parser.add_argument("--data", type=str, default=DEFAULT_DATA, help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default=None, help="hyperparameters path (default hyp.scratch-low.yaml)")
    parser.add_argument("--epochs", type=int, default=None, help="total training epochs (default 100)")
    parser.add_argument("--batch-size", "--batch", type=int, default=16, help="total batch size for all GPUs, -1 for AutoBatch")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=None, help="train, val image size (pixels, default 320)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training (or this last.pt)")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    parser.add_argument("--evolve", type=int, nargs="?", const=300, help="evolve hyperparameters for x generations")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    parser.add_argument("--image-weights", action="store_true", help="use weighted image selection for training")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default=None, help="optimizer (default SGD)")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--project", default=ROOT / "runs/train", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--quad", action="store_true", help="quad dataloader")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    parser.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--seed", type=int, default=0, help="global training seed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the distributed launcher")
    parser.add_argument("--quiet", action="store_true", help="print only warnings, errors, progress and results")
    parser.add_argument("--sizes", nargs="+", default=["coco"], help=f"object-size bins for AP/AR by size: {SIZES_HELP}")
    g = parser.add_argument_group("slice-aided training (small objects in large images)")
    g.add_argument("--slice", default=None, metavar="SIZE",
                   help="train on random SIZE x SIZE tiles (original pixels) resized to --img; 'auto': tiles of --img")
    g.add_argument("--slice-min-visibility", type=float, default=0.5,
                   help="keep a box cut by the tile edge when at least this share of it is inside")
    g.add_argument("--slice-empty", type=float, default=0.1, help="share of tiles without objects that are kept")
    opt = apply_defaults(parser.parse_args(argv))
    parse_sizes(opt.sizes)  # a bad value stops the run before anything is written
    check_train_slicing(opt)
    if opt.batch_size < 1 and opt.batch_size != -1:
        raise UserError(f"--batch-size must be at least 1 (or -1 for AutoBatch), got {opt.batch_size}")
    if opt.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {opt.epochs}")
    return opt


def check_train_slicing(opt: argparse.Namespace) -> None:
    """One clear line for --slice settings that cannot work (the stride check needs the model: engine.state)."""
    if parse_slice_size(opt.slice) is None:
        return
    if opt.rect:
        raise UserError("--slice trains on square random tiles: it cannot be combined with --rect")
    if not 0 < opt.slice_min_visibility <= 1:
        raise UserError(f"--slice-min-visibility must be in (0, 1], got {opt.slice_min_visibility}")
    if not 0 <= opt.slice_empty <= 1:
        raise UserError(f"--slice-empty must be in [0, 1], got {opt.slice_empty}")


def find_last_run(search_dir: Path = ROOT / "runs") -> Path:
    runs = sorted(search_dir.glob("**/last.pt"), key=os.path.getmtime)
    if not runs:
        raise UserError(f"--resume: no last.pt found under {search_dir}; pass the path: --resume path/to/last.pt")
    return runs[-1]


def resolve_resume(opt: argparse.Namespace) -> argparse.Namespace:
    """Restore a run's own options from its opt.yaml so --resume continues exactly that run."""
    last = Path(opt.resume) if isinstance(opt.resume, str) else find_last_run()
    if not last.is_file():
        raise UserError(f"--resume: {last} not found")
    run_dir = last.parent.parent
    opt_yaml = run_dir / "opt.yaml"
    saved = yaml.safe_load(opt_yaml.read_text()) if opt_yaml.is_file() else None
    if saved is None:
        saved = dict(safe_load(last).get("opt") or {})
    if not isinstance(saved, dict) or not saved:
        raise UserError(f"--resume: {last} has no training options saved with it")
    # options come from a file that may not be the user's: plain values only (a dataset dict could
    # smuggle in a download snippet)
    plain = (str, int, float, bool, type(None))
    bad = [k for k, v in saved.items() if not (isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v)))]
    if bad:
        raise UserError(f"--resume: {last} holds training options that are not plain values: {', '.join(map(str, bad))}")
    keep = {"device": opt.device, "workers": opt.workers, "local_rank": opt.local_rank}
    new = argparse.Namespace(**{**vars(parse_opt([])), **saved, **keep})
    new.resume, new.weights, new.save_dir, new.exist_ok = True, str(last), str(run_dir), True
    new.hyp = str(run_dir / "hyp.yaml") if (run_dir / "hyp.yaml").is_file() else new.hyp
    return new


# Mutation scale (0-1), lower and upper limits for --evolve
EVOLVE_META = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0), "obj_pw": (1, 0.5, 2.0),
    "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1),
    "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9), "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9),
    "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0), "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0),
    "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0), "mixup": (1, 0.0, 1.0), "copy_paste": (1, 0.0, 1.0),
}


EVOLVE_RESULT_COLUMNS = {"P": "precision", "R": "recall", "mAP50": "map50", "mAP50-95": "map", "APs": "aps",
                         "APm": "apm", "APl": "apl", "val_box": "box_loss", "val_obj": "obj_loss", "val_cls": "cls_loss"}


def read_evolve_csv(csv_path: Path) -> list[dict[str, float]]:
    """evolve.csv rows by column name, each with its fitness."""
    with open(csv_path, newline="") as f:
        rows = [{k.strip(): float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    for r in rows:
        r["fitness"] = fitness_of({field: r[col] for col, field in EVOLVE_RESULT_COLUMNS.items()})
    return rows


def mutate(base: dict, history: list[dict[str, float]], rng: np.random.Generator) -> dict:
    """A child of one of the five fittest generations so far (chosen by fitness), every gene scaled at random."""
    hyp = dict(base)
    if history:
        parents = sorted(history, key=lambda r: -r["fitness"])[:5]
        fit = np.array([r["fitness"] for r in parents])
        wts = fit - fit.min() + 1e-6
        parent = parents[rng.choice(len(parents), p=wts / wts.sum())]
        keys = list(EVOLVE_META)
        scale = np.array([EVOLVE_META[k][0] for k in keys])
        v = np.ones(len(keys))
        while np.all(v == 1):  # mutate until something changes
            v = (1 + (rng.random(len(keys)) < 0.8) * rng.standard_normal(len(keys)) * rng.random() * scale * 0.2).clip(0.3, 3.0)
        for j, k in enumerate(keys):
            hyp[k] = float(parent[k] * v[j])
    for k, (_, lo, hi) in EVOLVE_META.items():
        hyp[k] = round(float(min(max(hyp[k], lo), hi)), 5)
    return hyp


def evolve(opt: argparse.Namespace, device: torch.device) -> None:
    """Genetic search: mutate the fittest hyperparameters so far, train briefly, record fitness in evolve.csv."""
    base = load_hyp(opt.hyp)
    opt.noval, opt.nosave, opt.noplots = True, True, True
    evolve_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    csv_path = evolve_dir / "evolve.csv"
    keys = list(EVOLVE_META)
    rng = np.random.default_rng(opt.seed)
    for gen in range(opt.evolve):
        hyp = mutate(base, read_evolve_csv(csv_path) if csv_path.exists() else [], rng)
        gen_opt = argparse.Namespace(**vars(opt))
        gen_opt.save_dir = str(evolve_dir / f"gen{gen}")
        results = train(deepcopy(hyp), gen_opt, device)
        new = not csv_path.exists()
        with open(csv_path, "a") as f:
            if new:
                f.write(",".join([*EVOLVE_RESULT_COLUMNS, *keys]) + "\n")
            values = [getattr(results, field) for field in EVOLVE_RESULT_COLUMNS.values()]
            f.write(",".join(f"{x:.5g}" for x in [*values, *(hyp[k] for k in keys)]) + "\n")
        LOGGER.info(f"Evolution generation {gen + 1}/{opt.evolve} written to {csv_path}")
    best = max(read_evolve_csv(csv_path), key=lambda r: r["fitness"])
    (evolve_dir / "hyp_evolve.yaml").write_text(yaml.safe_dump({k: float(best[k]) for k in keys}, sort_keys=False))
    LOGGER.info(f"Best hyperparameters saved to {evolve_dir / 'hyp_evolve.yaml'}")


@report_user_errors
def main(argv: list[str] | None = None):
    opt = parse_opt(argv)
    set_verbosity(opt.quiet, RANK)
    if opt.resume and not opt.evolve:
        opt = resolve_resume(opt)
    elif opt.evolve and opt.resume:
        raise UserError("--resume cannot be combined with --evolve")
    check_loader_args(opt.batch_size, opt.workers, opt.quad)
    if not opt.resume:
        check_writable(opt.project)
        opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
        if not opt.cfg and not str(opt.weights).strip():
            if is_demo_run(opt):
                LOGGER.info(f"Demo run: {DEFAULT_CFG} from scratch on the generated small-object set ({DEFAULT_DATA}), "
                      f"--img {opt.imgsz}, {opt.epochs} epochs, {opt.hyp}, {opt.optimizer}. "
                      f"Train on your own data with --data X.yaml [--weights yolov5n.pt] [--cfg ...]")
            opt.cfg = DEFAULT_CFG  # `python train.py`: the SPD model on the built-in small-object set
    device = select_device(opt.device, batch_size=max(opt.batch_size, 0))
    if RANK > 0:  # in DDP only rank 0 reports; the others keep their warnings and errors
        sys.stdout = WarningsOnly(sys.stderr)
    if LOCAL_RANK != -1:
        if opt.image_weights:
            raise UserError("--image-weights is not supported with DDP training")
        if opt.batch_size == -1:
            raise UserError("--batch-size -1 (AutoBatch) works for single-device training only: give DDP a batch size")
        if opt.batch_size % WORLD_SIZE:
            raise UserError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {WORLD_SIZE}")
        if device.type == "cuda":
            torch.cuda.set_device(LOCAL_RANK)
            device = torch.device("cuda", LOCAL_RANK)
        dist.init_process_group(backend="nccl" if dist.is_nccl_available() and device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=10800))
    try:
        if opt.evolve:
            if LOCAL_RANK != -1:
                raise UserError("--evolve is not supported with DDP training")
            return evolve(opt, device)
        return train(load_hyp(opt.hyp), opt, device)
    except KeyboardInterrupt:  # Ctrl-C outside the epoch loop (which saves last.pt itself): no traceback
        print("\nInterrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if WORLD_SIZE > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
