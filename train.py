"""Train a YOLOv5 or YOLOv5-SPD detector on a YOLO-format dataset.

Usage:
    python train.py                       # yolov5n-spd on the offline small-object set (generated on first use)
    python train.py --data coco128.yaml --cfg yolov5s-spd.yaml --weights '' --batch-size 16
    python train.py --data coco128.yaml --weights yolov5n.pt --cfg yolov5n-spd.yaml   # exact SPD transfer
    python -m torch.distributed.run --nproc_per_node 2 train.py --device 0,1 --batch-size 64
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from models.checkpoints import read_checkpoint, safe_load  # noqa: E402
from models.yolo import Model, load_cfg  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from utils.autobatch import autobatch  # noqa: E402
from utils.checkpoints import atomic_save, make_checkpoint, resolve_weights  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.datasets import create_dataloader  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.checks import check_freeze, check_loader_args, check_resume_nc  # noqa: E402
from utils.files import check_writable, claim_run_dir, increment_path  # noqa: E402
from utils.logging import RESULT_KEYS, ResultsLogger, WarningsOnly, colorstr  # noqa: E402
from utils.loss import ComputeLoss, scale_loss_gains  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.optim import (  # noqa: E402
    EarlyStopping, ModelEMA, linear_lr, one_cycle, smart_optimizer, warmup, warmup_iterations, warmup_warning,
)
from utils.plots import plot_images, plot_labels, plot_results  # noqa: E402
from utils.sampling import labels_to_class_weights, labels_to_image_weights  # noqa: E402
from utils.torch_utils import (  # noqa: E402
    LOCAL_RANK, RANK, WORLD_SIZE, check_img_size, ddp_rank_summary, de_parallel, describe_transfer, init_seeds,
    intersect_dicts, select_device, torch_distributed_zero_first,
)

HYPS_DIR = ROOT / "data" / "hyps"
DEFAULT_CFG = "yolov5n-spd.yaml"  # what `python train.py` trains when neither --cfg nor --weights is given
DEFAULT_DATA = "smallobjects.yaml"
STANDARD_DEFAULTS = {"epochs": 100, "imgsz": 320, "hyp": "hyp.scratch-low.yaml", "optimizer": "SGD"}
# `python train.py` alone: a from-scratch run that shows a working detector on a 2-core CPU within minutes
# (README, quick start); each option given on the command line still wins
DEMO_DEFAULTS = {"epochs": 20, "imgsz": 128, "hyp": "hyp.smallobjects.yaml", "optimizer": "AdamW"}
MAX_BAD_STEPS = 10  # consecutive non-finite losses before a run is stopped


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM during training: last.pt is saved, then the run exits with a resume hint."""


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


def build_model(opt: argparse.Namespace, hyp: dict, nc: int, device: torch.device, resume_ckpt: dict | None):
    """The model to train: from a config, from weights (their own architecture unless --cfg names another), or
    from plain weights transferred into an SPD, SPDConv or P2 variant."""
    verbose = RANK in {-1, 0}
    if resume_ckpt is not None:
        check_resume_nc(resume_ckpt["cfg"].get("nc", nc), nc, opt.weights, opt.data)
        model = Model(resume_ckpt["cfg"], ch=3, nc=nc, verbose=verbose).to(device)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in resume_ckpt["model"].items()})
        return model
    weights = str(opt.weights).strip()
    if not weights:
        return Model(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=verbose).to(device)

    path = resolve_weights(weights)
    info = read_checkpoint(path)
    cfg = opt.cfg or info["cfg"]
    model = Model(cfg, ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=verbose).to(device)
    from models.spd import transfer_plain_weights, wants_transfer

    exclude = ["anchor"] if (opt.cfg or hyp.get("anchors")) else []
    exact = True
    if opt.cfg and wants_transfer(info["cfg"], load_cfg(opt.cfg)):  # SPD, SPDConv or P2 variant of plain weights
        state, _, exact = transfer_plain_weights(path, load_cfg(opt.cfg), nc=nc, verbose=False)
        exclude = ["anchor"] if hyp.get("anchors") else []
    else:
        state = info["state_dict"]
    csd = intersect_dicts(state, model.state_dict(), exclude=exclude)
    model.load_state_dict(csd, strict=False)
    target = Path(str(opt.cfg)).name if opt.cfg else f"its own architecture ({info['cfg'].get('yaml_file') or 'from the weights'})"
    print(describe_transfer(csd, model.state_dict(), source=Path(weights).name, target=target,
                            detect_prefix=f"model.{len(model.model) - 1}.", nc_from=len(info["names"]), nc_to=nc,
                            exact=exact))
    return model


def save_opt(save_dir: Path, opt: argparse.Namespace) -> None:
    (save_dir / "opt.yaml").write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}, sort_keys=False))


def train(hyp: dict, opt: argparse.Namespace, device: torch.device) -> tuple:
    save_dir, epochs, batch_size = Path(opt.save_dir), opt.epochs, opt.batch_size
    w = save_dir / "weights"
    last, best = w / "last.pt", w / "best.pt"
    main_rank = RANK in {-1, 0}
    if main_rank:
        w.mkdir(parents=True, exist_ok=True)
        claim_run_dir(save_dir)  # before anything is written: a second live run into this folder is refused
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
        save_opt(save_dir, opt)
    print(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))

    init_seeds(opt.seed + 1 + RANK, deterministic=True)
    with torch_distributed_zero_first(LOCAL_RANK):
        # on --resume the dataset name comes from a file, not from the user: never run its download step
        data_dict = check_dataset(opt.data, autodownload=not opt.resume)
    train_path, val_path = data_dict["train"], data_dict["val"]
    nc = 1 if opt.single_cls else int(data_dict["nc"])
    names = {0: "item"} if opt.single_cls and len(data_dict["names"]) != 1 else dict(data_dict["names"])

    resume_ckpt = safe_load(opt.weights) if opt.resume else None
    model = build_model(opt, hyp, nc, device, resume_ckpt)
    amp = device.type == "cuda"

    check_freeze(opt.freeze, len(model.model))
    freeze = [f"model.{x}." for x in (opt.freeze if len(opt.freeze) > 1 else range(opt.freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = True
        if any(x in k for x in freeze):
            print(f"freezing {k}")
            v.requires_grad = False

    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    if batch_size == -1:  # YOLOv5's AutoBatch
        batch_size = opt.batch_size = autobatch(model, imgsz, amp=amp)
        if main_rank:
            save_opt(save_dir, opt)  # --resume continues with the batch size chosen here
    val_batch = batch_size // WORLD_SIZE * 2

    nbs = 64  # nominal batch size: gradients accumulate up to it and weight decay scales with it
    accumulate = max(round(nbs / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / nbs
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    lf = one_cycle(1, hyp["lrf"], epochs) if opt.cos_lr else linear_lr(hyp["lrf"], epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model) if main_rank else None

    start_epoch, best_fitness = 0, 0.0
    if resume_ckpt is not None:
        if resume_ckpt.get("optimizer"):
            optimizer.load_state_dict(resume_ckpt["optimizer"])
        if ema and resume_ckpt.get("ema"):
            ema.ema.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in resume_ckpt["ema"].items()})
            ema.updates = int(resume_ckpt.get("updates") or 0)
        best_fitness = float(resume_ckpt.get("best_fitness") or 0.0)
        start_epoch = int(resume_ckpt["epoch"]) + 1
        if start_epoch >= epochs:
            raise UserError(f"{opt.weights} has already trained {start_epoch} of {epochs} epochs: nothing to resume")
        print(f"Resuming training from {opt.weights} at epoch {start_epoch} of {epochs}")

    if RANK != -1 and opt.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        print("Using SyncBatchNorm()")

    train_loader, dataset = create_dataloader(
        train_path, imgsz, batch_size // WORLD_SIZE, gs, opt.single_cls, hyp=hyp, augment=True, cache=opt.cache,
        rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers, image_weights=opt.image_weights, quad=opt.quad,
        prefix=colorstr("train: "), shuffle=True, seed=opt.seed, nc=int(data_dict["nc"]),
    )
    labels = np.concatenate([x for x in dataset.labels if len(x)], 0) if any(len(x) for x in dataset.labels) else np.zeros((0, 5))
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise UserError(f"label class {int(labels[:, 0].max())} exceeds nc={nc} in {opt.data}; possible class labels are 0-{nc - 1}")
    nb = len(train_loader)

    val_loader = None
    if main_rank:
        val_loader = create_dataloader(
            val_path, imgsz, val_batch, gs, opt.single_cls, hyp=hyp,
            cache=None if opt.noval else opt.cache, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
            prefix=colorstr("val: "), nc=int(data_dict["nc"]),
        )[0]
        if resume_ckpt is None:
            if not opt.noautoanchor:
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)
            model.half().float()  # pre-reduce anchor precision, as stored checkpoints will
            if not opt.noplots:
                plot_labels(labels, names, save_dir)

    if RANK != -1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if device.type == "cuda" else None,
                                                    output_device=LOCAL_RANK if device.type == "cuda" else None)

    m = de_parallel(model)
    nl = m.model[-1].nl
    hyp = scale_loss_gains(hyp, nl=nl, nc=nc, imgsz=imgsz)
    hyp["label_smoothing"] = opt.label_smoothing
    m.nc, m.hyp, m.names = nc, hyp, names
    m.class_weights = labels_to_class_weights(dataset.labels, nc).to(device) * nc

    t0 = time.time()
    nw = warmup_iterations(hyp["warmup_epochs"], nb)
    if main_rank and (msg := warmup_warning(nw, (epochs - start_epoch) * nb)):
        print(msg)
    last_opt_step = -1
    maps = np.zeros(nc)
    results = (0.0,) * 10
    scheduler.last_epoch = start_epoch - 1
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    stopper, stop = EarlyStopping(patience=opt.patience), False
    compute_loss = ComputeLoss(model)
    logger = ResultsLogger(save_dir, start_epoch=start_epoch, tensorboard=main_rank) if main_rank else None
    bad_steps = 0
    trained_batches = 0  # this rank's, for the DDP summary
    # BatchNorm statistics change in the forward pass, before the loss is known: keep the last good ones
    # so a step that is skipped for a NaN/inf loss cannot leave NaN running means behind
    bn_buffers = list(de_parallel(model).buffers())
    good_buffers = [b.detach().clone() for b in bn_buffers]

    def checkpoint(epoch: int) -> dict:
        return make_checkpoint(
            de_parallel(model), ema.ema, epoch=epoch, best_fitness=float(best_fitness), updates=ema.updates,
            optimizer=optimizer.state_dict(), opt={k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()},
            hyp=hyp, val={"batch_size": val_batch, "imgsz": imgsz, "single_cls": bool(opt.single_cls)},
        )

    saving, pending_signal, saved_epoch = False, "", -1

    def save(epoch: int, fit: float, final: bool = False) -> None:
        nonlocal saving, saved_epoch
        saving = True  # signals wait until the files are written (see on_signal)
        try:
            ckpt = checkpoint(epoch)
            atomic_save(ckpt, last)
            if best_fitness == fit:
                atomic_save(ckpt, best)
            if opt.save_period > 0 and epoch % opt.save_period == 0 and not final:
                atomic_save(ckpt, w / f"epoch{epoch}.pt")
            saved_epoch = epoch
        finally:
            saving = False
        if pending_signal:
            raise TrainingInterrupted(pending_signal)

    def on_signal(signum, frame):
        nonlocal pending_signal
        # raised inside torch.save, the interrupt would be replaced by the zip writer's own error on
        # unwinding: while a checkpoint is written, it is only noted and raised right after
        if saving:
            pending_signal = signal.Signals(signum).name
            return
        raise TrainingInterrupted(signal.Signals(signum).name)

    def skip_step(why: str, epoch: int, i: int) -> None:
        """Drop this step's gradients and BatchNorm updates; stop after MAX_BAD_STEPS in a row."""
        nonlocal bad_steps
        bad_steps += 1
        optimizer.zero_grad()
        torch._foreach_copy_(bn_buffers, good_buffers)
        print(f"\nWARNING: {why} at epoch {epoch} batch {i}: step skipped ({bad_steps} in a row)")
        if bad_steps >= MAX_BAD_STEPS:
            raise UserError(f"{MAX_BAD_STEPS} non-finite losses or gradients in a row: stopping; the last good "
                            f"checkpoint is {last if last.exists() else 'not written yet'}. Try a lower --hyp lr0")

    if main_rank and resume_ckpt is None and not opt.nosave:
        atomic_save(checkpoint(-1), last)  # a run killed in its first epoch can still be resumed

    epoch = start_epoch
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_rank else {}
    try:
        # printed once last.pt exists and Ctrl-C saves it: from here on a run can always be resumed
        print(f"Image sizes {imgsz} train, {imgsz} val\nUsing {train_loader.num_workers * WORLD_SIZE} dataloader workers\n"
              f"Logging results to {colorstr('bold', str(save_dir))}\nStarting training for {epochs} epochs...")
        for epoch in range(start_epoch, epochs):
            model.train()
            if opt.image_weights:
                cw = m.class_weights.cpu().numpy() * (1 - maps) ** 2 / nc
                iw = labels_to_image_weights(dataset.labels, nc=nc, class_weights=cw)
                dataset.indices = random.choices(range(dataset.n), weights=iw, k=dataset.n)
            mloss = torch.zeros(3, device=device)
            if RANK != -1:
                train_loader.sampler.set_epoch(epoch)
            pbar = enumerate(train_loader)
            print(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
            if main_rank:
                pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
            optimizer.zero_grad()
            for i, (imgs, targets, paths, _) in pbar:
                ni = i + nb * epoch
                imgs = imgs.to(device, non_blocking=True).float() / 255
                if nw and ni <= nw:
                    accumulate = warmup(ni, nw, epoch, lf, optimizer, hyp, nbs, batch_size)
                if opt.multi_scale:
                    sz = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
                    sf = sz / max(imgs.shape[2:])
                    if sf != 1:
                        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
                        imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)

                with torch.autocast(device_type=device.type, enabled=amp):
                    pred = model(imgs)
                    loss, loss_items = compute_loss(pred, targets.to(device))
                    if RANK != -1:
                        loss *= WORLD_SIZE  # DDP averages gradients across ranks
                    if opt.quad:
                        loss *= 4.0

                finite = torch.isfinite(loss.detach()).float().reshape(1)
                if RANK != -1:  # every rank must skip together, or the others would wait in backward forever
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not finite.item():  # a NaN/inf step would poison the weights: skip it
                    skip_step(f"non-finite loss {loss.item()}", epoch, i)
                    continue
                scaler.scale(loss).backward()

                if ni - last_opt_step >= accumulate:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                    if not amp and not torch.isfinite(norm):  # (with AMP the scaler skips such steps itself)
                        skip_step(f"non-finite gradient norm {norm.item()}", epoch, i)
                        continue
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad()
                    if ema:
                        ema.update(model)
                    last_opt_step = ni
                bad_steps = 0
                trained_batches += 1
                torch._foreach_copy_(good_buffers, bn_buffers)

                if main_rank:
                    mloss = (mloss * i + loss_items) / (i + 1)
                    mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                    pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{epochs - 1}", mem, *mloss,
                                                                         targets.shape[0], imgs.shape[-1]))
                    if ni < 3 and not opt.noplots:
                        plot_images(imgs, targets, paths, save_dir / f"train_batch{ni}.jpg", names)

            lr = [x["lr"] for x in optimizer.param_groups]
            scheduler.step()

            if main_rank:
                ema.update_attr(model, include=["yaml", "nc", "hyp", "names", "stride", "class_weights"])
                final_epoch = (epoch + 1 == epochs) or stopper.possible_stop
                if not opt.noval or final_epoch:
                    results, maps, _ = validate.run(
                        data_dict, batch_size=val_batch, imgsz=imgsz, half=amp, model=ema.ema,
                        single_cls=opt.single_cls, dataloader=val_loader, save_dir=save_dir, plots=False,
                        compute_loss=compute_loss,
                    )
                fi = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
                stop = stopper(epoch=epoch, fitness=fi)
                if fi > best_fitness:
                    best_fitness = fi
                logger.log(epoch, dict(zip(RESULT_KEYS, [*mloss.tolist(), *results, *lr])))
                if not opt.nosave or final_epoch:
                    save(epoch, fi, final=final_epoch)

            if RANK != -1:  # every rank stops together
                flag = [stop if RANK == 0 else None]
                dist.broadcast_object_list(flag, 0)
                stop = flag[0]
            if stop:
                break
    except TrainingInterrupted as e:
        for s in previous:  # a second Ctrl-C must not cut the checkpoint write below short
            signal.signal(s, signal.SIG_IGN)
        if main_rank:
            partial = epoch - 1  # the interrupted epoch is redone on resume, from these weights
            if saved_epoch != epoch and (partial >= 0 or not last.exists()):  # (else last.pt holds the whole epoch)
                atomic_save(checkpoint(partial), last)
            if logger:
                logger.close()
            print(f"\nTraining interrupted ({e}) during epoch {epoch}. Saved {last}.\n"
                  f"Resume with: python train.py --resume {last}")
        raise SystemExit(130)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    ranks = ddp_rank_summary(model, trained_batches)
    if ranks and main_rank:
        print("DDP: " + "; ".join(f"rank {r} trained {n} batches, weight sum {w:.10g}" for r, (n, w) in enumerate(ranks)))
    if main_rank:
        print(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        logger.close()
        if not opt.noplots and (save_dir / "results.csv").exists():
            plot_results(save_dir / "results.csv")
        if best.exists() and not opt.noval:
            print(f"\nValidating {best}...")
            # the training val_loader: re-scanning the split would report every bad file a second time
            results, _, _ = validate.run(data_dict, weights=best, batch_size=val_batch, imgsz=imgsz,
                                         single_cls=opt.single_cls, save_dir=save_dir, project=save_dir.parent,
                                         name=save_dir.name, exist_ok=True, plots=not opt.noplots, verbose=True,
                                         half=False, dataloader=val_loader)
        else:  # (the final validation above prints where the results are)
            print(f"Results saved to {colorstr('bold', str(save_dir))}")
        print(next_steps(save_dir, best if best.exists() else last, val_loader.dataset.im_files if val_loader else [], imgsz))
    torch.cuda.empty_cache()
    return results


def next_steps(save_dir: Path, weights: Path, val_images: list, imgsz: int) -> str:
    """Where the run's files are, and the command that draws the trained model's detections."""
    plots = sorted(p.name for p in save_dir.glob("*.png"))
    lines = [f"Weights: {weights.parent}/ ({', '.join(sorted(p.name for p in weights.parent.glob('*.pt')))})"]
    if plots:
        lines.append(f"Plots: {save_dir}/ ({', '.join(plots[:4])}{', ...' if len(plots) > 4 else ''})")
    if val_images:
        lines.append(f"See its detections: python detect.py --weights {weights} --img {imgsz} --source {val_images[0]}")
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
    opt = apply_defaults(parser.parse_args(argv))
    if opt.batch_size < 1 and opt.batch_size != -1:
        raise UserError(f"--batch-size must be at least 1 (or -1 for AutoBatch), got {opt.batch_size}")
    if opt.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {opt.epochs}")
    return opt


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


def evolve(opt: argparse.Namespace, device: torch.device) -> None:
    """Genetic search: mutate the fittest hyperparameters so far, train briefly, record fitness in evolve.csv."""
    base = load_hyp(opt.hyp)
    opt.noval, opt.nosave, opt.noplots = True, True, True
    evolve_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    csv_path = evolve_dir / "evolve.csv"
    keys = list(EVOLVE_META)
    rng = np.random.default_rng(opt.seed)
    for gen in range(opt.evolve):
        hyp = dict(base)
        if csv_path.exists():
            hist = np.loadtxt(csv_path, ndmin=2, delimiter=",", skiprows=1)
            fit = fitness(hist[:, :4])
            parents = hist[np.argsort(-fit)[: min(5, len(hist))]]
            wts = fitness(parents[:, :4]) - fitness(parents[:, :4]).min() + 1e-6
            parent = parents[rng.choice(len(parents), p=wts / wts.sum())]
            scale = np.array([EVOLVE_META[k][0] for k in keys])
            v = np.ones(len(keys))
            while np.all(v == 1):  # mutate until something changes
                v = (1 + (rng.random(len(keys)) < 0.8) * rng.standard_normal(len(keys)) * rng.random() * scale * 0.2).clip(0.3, 3.0)
            for j, k in enumerate(keys):
                hyp[k] = float(parent[10 + j] * v[j])
        for k, (_, lo, hi) in EVOLVE_META.items():
            hyp[k] = round(float(min(max(hyp[k], lo), hi)), 5)
        gen_opt = argparse.Namespace(**vars(opt))
        gen_opt.save_dir = str(evolve_dir / f"gen{gen}")
        results = train(deepcopy(hyp), gen_opt, device)
        new = not csv_path.exists()
        with open(csv_path, "a") as f:
            if new:
                f.write(",".join(["P", "R", "mAP50", "mAP50-95", "APs", "APm", "APl", "val_box", "val_obj", "val_cls", *keys]) + "\n")
            f.write(",".join(f"{x:.5g}" for x in [*results[:10], *(hyp[k] for k in keys)]) + "\n")
        print(f"Evolution generation {gen + 1}/{opt.evolve} written to {csv_path}")
    hist = np.loadtxt(csv_path, ndmin=2, delimiter=",", skiprows=1)
    best = hist[np.argmax(fitness(hist[:, :4]))]
    (evolve_dir / "hyp_evolve.yaml").write_text(yaml.safe_dump({k: float(best[10 + j]) for j, k in enumerate(keys)}, sort_keys=False))
    print(f"Best hyperparameters saved to {evolve_dir / 'hyp_evolve.yaml'}")


@report_user_errors
def main(argv: list[str] | None = None):
    opt = parse_opt(argv)
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
                print(f"Demo run: {DEFAULT_CFG} from scratch on the generated small-object set ({DEFAULT_DATA}), "
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
