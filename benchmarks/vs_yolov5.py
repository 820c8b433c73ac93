"""Side by side with YOLOv5 v7.0 (the `yolov5` PyPI package): training, val.py, detect.py and forward latency.

Every figure runs the same command through both tools as whole processes, alternating (pair i runs this
project first when i is even and the reference first when i is odd, so a drifting machine load falls on both
sides), and reports for each figure the median of each side and the median of the pairwise ratios
ours / reference (< 1: this project is faster). Both tools read one temporary copy of the dataset (they write
label caches beside the labels, and ../shared is read-only by rule).

    python benchmarks/vs_yolov5.py --ref-python .venv-yolov5/bin/python          # every figure, 3 pairs
    python benchmarks/vs_yolov5.py --ref-python ... --jobs val latency-n --pairs 5

Figures (the commands are printed in the markdown):
    train-n, train-n-spd   train.py --data coco128 --img 320 --batch 16 --epochs 2 --weights '' (from scratch):
                           process wall time and training images/s. The reference's SPD model is this
                           project's yolov5n-spd.yaml with YOLOv5's own `Contract` (space-to-depth, gain 2) in
                           place of `space_to_depth`: the same layers, parameters and FLOPs (the four phases
                           come out in another channel order).
    val                    val.py --weights yolov5n.pt --data coco128 --img 640: process wall time
    detect-images          detect.py --weights yolov5n.pt --source ../shared/images: wall time, images/s
    detect-video           detect.py on ../shared/videos/car-detection.mp4: wall time, frames/s
    latency-n, latency-n-spd   batch-1 forward at 640 through each tool's DetectMultiBackend (fused, a
                           random-but-seeded model built from the config), median of --latency-runs, in ms

The reference is a benchmark-only dependency, never imported by this project. Set it up in its own virtual
environment (it would otherwise pull ultralytics and an older numpy into this one):
    python -m venv --system-site-packages .venv-yolov5
    .venv-yolov5/bin/pip install yolov5==7.0.14 "setuptools<81" "Pillow<10" "numpy<2.4"
The pins: yolov5 7.0 imports pkg_resources (removed in setuptools 81), calls FreeTypeFont.getsize (removed in
Pillow 10) and np.trapz (removed in numpy 2.4). It runs with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, because its
torch.load calls predate torch 2.6's weights_only default (it loads only its own checkpoints and
../shared/weights/yolov5n.pt), and with YOLOV5_CONFIG_DIR pointing at a folder holding a local font saved as
Arial.ttf (it would download one). Without --ref-python (or a `yolov5` importable by this Python) the
reference rows are skipped with one line and this project's figures are still measured.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
JOBS = ("train-n", "train-n-spd", "val", "detect-images", "detect-video", "latency-n", "latency-n-spd")
OURS, REF = "this project", "YOLOv5 v7.0"

# One forward-latency probe per tool, run as `python -c CODE CFG IMGSZ RUNS FOLDER`: each builds a seeded model
# from CFG, saves it and loads it back through the tool's own DetectMultiBackend, then _TIMED_FORWARD prints the
# median ms of RUNS forward passes after 3 warm-up ones.
_TIMED_FORWARD = """
x = torch.rand(1, 3, imgsz, imgsz)
t = []
with torch.inference_mode():
    for i in range(runs + 3):
        t0 = time.perf_counter(); model(x); t.append(time.perf_counter() - t0)
print("LATENCY_MS", 1000 * statistics.median(t[3:]))
"""
_LATENCY_OURS = """
import statistics, sys, time, torch
sys.path.insert(0, {root!r})
from models.backends import DetectMultiBackend
from models.yolo import DetectionModel
from utils.checkpoints import atomic_save, make_checkpoint
cfg, imgsz, runs, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
m = DetectionModel(cfg, verbose=False)
m.names = {{i: str(i) for i in range(m.yaml["nc"])}}
f = folder + "/ours.pt"
atomic_save(make_checkpoint(m, half=False), f)
model = DetectMultiBackend(f)
"""
_LATENCY_REF = """
import os, statistics, sys, time, torch
import yolov5.models
from yolov5.models.common import DetectMultiBackend
from yolov5.models.yolo import DetectionModel
cfg, imgsz, runs, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if not os.path.isfile(cfg):  # a bare name: the reference's own config
    cfg = os.path.join(os.path.dirname(yolov5.models.__file__), cfg)
torch.manual_seed(0)
m = DetectionModel(cfg)
m.names = [str(i) for i in range(m.yaml["nc"])]
f = folder + "/ref.pt"
torch.save({"model": m.half(), "epoch": -1}, f)
model = DetectMultiBackend(f, device=torch.device("cpu"), fuse=True)
"""


@dataclass
class Job:
    name: str
    what: str  # the figure, in words, for the table
    commands: dict[str, list[str]]  # side -> argv
    items: int = 0  # images (or frames) the job processes, for a per-second figure; 0 = none


def reference_python(arg: str | None) -> str | None:
    """The Python that can import the reference: --ref-python, else this one when it has `yolov5`."""
    if arg:
        if not Path(arg).exists():
            raise SystemExit(f"--ref-python {arg} does not exist")
        return arg
    return sys.executable if importlib.util.find_spec("yolov5") else None


def prepare_data(data: Path, tmp: Path) -> tuple[Path, int]:
    """A copy of the dataset in tmp with an absolute `path:` in its yaml; returns (yaml, train images)."""
    d = yaml.safe_load(data.read_text())
    root = Path(d.get("path") or ".")
    tries = [root] if root.is_absolute() else [ROOT / root, data.parent / root, data.parent]  # as check_dataset
    src = next((t.resolve() for t in tries if t.is_dir()), data.parent)
    dst = tmp / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.cache"))
    d["path"] = str(dst)
    f = tmp / data.name
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    train = d["train"] if isinstance(d["train"], list) else [d["train"]]
    exts = {".jpg", ".jpeg", ".png", ".bmp"}
    n = sum(1 for t in train for p in (dst / t).rglob("*") if p.suffix.lower() in exts)
    return f, n


def reference_spd_cfg(tmp: Path) -> Path:
    """This project's yolov5n-spd.yaml with YOLOv5's `Contract` (gain 2) for `space_to_depth`."""
    text = (ROOT / "models" / "yolov5n-spd.yaml").read_text()
    out, n = re.subn(r"space_to_depth, \[1\]", "Contract, [2]", text)
    if n == 0:
        raise SystemExit("models/yolov5n-spd.yaml has no space_to_depth layers to translate")
    f = tmp / "yolov5n-spd-contract.yaml"
    f.write_text(out)
    return f


def build_jobs(names: list[str], ref_py: str | None, data: Path, n_train: int, tmp: Path, opt) -> list[Job]:
    ours_py, weights = sys.executable, str(opt.weights)
    spd_ref = str(reference_spd_cfg(tmp))

    def both(script: str, args: list[str], name: str, ref_args: list[str] | None = None) -> dict[str, list[str]]:
        project = ["--project", str(tmp / "runs"), "--exist-ok"]
        cmds = {OURS: [ours_py, f"{script}.py", *args, *project, "--name", f"ours-{name}"]}
        if ref_py:
            cmds[REF] = [ref_py, "-m", f"yolov5.{script}", *(ref_args or args), *project, "--name", f"ref-{name}"]
        return cmds

    train = ["--data", str(data), "--img", str(opt.train_img), "--batch", str(opt.batch), "--epochs", str(opt.epochs),
             "--weights", "", "--workers", str(opt.workers), "--seed", "0"]
    videos = sorted((SHARED / "videos").glob("*.mp4"))
    video = str(next((v for v in videos if v.name == "car-detection.mp4"), videos[0] if videos else ""))
    jobs = {
        "train-n": Job("train-n", f"train.py, yolov5n, scratch, {opt.epochs} epochs at {opt.train_img}",
                       both("train", [*train, "--cfg", "yolov5n.yaml"], "train-n"), n_train * opt.epochs),
        "train-n-spd": Job("train-n-spd", f"train.py, yolov5n-spd, scratch, {opt.epochs} epochs at {opt.train_img}",
                           both("train", [*train, "--cfg", "yolov5n-spd.yaml"], "train-n-spd",
                                [*train, "--cfg", spd_ref]), n_train * opt.epochs),
        "val": Job("val", f"val.py, yolov5n.pt, {data.stem} at {opt.val_img}",
                   both("val", ["--weights", weights, "--data", str(data), "--img", str(opt.val_img)], "val")),
        "detect-images": Job("detect-images", "detect.py, yolov5n.pt, ../shared/images",
                             both("detect", ["--weights", weights, "--source", str(SHARED / "images")], "det-img"),
                             len([p for p in (SHARED / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")])),
        "detect-video": Job("detect-video", f"detect.py, yolov5n.pt, {Path(video).name}",
                            both("detect", ["--weights", weights, "--source", video], "det-vid"), frame_count(video)),
    }
    for cfg in ("n", "n-spd"):
        code = {OURS: _LATENCY_OURS.format(root=str(ROOT)) + _TIMED_FORWARD, REF: _LATENCY_REF + _TIMED_FORWARD}
        cfgs = {OURS: f"yolov5{cfg}.yaml", REF: spd_ref if cfg == "n-spd" else "yolov5n.yaml"}
        cmds = {side: [py, "-c", code[side], cfgs[side], str(opt.val_img), str(opt.latency_runs), str(tmp)]
                for side, py in ((OURS, ours_py), (REF, ref_py)) if py}
        jobs[f"latency-{cfg}"] = Job(f"latency-{cfg}", f"forward, yolov5{cfg}, batch 1 at {opt.val_img}, ms", cmds)
    return [jobs[n] for n in names]


def reference_env(tmp: Path) -> dict[str, str]:
    """What the reference's processes run with (see the module docstring): a local font, old torch.load."""
    font = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    (tmp / "yolov5_config").mkdir(exist_ok=True)
    shutil.copy(font, tmp / "yolov5_config" / "Arial.ttf")
    return {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "YOLOV5_CONFIG_DIR": str(tmp / "yolov5_config")}


def frame_count(video: str) -> int:
    import cv2

    cap = cv2.VideoCapture(video)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return n


def run_once(job: Job, side: str, env: dict[str, str] | None = None) -> dict:
    """One process of `job` on `side` (with `env` added to the environment); its wall time (or the latency it
    printed) and what it processed."""
    t0 = time.perf_counter()
    r = subprocess.run(job.commands[side], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{job.name} ({side}) failed:\n{' '.join(job.commands[side][:4])} ...\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    row = {"job": job.name, "side": side, "wall_s": round(wall, 2)}
    m = re.search(r"LATENCY_MS ([\d.]+)", r.stdout)
    if m:
        row["value"] = round(float(m.group(1)), 2)
    else:
        row["value"] = row["wall_s"]
        if job.items:
            row["per_s"] = round(job.items / wall, 2)
    return row


def measure(jobs: list[Job], pairs: int, envs: dict[str, dict[str, str]] | None = None) -> list[dict]:
    """Every job `pairs` times on each side, alternating which side goes first; `envs`: per side."""
    rows = []
    for job in jobs:
        for i in range(pairs):
            sides = [s for s in (OURS, REF) if s in job.commands]
            for side in (sides if i % 2 == 0 else sides[::-1]):
                row = {**run_once(job, side, (envs or {}).get(side)), "pair": i}
                rows.append(row)
                print(f"  {job.name:14s} pair {i} {side:13s} {row['value']:9.2f}"
                      f"{'  ' + str(row.get('per_s')) + '/s' if row.get('per_s') else ''}", flush=True)
    return rows


def summarise(jobs: list[Job], rows: list[dict]) -> list[dict]:
    """Per job: the median of each side, the median of the pairwise ratios ours / reference."""
    out = []
    for job in jobs:
        by = {s: {r["pair"]: r for r in rows if r["job"] == job.name and r["side"] == s} for s in (OURS, REF)}
        med = {s: statistics.median(r["value"] for r in by[s].values()) if by[s] else None for s in by}
        per_s = {s: statistics.median(r["per_s"] for r in by[s].values()) if by[s] and job.items else None for s in by}
        ratios = [by[OURS][p]["value"] / by[REF][p]["value"] for p in by[OURS] if p in by[REF]]
        out.append({"job": job.name, "what": job.what, "ours": med[OURS], "reference": med[REF],
                    "ratio": round(statistics.median(ratios), 3) if ratios else None,
                    "ratios": " ".join(f"{x:.3f}" for x in ratios), "ours_per_s": per_s[OURS],
                    "reference_per_s": per_s[REF], "pairs": len(by[OURS])})
    return out


def versions(ref_py: str | None) -> str:
    import torch

    v = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if ref_py:
        r = subprocess.run([ref_py, "-c", "import importlib.metadata as m; print(m.version('yolov5'))"],
                           capture_output=True, text=True)
        v.append(f"yolov5 {r.stdout.strip() or '?'} (reference)")
    return ", ".join(v)


def shown_command(job: Job, tmp: str) -> str:
    """This project's command of `job` as a user would type it (temporary paths as <tmp>)."""
    cmd = ["python" if c == sys.executable else c for c in job.commands[OURS]]
    if "-c" in cmd:
        cmd[cmd.index("-c") + 1] = "<latency probe>"
    shown = shlex.join(cmd).replace(tmp, "<tmp>").replace(str(SHARED), "../shared")
    return shown.replace("'<latency probe>'", "<latency probe>")


def write(summary: list[dict], rows: list[dict], commands: dict[str, str], out: Path, ref_py: str | None,
          load: tuple) -> None:
    from utils.torch_utils import cpu_model

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "pair", "side", "wall_s", "value", "per_s"])
        w.writeheader()
        w.writerows({k: r.get(k) for k in w.fieldnames} for r in rows)
    fmt = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = ["# This project vs YOLOv5 v7.0, side by side", "",
             f"Command: `python benchmarks/vs_yolov5.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {load[0]:.1f} at start, "
             f"{load[1]:.1f} at end  ", f"Versions: {versions(ref_py)}  ",
             "Each figure: the same command through both tools as whole processes, alternating (ours first in even "
             "pairs, the reference first in odd ones); median of each side and median of the pairwise ratios "
             "ours / reference (< 1: this project is faster). Seconds of process wall time, except latency (ms).", "",
             "| figure | what | this project | YOLOv5 v7.0 | ratio (median) | pairwise ratios | this project /s | "
             "YOLOv5 /s |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['job']} | {s['what']} | {fmt(s['ours'], 2)} | {fmt(s['reference'], 2)} | "
                     f"{fmt(s['ratio'], 3)} | {s['ratios']} | {fmt(s['ours_per_s'], 2)} | {fmt(s['reference_per_s'], 2)} |")
    lines += ["", "Commands (this project; the reference runs the same arguments as `python -m yolov5.<script>`):", ""]
    lines += [f"- {name}: `{cmd}`" for name, cmd in commands.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"Saved {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-python", default=None, help="a Python with the yolov5 package (see the setup above)")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs per figure (at least 3 for the README)")
    p.add_argument("--data", default=str(SHARED / "data" / "coco128" / "coco128.yaml"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    p.add_argument("--train-img", type=int, default=320)
    p.add_argument("--val-img", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="dataloader workers, the same for both tools")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "vs_yolov5"), help="writes <out>.csv and <out>.md")
    opt = p.parse_args(argv)
    if opt.pairs < 1:
        p.error("--pairs must be at least 1")
    return opt


def main(argv: list[str] | None = None) -> list[dict]:
    opt = parse_opt(argv)
    ref_py = reference_python(opt.ref_python)
    if ref_py is None:
        print("YOLOv5 reference not available (no --ref-python and no yolov5 package here): its rows are skipped")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data, n_train = prepare_data(Path(opt.data), Path(tmp))
        jobs = build_jobs(opt.jobs, ref_py, data, n_train, Path(tmp), opt)
        rows = measure(jobs, opt.pairs, {REF: reference_env(Path(tmp))})
        commands = {j.name: shown_command(j, tmp) for j in jobs}
    summary = summarise(jobs, rows)
    write(summary, rows, commands, Path(opt.out), ref_py, (load0, os.getloadavg()[0]))
    for s in summary:
        print(f"{s['job']:14s} ours {s['ours']}  reference {s['reference']}  ratio {s['ratio']}")
    return summary


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
