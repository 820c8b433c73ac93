"""SPD-Conv small-object study: any list of configs under the same budget, seeds and recipe, ranked per FLOP.

Every (model config, initialisation, image size, seed) is trained by its own `train.py` process, then its
final weights are evaluated at the training size: AP, AP50 (val.py), COCO-style APs/APm/APl with object
areas in original-image pixels and again in network-input pixels, parameters, GFLOPs and CPU latency.
The run folder gets results.csv/results.md (one row per run), summary.csv/summary.md (mean ± std across
seeds per config, with its Pareto front of APs against GFLOPs), study.png (AP vs image size) and
pareto.png (APs against GFLOPs and against CPU latency, error bars across seeds). Every (config, seed) run
is kept in its own folder, so an interrupted study continues where it stopped.

Usage:
    python benchmarks/spd_study.py                           # DeepPCB, yolov5n vs yolov5n-spd, transferred, CPU
    python benchmarks/spd_study.py --scratch --device 0      # adds from-scratch rows (needs a GPU to mean anything)
    python benchmarks/spd_study.py --fraction 0.05 --val-fraction 0.1 --epochs 1 --imgsz 128   # smoke run
    python benchmarks/spd_study.py --name exp --exist-ok     # continue an interrupted study in runs/study/exp
    python benchmarks/spd_study.py --cfgs yolov5n.yaml yolov5n-spdconv.yaml yolov5n-p2.yaml --imgsz 256 --seeds 0 1 2

Initialisations: 'transferred' fine-tunes from --weights (a plain YOLOv5 checkpoint; an SPD config gets
the exact function-preserving transfer of models/spd.py, so both models start from the same function);
'scratch' trains from random weights for --scratch-epochs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from models.backends import DetectMultiBackend  # noqa: E402
from models.checkpoints import load_model, safe_load  # noqa: E402
from utils.boxes import scale_boxes, xywh2xyxy  # noqa: E402
from utils.checkpoints import resolve_weights  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.datasets import create_dataloader  # noqa: E402
from utils.labels import collect_images  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.files import increment_path  # noqa: E402
from utils.coco import COCOStyleEvaluator  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.torch_utils import count_flops, forward_times_ms, select_device  # noqa: E402

DEFAULT_DATA = "../shared/data/deeppcb/deeppcb.yaml"
DEFAULT_WEIGHTS = "../shared/weights/yolov5n.pt"
# Calibrated to a ~40-50 min default study on an idle 2-core CPU (see the README's study section): 20
# epochs of 1,000 images is ~310 optimiser steps, enough for both models to learn DeepPCB's defects
DEFAULT_IMGSZ = (192, 256)
DEFAULT_EPOCHS = 20
AREA_SMALL, AREA_LARGE = 32**2, 96**2  # COCO's area bucket limits (px^2)
METRIC_COLS = ("AP", "AP50", "APs", "APm", "APl", "APs_in", "APm_in", "APl_in")
_TERMINATED = False  # set by the SIGTERM handler so the training child gets the signal too
SETTING_KEYS = ("cfg", "init", "imgsz", "epochs", "weights", "data", "fraction", "val_fraction", "batch_size",
                "seed", "data_seed", "hyp")
SUMMARY_COLS = ("AP", "AP50", "APs", "APm", "APs_in", "GFLOPs", "cpu_ms")  # mean and std across seeds


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study; its folder name is derived from it."""

    cfg: str
    init: str  # 'transferred' or 'scratch'
    imgsz: int
    epochs: int
    weights: str  # '' for scratch
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{Path(self.cfg).stem}-{self.init}-{self.imgsz}-s{self.seed}"


# ----- set-up -------------------------------------------------------------------------------------
def plan_runs(cfgs: list[str], imgszs: list[int], weights: str, epochs: int, scratch: bool, scratch_epochs: int,
              cuda: bool, seeds: tuple[int, ...] = (0,)) -> tuple[list[RunSpec], list[str]]:
    """The runs to make and the notes explaining which initialisations were left out and why.

    Seeds vary slower than configs: a study stopped half-way has every config for the first seeds.
    """
    notes, inits = [], []
    if weights:
        inits.append(("transferred", epochs, weights))
    if scratch or not weights or cuda:
        inits.append(("scratch", scratch_epochs, ""))
        if not cuda:
            notes.append(f"From-scratch rows were trained on CPU for {scratch_epochs} epochs because they were asked "
                         "for: far too little compute for training from random weights to mean much.")
    else:
        notes.append("From-scratch rows skipped: no CUDA device here, and training from random weights needs far "
                     "more compute than a CPU gives in an hour (on a GPU they are added by default; --scratch forces them).")
    runs = [RunSpec(c, init, s, e, w, seed) for init, e, w in inits for s in imgszs for seed in seeds for c in cfgs]
    return runs, notes


def write_study_data(data: str, out_dir: Path, fraction: float, val_fraction: float, seed: int) -> tuple[Path, dict]:
    """A dataset yaml under the study folder whose splits are .txt image lists (seeded subsets if asked).

    Lists under out_dir also put the label caches there: nothing is ever written next to the dataset.
    """
    d = check_dataset(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"data": str(data), "nc": d["nc"]}
    new = {"path": str(d["path"]), "names": dict(d["names"])}
    for split, frac in (("train", fraction), ("val", val_fraction)):
        files = collect_images(d[split], prefix=f"{split}: ")
        if frac < 1:
            k = max(1, round(len(files) * frac))
            files = sorted(random.Random(seed).sample(files, k))
        lst = out_dir / f"{split}.txt"
        lst.write_text("\n".join(files) + "\n")
        new[split] = str(lst.resolve())
        info[f"n_{split}"] = len(files)
    file = out_dir / "study_data.yaml"
    file.write_text(yaml.safe_dump(new, sort_keys=False))
    return file, info


# ----- training -----------------------------------------------------------------------------------
def train_command(run: RunSpec, opt: argparse.Namespace, data_yaml: Path, study_dir: Path) -> list[str]:
    """The `train.py` command of one run. --noval: the final epoch is what gets evaluated, no test-set selection."""
    return [sys.executable, "train.py", "--data", str(data_yaml), "--cfg", run.cfg, "--weights", run.weights,
            "--imgsz", str(run.imgsz), "--epochs", str(run.epochs), "--batch-size", str(opt.batch_size),
            "--seed", str(run.seed), "--hyp", opt.hyp, "--workers", str(opt.workers), "--device", opt.device,
            "--project", str(study_dir), "--name", run.name, "--exist-ok", "--noplots", "--noval",
            *(["--cache", opt.cache] if opt.cache != "none" else [])]


def trained_epochs(last: Path) -> int:
    """Epochs completed in a last.pt; 0 for one saved by an interrupt during the first epoch, -1 if unreadable."""
    try:
        return int(safe_load(last).get("epoch", -2)) + 1
    except Exception:  # a torn or foreign file just means: train again
        return -1


def run_process(cmd: list[str], log_file: Path) -> int:
    """Run a training process; on Ctrl-C (which it receives too) or SIGTERM give it time to save last.pt."""
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            if _TERMINATED:  # a SIGTERM reached only this process: pass it on
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def run_settings(run: RunSpec, opt: argparse.Namespace) -> dict:
    return {"cfg": run.cfg, "init": run.init, "imgsz": run.imgsz, "epochs": run.epochs, "weights": run.weights,
            "data": str(opt.data), "fraction": opt.fraction, "val_fraction": opt.val_fraction,
            "batch_size": opt.batch_size, "seed": run.seed, "data_seed": opt.data_seed, "hyp": opt.hyp}


def check_settings(run_dir: Path, settings: dict) -> None:
    """Refuse to mix a reused run folder made with other settings into this study's table."""
    f = run_dir / "study_settings.json"
    if not f.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} exists but was not made by this study; use another --name or remove it")
        return
    old = json.loads(f.read_text())
    diff = [k for k in SETTING_KEYS if old.get(k) != settings.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise UserError(f"{run_dir} was trained with other settings ({detail}); use another --name or remove it")


def train_run(run: RunSpec, opt: argparse.Namespace, data_yaml: Path, study_dir: Path) -> tuple[bool, float, str]:
    """Train one run in its own process, resuming or skipping work already in its folder.

    Returns (ok, training minutes including earlier sessions, message). The output goes to train.log.
    """
    run_dir = study_dir / run.name
    done, last = run_dir / "train_done.json", run_dir / "weights" / "last.pt"
    if done.is_file():
        return True, float(json.loads(done.read_text())["train_min"]), "reused"
    prior = float(json.loads((run_dir / "train_time.json").read_text())["train_min"]) if (run_dir / "train_time.json").is_file() else 0.0
    n = trained_epochs(last) if last.is_file() else -1
    if n >= run.epochs:  # finished, but the marker was not written (stopped right at the end)
        cmd, how = None, "reused"
    elif n >= 0 and (run_dir / "opt.yaml").is_file():
        cmd = [sys.executable, "train.py", "--resume", str(last), "--workers", str(opt.workers), "--device", opt.device]
        how = f"resumed after {n} epochs"
    else:
        cmd, how = train_command(run, opt, data_yaml, study_dir), "trained"
    run_dir.mkdir(parents=True, exist_ok=True)
    minutes = prior
    if cmd:
        print(f"  {how}: {shlex.join(cmd)}\n  log: {run_dir / 'train.log'}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = run_process(cmd, run_dir / "train.log")
        finally:
            minutes = prior + (time.perf_counter() - t0) / 60
            (run_dir / "train_time.json").write_text(json.dumps({"train_min": minutes}))
        if rc == 130:
            raise KeyboardInterrupt
        if rc:
            tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
            return False, minutes, f"train.py exited with {rc}: {' | '.join(tail)[-300:]}"
    if not (run_dir / "weights" / "best.pt").is_file():
        return False, minutes, "train.py wrote no best.pt"
    done.write_text(json.dumps({"train_min": minutes}))
    return True, minutes, how


# ----- evaluation ---------------------------------------------------------------------------------
def _defined(x: float) -> float:
    """COCO reports -1 for an area bucket without ground truth: that is 'n/a', not 0."""
    return float("nan") if x < 0 else float(x)


@torch.no_grad()
def collect_detections(weights: Path, data: dict, imgsz: int, batch_size: int, device: torch.device,
                       workers: int) -> list[tuple]:
    """Per val image: (pred xyxy, scores, classes, gt xyxy, gt classes, gain), boxes in original pixels.

    Same loader, letterbox, thresholds and box mapping as val.py; gain maps original to network-input pixels.
    """
    model = DetectMultiBackend(weights, device=device, fuse=True)
    loader = create_dataloader(data["val"], imgsz, batch_size, model.stride, pad=0.5, rect=True, workers=workers,
                               prefix="val (area buckets): ", nc=int(data["nc"]))[0]
    records = []
    for im, targets, _, shapes in tqdm(loader, desc="area buckets", bar_format="{l_bar}{bar:10}{r_bar}"):
        im = im.to(device).float() / 255
        _, _, h, w = im.shape
        preds = non_max_suppression(model(im), 0.001, 0.6, multi_label=True, max_det=300)
        targets = targets.to(device)
        targets[:, 2:] *= torch.tensor((w, h, w, h), device=device)
        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:]
            shape0, ratio_pad = shapes[si]
            gt = scale_boxes(im.shape[2:], xywh2xyxy(labels[:, 1:5]), shape0, ratio_pad)
            pb = scale_boxes(im.shape[2:], pred[:, :4].clone(), shape0, ratio_pad)
            gain = float(ratio_pad[0][0])  # letterbox keeps the aspect ratio: one gain for both axes
            records.append(tuple(x.cpu() for x in (pb, pred[:, 4], pred[:, 5], gt, labels[:, 0])) + (gain,))
    return records


def bucket_aps(records: list[tuple]) -> dict[str, float]:
    """COCO-style AP/APs/APm/APl with areas in original pixels, and APs/m/l_in with areas in network-input pixels.

    IoU does not change under scaling, so only the bucket an object (or detection) falls in differs.
    """
    native, net = COCOStyleEvaluator(), COCOStyleEvaluator()
    for i, (pb, ps, pc, gt, gc, gain) in enumerate(records):
        native.update(i, pb, ps, pc, gt, gc)
        net.update(i, pb * gain, ps, pc, gt * gain, gc)
    a, b = native.summarize(), net.summarize()
    return {"AP_coco": _defined(a["AP"]), "APs": _defined(a["APs"]), "APm": _defined(a["APm"]),
            "APl": _defined(a["APl"]), "APs_in": _defined(b["APs"]), "APm_in": _defined(b["APm"]),
            "APl_in": _defined(b["APl"])}


def area_aps(weights: Path, data: dict, imgsz: int, batch_size: int, device: torch.device, workers: int) -> dict:
    """bucket_aps of one model at one size on the val split."""
    return bucket_aps(collect_detections(weights, data, imgsz, batch_size, device, workers))


def object_sizes(data: dict, imgszs: list[int]) -> dict:
    """How many val objects fall in each COCO bucket by original area, and by network-input area per size."""
    from utils.dataset import LoadImagesAndLabels

    ds = LoadImagesAndLabels(data["val"], max(imgszs), prefix="val (sizes): ", nc=int(data["nc"]))
    areas, longest = [], []
    for lb, (w0, h0) in zip(ds.labels, ds.shapes):
        areas.append(lb[:, 3] * w0 * lb[:, 4] * h0)
        longest.append(np.full(len(lb), max(w0, h0), dtype=float))
    areas = np.concatenate(areas) if areas else np.zeros(0)
    longest = np.concatenate(longest) if longest else np.ones(0)

    def counts(a: np.ndarray) -> tuple[int, int, int]:
        return int((a < AREA_SMALL).sum()), int(((a >= AREA_SMALL) & (a < AREA_LARGE)).sum()), int((a >= AREA_LARGE).sum())

    return {"original": counts(areas), **{s: counts(areas * (s / longest) ** 2) for s in imgszs}}


def cost(weights: Path, imgsz: int) -> tuple[int, float]:
    """(parameters of the trained model, GFLOPs of one fused forward pass at imgsz x imgsz)."""
    model = load_model(weights, "cpu", fuse=False)
    params = sum(p.numel() for p in model.parameters())
    return params, count_flops(model.fuse(), imgsz)


def cpu_latency_ms(weights: Path, imgsz: int, runs: int = 30, threads: int = 2) -> tuple[float, float]:
    """(median, min) ms of one batch-1 forward pass (fused, export form, no NMS) on `threads` CPU threads.

    The minimum is kept too: on a shared machine it is the better estimate of the uncontended cost.
    """
    with _torch_threads(threads):
        model = DetectMultiBackend(weights, device=torch.device("cpu"), fuse=True)
        ts = forward_times_ms(model, torch.zeros(1, 3, imgsz, imgsz), runs)
    return statistics.median(ts), min(ts)


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def remeasure_latency(rows: list[dict], runs: list[RunSpec], study_dir: Path, rounds: int, per_round: int,
                      threads: int = 2) -> None:
    """CPU latency of every evaluated run measured again, all in one sitting: `rounds` rounds that each time
    every model in turn (the order reversed every other round), so a load that came and went during a long
    study cannot separate configs. cpu_ms becomes the median of all timed passes of a run, cpu_ms_min their
    minimum; the rows and their study_row.json files are updated in place."""
    done = [(row, run) for row, run in zip(rows, runs) if row.get("status") == "ok"]
    if not done:
        return
    with _torch_threads(threads):
        models = [DetectMultiBackend(study_dir / run.name / "weights" / "best.pt", device=torch.device("cpu"), fuse=True)
                  for _, run in done]
        inputs = [torch.zeros(1, 3, run.imgsz, run.imgsz) for _, run in done]
        times: list[list[float]] = [[] for _ in done]
        loads = []
        for r in tqdm(range(rounds), desc="latency rounds"):
            order = range(len(done)) if r % 2 == 0 else reversed(range(len(done)))
            for i in order:
                times[i] += forward_times_ms(models[i], inputs[i], per_round, warmup=1)
            loads.append(os.getloadavg()[0])
    for (row, run), ts in zip(done, times):
        row.update(cpu_ms=statistics.median(ts), cpu_ms_min=min(ts), load_at_latency=statistics.median(loads))
        (study_dir / run.name / "study_row.json").write_text(json.dumps(row))


def evaluate_run(run: RunSpec, run_dir: Path, data: dict, opt: argparse.Namespace, device: torch.device) -> dict:
    best = run_dir / "weights" / "best.pt"
    t0 = time.perf_counter()
    r = validate.run(
        data, weights=best, batch_size=opt.batch_size * 2, imgsz=run.imgsz, device=device, workers=opt.workers,
        plots=False, half=False, project=run_dir, name="val", exist_ok=True,
    )
    ap50, ap = r.map50, r.map
    areas = area_aps(best, data, run.imgsz, opt.batch_size * 2, device, opt.workers)
    params, gflops = cost(best, run.imgsz)
    ms, ms_min = cpu_latency_ms(best, run.imgsz, runs=opt.latency_runs)
    return {"AP": float(ap), "AP50": float(ap50), **areas, "params": params, "GFLOPs": gflops, "cpu_ms": ms,
            "cpu_ms_min": ms_min,
            "load_at_latency": os.getloadavg()[0], "eval_s": time.perf_counter() - t0}


# ----- report -------------------------------------------------------------------------------------
def machine() -> str:
    """CPU model and core count (plus the GPU if one was used), for the table notes."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    s = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {platform.system()} {platform.release()}"
    if torch.cuda.is_available():
        s += f", GPU {torch.cuda.get_device_name(0)}"
    return s


def _fmt(v, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v / scale:.{digits}f}{unit}"


def markdown_table(df: pd.DataFrame) -> str:
    cols = ["model", "init", "imgsz", "epochs", "seed", "AP", "AP50", "APs", "APm", "APl", "APs_in", "APm_in", "params",
            "GFLOPs", "CPU ms", "train min", "device"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(cols) - 6) + ["---"]) + "|"]
    for r in df.to_dict("records"):
        vals = [r["model"], r["init"], r["imgsz"], r["epochs"], r.get("seed", 0), *(_fmt(r.get(k)) for k in METRIC_COLS[:7]),
                _fmt(r.get("params"), 2, 1e6, "M"),
                _fmt(r.get("GFLOPs"), 2), _fmt(r.get("cpu_ms"), 1), _fmt(r.get("train_min"), 1), r["device"]]
        if r["status"] != "ok":
            vals[5] = f"failed: {r['status']}"
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def write_report(df: pd.DataFrame, notes: list[str], study_dir: Path) -> str:
    summary = summarize(df)
    table = summary_table(summary)
    text = "\n".join(["# SPD-Conv study", "", "## Per config (mean ± std across seeds)", "", table, "",
                      "## Per run", "", markdown_table(df), "", "Notes:", *(f"- {n}" for n in notes), ""])
    (study_dir / "results.md").write_text(text)
    (study_dir / "summary.md").write_text("\n".join(["# SPD-Conv study: mean ± std across seeds", "", table, "",
                                                     "Notes:", *(f"- {n}" for n in notes), ""]))
    df.to_csv(study_dir / "results.csv", index=False)
    summary.to_csv(study_dir / "summary.csv", index=False)
    plot_study(summary, study_dir / "study.png")
    plot_pareto(summary, study_dir / "pareto.png")
    return text


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, init, imgsz): seeds done, mean and std (n-1) of each metric, Pareto flag.

    pareto: no other config of the same init and size has at least its APs at no more GFLOPs (and is
    better in one of them): the configs worth their cost. Std is NaN with a single seed.
    """
    ok = df[df["status"] == "ok"] if "status" in df else df
    keys = ["model", "init", "imgsz"]
    rows = []
    for (model, init, imgsz), g in ok.groupby(keys, sort=False):
        r = {"model": model, "init": init, "imgsz": imgsz, "seeds": len(g),
             "seed_list": " ".join(str(int(x)) for x in sorted(g.get("seed", pd.Series([0] * len(g))))),
             "params": float(g["params"].mean()) if "params" in g else float("nan")}
        for c in SUMMARY_COLS:
            v = pd.to_numeric(g[c], errors="coerce") if c in g else pd.Series([float("nan")])
            r[f"{c}_mean"], r[f"{c}_std"] = float(v.mean()), float(v.std(ddof=1)) if v.count() > 1 else float("nan")
        rows.append(r)
    out = pd.DataFrame(rows, columns=[*keys, "seeds", "seed_list", "params",
                                      *(f"{c}_{s}" for c in SUMMARY_COLS for s in ("mean", "std"))])
    out["pareto"] = [_on_front(out, i) for i in range(len(out))]
    return out


def _on_front(s: pd.DataFrame, i: int) -> bool:
    r = s.iloc[i]
    same = s[(s["init"] == r["init"]) & (s["imgsz"] == r["imgsz"])]
    ap, g = r["APs_mean"], r["GFLOPs_mean"]
    if math.isnan(ap) or math.isnan(g):
        return False
    return not any((o["APs_mean"] >= ap and o["GFLOPs_mean"] <= g and (o["APs_mean"] > ap or o["GFLOPs_mean"] < g))
                   for _, o in same.iterrows())


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def summary_table(s: pd.DataFrame) -> str:
    cols = ["model", "init", "imgsz", "seeds", "AP", "AP50", "APs", "APm", "params", "GFLOPs", "CPU ms", "Pareto (APs/GFLOPs)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) - 4) + ["---"]) + "|"]
    for r in s.to_dict("records"):
        vals = [r["model"], r["init"], r["imgsz"], r["seeds"], *(_pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("AP", "AP50", "APs", "APm")),
                _fmt(r["params"], 2, 1e6, "M"), _fmt(r["GFLOPs_mean"], 2), _pm(r["cpu_ms_mean"], r["cpu_ms_std"], 1),
                "yes" if r["pareto"] else ""]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def plot_pareto(s: pd.DataFrame, file: Path) -> None:
    """APs against GFLOPs and against CPU latency, one point per config and size, error bars across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), tight_layout=True)
    markers = {sz: m for sz, m in zip(sorted(s["imgsz"].unique()), "osD^v<>")}
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(s["model"]))}
    for ax, (x, label) in zip(axes, (("GFLOPs", "GFLOPs at the training size"), ("cpu_ms", "CPU ms (batch 1, 2 threads)"))):
        for r in s.to_dict("records"):
            err = lambda v: None if math.isnan(v) else v  # noqa: E731
            ax.errorbar(r[f"{x}_mean"], r["APs_mean"], yerr=err(r["APs_std"]), xerr=err(r[f"{x}_std"]) if x == "cpu_ms" else None,
                        fmt=markers[r["imgsz"]], color=colours[r["model"]], capsize=3, mfc="none" if r["init"] == "scratch" else None,
                        label=f"{r['model']} ({r['init']}, {r['imgsz']} px)")
        for (init, imgsz), g in s[s["pareto"]].groupby(["init", "imgsz"]):
            g = g.sort_values("GFLOPs_mean")
            if x == "GFLOPs" and len(g) > 1:
                ax.plot(g["GFLOPs_mean"], g["APs_mean"], ":", color="grey", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("APs (mean ± std across seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_title("APs per GFLOP (dotted: Pareto front)")
    axes[1].set_title("APs per CPU millisecond")
    axes[1].legend(fontsize=7, loc="best")
    fig.savefig(file, dpi=150)
    plt.close(fig)


def plot_study(s: pd.DataFrame, file: Path) -> None:
    """AP, APs (original areas) and APs (network-input areas) against image size (means across seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("AP", "AP (mAP@0.5:0.95)"), ("APs", "APs, COCO areas in original pixels"),
              ("APs_in", "APs, COCO areas in network-input pixels"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), tight_layout=True)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(s["model"]))}
    styles = {"transferred": "-", "scratch": "--"}
    for ax, (key, title) in zip(axes, panels):
        for (model, init), g in s.groupby(["model", "init"], sort=False):
            g = g.sort_values("imgsz")
            ax.errorbar(g["imgsz"], g[f"{key}_mean"], yerr=g[f"{key}_std"].fillna(0), fmt=styles.get(init, ":"), marker="o",
                        color=colours[model], capsize=3, label=f"{model} ({init})")
        ax.set_title(title)
        ax.set_xlabel("image size (px)")
        ax.set_xticks(sorted(s["imgsz"].unique()))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(file, dpi=150)
    plt.close(fig)


# ----- driver -------------------------------------------------------------------------------------
def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset yaml")
    parser.add_argument("--cfgs", nargs="+", default=["yolov5n.yaml", "yolov5n-spd.yaml"], help="model configs to compare")
    parser.add_argument("--imgsz", "--img", nargs="+", type=int, default=list(DEFAULT_IMGSZ), help="image sizes")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of the transferred (fine-tuning) runs")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="plain YOLOv5 checkpoint to start from ('' = scratch only)")
    parser.add_argument("--scratch", action="store_true", help="add from-scratch rows (added by default on a GPU)")
    parser.add_argument("--scratch-epochs", type=int, default=100, help="epochs of the from-scratch runs")
    parser.add_argument("--batch-size", "--batch", type=int, default=16)
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0],
                        help="training seeds; every config is trained once per seed (mean ± std in summary.md)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the --fraction/--val-fraction subsets")
    parser.add_argument("--hyp", default="hyp.scratch-low.yaml", help="hyperparameters, the same for every run")
    parser.add_argument("--device", default="", help="training/eval device: '' (best available), cpu, 0, ...")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--cache", choices=("ram", "disk", "none"), default="ram",
                        help="train.py image cache (the same resized images either way; ram made DeepPCB CPU epochs ~1.7x faster)")
    parser.add_argument("--fraction", type=float, default=1.0, help="train on this seeded fraction of the train split")
    parser.add_argument("--val-fraction", type=float, default=1.0, help="evaluate on this fraction of val (smoke runs)")
    parser.add_argument("--latency-runs", type=int, default=30, help="timed forward passes per latency median")
    parser.add_argument("--remeasure-latency", type=int, default=0, metavar="ROUNDS",
                        help="after the runs, time every run's model again in ROUNDS alternating rounds of "
                             "--latency-runs passes, in one sitting (for a study that shared the machine)")
    parser.add_argument("--project", default=str(ROOT / "runs" / "study"))
    parser.add_argument("--name", default="exp")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name: finished runs are skipped, "
                                                                 "interrupted ones resumed")
    opt = parser.parse_args(argv)
    for k in ("fraction", "val_fraction"):
        if not 0 < getattr(opt, k) <= 1:
            parser.error(f"--{k.replace('_', '-')} must be in (0, 1], got {getattr(opt, k)}")
    if min(opt.imgsz) < 32 or opt.epochs < 1 or opt.scratch_epochs < 1 or opt.batch_size < 1:
        parser.error("--imgsz must be >= 32, --epochs, --scratch-epochs and --batch-size >= 1")
    opt.imgsz = sorted(dict.fromkeys(opt.imgsz))
    opt.seeds = list(dict.fromkeys(opt.seeds))
    opt.cfgs = list(dict.fromkeys(opt.cfgs))
    return opt


def run_study(opt: argparse.Namespace, argv: list[str] | None = None) -> tuple[pd.DataFrame, Path]:
    """Train and evaluate every planned run; returns the results table and the study folder."""
    study_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    device = select_device(opt.device, batch_size=opt.batch_size)
    cuda = device.type == "cuda"
    if opt.weights:
        opt.weights = str(resolve_weights(opt.weights).resolve())
    runs, notes = plan_runs(opt.cfgs, opt.imgsz, opt.weights, opt.epochs, opt.scratch, opt.scratch_epochs, cuda,
                            tuple(opt.seeds))
    for run in runs:  # before anything is written: a refused reuse must leave the folder as it was
        check_settings(study_dir / run.name, run_settings(run, opt))
    data_yaml, dinfo = write_study_data(opt.data, study_dir / "data", opt.fraction, opt.val_fraction, opt.data_seed)
    data = check_dataset(data_yaml)
    command = shlex.join(["python", "benchmarks/spd_study.py", *(sys.argv[1:] if argv is None else argv)])
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"SPD study in {study_dir}: {len(runs)} runs on {dev_name}\n" + "\n".join(notes))

    rows = []
    for k, run in enumerate(runs, 1):
        run_dir = study_dir / run.name
        print(f"\n[{k}/{len(runs)}] {run.name}: {run.epochs} epochs at {run.imgsz} px, seed {run.seed}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "study_settings.json").write_text(json.dumps(run_settings(run, opt), indent=1))
        row = {"model": Path(run.cfg).stem, "init": run.init, "imgsz": run.imgsz, "epochs": run.epochs, "seed": run.seed,
               "device": dev_name, "status": "ok", **{c: float("nan") for c in METRIC_COLS}}
        cached = run_dir / "study_row.json"
        if cached.is_file():  # evaluated before: the numbers are already there
            rows.append(json.loads(cached.read_text()))
            print("  reused the earlier evaluation")
            continue
        try:
            ok, minutes, msg = train_run(run, opt, data_yaml, study_dir)
            row["train_min"] = minutes
            if not ok:
                row["status"] = msg
                print(f"  FAILED: {msg}")
            else:
                row.update(evaluate_run(run, run_dir, data, opt, device))
                cached.write_text(json.dumps(row))
        except KeyboardInterrupt:
            raise SystemExit(f"\nInterrupted. Continue with the same command plus: --name {study_dir.name} --exist-ok")
        except Exception as e:  # one run's failure must not lose the others: it becomes a 'failed' row
            row["status"] = f"{type(e).__name__ if not isinstance(e, UserError) else ''} {e}".strip()[:300]
            print(f"  FAILED: {row['status']}")
        rows.append(row)

    if opt.remeasure_latency:
        remeasure_latency(rows, runs, study_dir, opt.remeasure_latency, opt.latency_runs)
    df = pd.DataFrame(rows)
    sizes = object_sizes(data, opt.imgsz)
    latency_passes = f"{opt.remeasure_latency} rounds x {opt.latency_runs}" if opt.remeasure_latency else opt.latency_runs
    sitting = (", every run's model timed in turn in each round, all runs in one sitting after the training"
               if opt.remeasure_latency else "")
    per_size = "; ".join(f"at {k} px {v[0]}/{v[1]}/{v[2]}" for k, v in sizes.items() if k != "original")
    notes = [
        f"Machine: {machine()}; training/eval device: {dev_name}.",
        f"Command: `{command}`",
        f"Dataset: {opt.data} ({dinfo['n_train']} train images{f', a seeded {opt.fraction:g} fraction' if opt.fraction < 1 else ''}; "
        f"{dinfo['n_val']} val images{f', a seeded {opt.val_fraction:g} fraction' if opt.val_fraction < 1 else ''}; "
        f"{dinfo['nc']} classes). Date: {datetime.now().isoformat(timespec='minutes')}.",
        f"Same recipe for every run: {opt.hyp}, batch {opt.batch_size}, seeds {' '.join(map(str, opt.seeds))} (training "
        f"only; the data subsets use --data-seed {opt.data_seed}), SGD; 'transferred' starts from "
        f"{Path(opt.weights).name if opt.weights else '-'} (SPD configs through the exact function-preserving transfer), "
        "'scratch' from random weights. The final-epoch weights are evaluated (train.py --noval: no checkpoint "
        "selection on the evaluation set).",
        "AP = mAP@0.5:0.95 and AP50 = mAP@0.5 as val.py reports them (YOLOv5's interpolated AP), at the training size.",
        f"APs/APm/APl: COCO-style, object area = box w*h in ORIGINAL image pixels, small < {AREA_SMALL}, medium "
        f"{AREA_SMALL}-{AREA_LARGE}, large >= {AREA_LARGE} px^2 (val objects small/medium/large: "
        f"{'/'.join(map(str, sizes['original']))}). n/a = no objects in that bucket.",
        f"APs_in/APm_in: the same buckets with the area measured in NETWORK-INPUT pixels (original area x "
        f"(imgsz / max(w, h))^2), i.e. how small the object is for the detector (val objects small/medium/large: "
        f"{per_size}).",
        "Params of the trained model; GFLOPs of one fused forward pass at imgsz x imgsz; CPU ms = median of "
        f"{latency_passes} batch-1 forward passes (fused, no NMS) with torch.set_num_threads(2){sitting} "
        f"(1-min load average during the measurements: {', '.join(f'{x:.1f}' for x in dict.fromkeys(df.get('load_at_latency', pd.Series(dtype=float)).dropna().round(1)))}; "
        "a busy machine inflates these; results.csv also has the minimum, cpu_ms_min). Train min = wall time of the "
        "train.py process(es).",
        *notes,
        "For context only (COCO val2017, 640 px, trained from scratch; SPD-Conv paper): YOLOv5-SPD n/s/m/l AP "
        "31.0/40.0/46.5/48.5, APs 16.0/23.5/30.3/32.4; YOLOv5 n/s/m/l AP 28.0/37.4/45.4/49.0. A different dataset, "
        "resolution and budget: not comparable number for number.",
    ]
    text = write_report(df, notes, study_dir)
    print("\n" + text + f"\nSaved {study_dir / 'results.md'}, results.csv and study.png")
    return df, study_dir


def _on_sigterm(signum, frame):
    global _TERMINATED
    _TERMINATED = True
    raise KeyboardInterrupt


@report_user_errors
def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, Path]:
    opt = parse_opt(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run_study(opt, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
