"""CPU latency of plain and SPD models in every deployment runtime, SPD in slice form vs export form.

    python benchmarks/export_latency.py                      # the four models, 640x640, 2 threads
    python benchmarks/export_latency.py --models yolov5n-spd --runs 50 --csv runs/bench.csv

Every row is measured in one process, side by side: random weights, BatchNorm fused, batch 1,
`--threads` threads for every runtime. Rounds are interleaved (each engine runs once per round) so
that a busy neighbour slows every row alike; the median per engine is reported in milliseconds.
Prints a table and writes it as CSV (default runs/benchmarks/export_latency.csv) and, with --md, as a
markdown report naming the command, machine and versions.

Int8 columns: the same ONNX graph quantised as export.py --int8 does (ONNX Runtime QDQ with the Detect
layer in float; OpenVINO through NNCF), calibrated on --calib-images coco128 images. The weights are
random but fixed (seed 0), as for every other column: latency does not depend on the weight values,
so yolov5s needs no trained checkpoint. Int8 is measured for the export form of SPD models only
(the form export.py quantises).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backends import channels_last  # noqa: E402
from models.spd_export import to_export_form  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.torch_utils import count_flops, cpu_model  # noqa: E402

RUNTIMES = ("pytorch", "torchscript", "onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8")
CALIB = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"  # scales only: latency ignores their values
MODELS = ("yolov5n", "yolov5n-spd", "yolov5s", "yolov5s-spd")


@torch.no_grad()
def build(cfg: str, form: str) -> DetectionModel:
    """A fused random-weight model in the given SPD form, returning only the decoded tensor."""
    torch.manual_seed(0)
    m = DetectionModel(f"{cfg}.yaml", verbose=False).eval().fuse()
    if form == "export":
        to_export_form(m)
    m.model[-1].export = True
    return m.requires_grad_(False)


def engines(model: DetectionModel, x: torch.Tensor, runtimes: list[str], tmp: Path, threads: int,
            tag: str, cl: bool = True, int8: list[str] | None = None) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per runtime that runs the model once on x (int8: calibration images)."""
    out: dict[str, Callable[[], object]] = {}
    if "pytorch" in runtimes:  # as DetectMultiBackend runs .pt weights on CPU: channels-last conv weights
        pm = channels_last(deepcopy(model)) if cl else model
        out["pytorch"] = lambda: pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / legacy exporter deprecation chatter
        if "torchscript" in runtimes:
            ts = torch.jit.trace(model, x, strict=False)
            out["torchscript"] = lambda: ts(x)
        onnx_file = tmp / f"{tag}.onnx"
        if any(r.startswith(("onnxruntime", "openvino")) for r in runtimes):
            torch.onnx.export(model, x, str(onnx_file), opset_version=17, input_names=["images"],
                              output_names=["output0"], dynamo=False)
    xn = x.numpy()
    if "onnxruntime" in runtimes:
        out["onnxruntime"] = _ort(onnx_file, xn, threads)
    if "onnxruntime-int8" in runtimes and int8:
        from models.quantize import CalibrationReader, quantize_onnx

        q_file = tmp / f"{tag}_int8.onnx"
        quantize_onnx(onnx_file, q_file, CalibrationReader(int8, list(x.shape[-2:]), 32, 1, False))
        out["onnxruntime-int8"] = _ort(q_file, xn, threads)
    if "openvino" in runtimes or ("openvino-int8" in runtimes and int8):
        try:
            import openvino as ov
        except ImportError:
            print("OpenVINO not installed (pip install openvino): its columns stay empty")
            return out
        core = ov.Core()
        if "openvino" in runtimes:
            out["openvino"] = _ov(core, core.read_model(str(onnx_file)), xn, threads)
        if "openvino-int8" in runtimes and int8 and importlib.util.find_spec("nncf"):
            import onnx

            from models.quantize import head_scope, quantize_openvino

            head = head_scope(onnx.load(str(onnx_file)))
            q, _ = quantize_openvino(core.read_model(str(onnx_file)), int8, list(x.shape[-2:]), 32, 1, False, head)
            out["openvino-int8"] = _ov(core, q, xn, threads)
    return out


def _ort(f: Path, xn, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"images": xn})


def _ov(core, model, xn, threads: int) -> Callable[[], object]:
    # f32 hint: bf16 would be picked on CPUs that have it; int8 models still run their int8 kernels
    cm = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    req = cm.create_infer_request()
    return lambda: req.infer({0: xn})


def run(models: list[str] = list(MODELS), runtimes: list[str] = list(RUNTIMES), imgsz: int = 640, threads: int = 2,
        runs: int = 30, warmup: int = 3, csv_path: str | Path = ROOT / "runs/benchmarks/export_latency.csv",
        nchw: bool = False, clock: str = "wall", calib_images: int = 8, md: str | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    x = torch.rand(1, 3, imgsz, imgsz)
    calib = None
    if any(r.endswith("-int8") for r in runtimes):
        from models.quantize import calibration_files

        calib = calibration_files(CALIB, calib_images)
    rows, calls = [], {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for cfg in models:
            for form in (("slice", "export") if "spd" in cfg else ("-",)):
                m = build(cfg, form)
                key = (cfg, form)
                print(f"preparing {cfg} ({form})...", flush=True)
                calls[key] = engines(m, x, runtimes, Path(tmp), threads, f"{cfg}-{form}", cl=not nchw,
                                     int8=calib if form != "slice" else None)
                params = sum(p.numel() for p in m.parameters())
                rows.append({"model": cfg, "spd_form": form, "params_M": round(params / 1e6, 2),
                             "GFLOPs": round(count_flops(deepcopy(m), imgsz), 1)})
        for fns in calls.values():
            for f in fns.values():
                for _ in range(warmup):
                    f()
        timer = time.perf_counter if clock == "wall" else time.process_time
        times: dict[tuple, list[float]] = {(k, r): [] for k, fns in calls.items() for r in fns}
        for _ in range(runs):  # interleaved rounds: load changes hit every engine alike
            for k, fns in calls.items():
                for r, f in fns.items():
                    t = timer()
                    f()
                    times[(k, r)].append((timer() - t) * 1e3)
    for row in rows:
        for r in runtimes:
            t = times.get(((row["model"], row["spd_form"]), r))
            row[f"{r}_ms"] = round(statistics.median(t), 1) if t else None
        for r in ("onnxruntime", "openvino"):  # int8 / fp32 of the same runtime, same run
            a, b = row.get(f"{r}-int8_ms"), row.get(f"{r}_ms")
            if f"{r}-int8" in runtimes:
                row[f"{r}_int8_ratio"] = round(a / b, 2) if a and b else None
    print_table(rows, runtimes, imgsz, threads, runs)
    if clock == "cpu":
        print("Clock: CPU time of the process per run (all threads), not wall time: immune to other jobs' load")
    print(f"PyTorch column: {'NCHW' if nchw else 'channels-last'} conv weights"
          f"{'' if nchw else ' (what DetectMultiBackend uses for .pt weights on CPU)'}")
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nSaved {csv_path}")
    if md:
        write_md(rows, runtimes, md, imgsz, threads, runs, clock, load0)
    return rows


def write_md(rows: list[dict], runtimes: list[str], md: str | Path, imgsz, threads, runs, clock, load0) -> None:
    """The whole table as markdown, with the command, machine and versions that produced it."""
    import onnxruntime

    cpu = cpu_model()
    vers = [f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    vers += [f"{n} {__import__(n).__version__}" for n in ("openvino", "nncf") if importlib.util.find_spec(n)]
    unit = "CPU ms of the process per image" if clock == "cpu" else "wall-clock ms per image"
    cols = [f"{r}_ms" for r in runtimes] + [k for k in rows[0] if k.endswith("_ratio")]
    lines = ["# Export latency", "", f"Command: `python benchmarks/export_latency.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {cpu}, {os.cpu_count()} cores; load average {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end (other jobs were running)  ", f"Versions: {', '.join(vers)}  ",
             f"{unit}, {imgsz}x{imgsz}, batch 1, {threads} thread(s), median of {runs} interleaved rounds "
             "(every engine once per round), fused random-but-fixed weights. Ratios: int8 / fp32 of the same "
             "runtime in the same rounds.", "",
             "| model | SPD form | params (M) | GFLOPs | " + " | ".join(c.replace("_ms", "").replace("_", " ")
                                                                    for c in cols) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        vals = [("-" if r.get(c) is None else f"{r[c]:.2f}" if c.endswith("ratio") else f"{r[c]:.1f}") for c in cols]
        lines.append(f"| {r['model']} | {r['spd_form']} | {r['params_M']} | {r['GFLOPs']} | " + " | ".join(vals) + " |")
    Path(md).write_text("\n".join(lines) + "\n")
    print(f"Saved {md}")


def print_table(rows: list[dict], runtimes: list[str], imgsz: int, threads: int, runs: int) -> None:
    print(f"\nMedian latency (ms) per {imgsz}x{imgsz} image, batch 1, {threads} threads, {runs} runs, "
          f"{torch.__version__}, fused random weights")
    head = f"{'model':<14}{'SPD form':<10}{'params M':>9}{'GFLOPs':>8}" + "".join(f"{r:>13}" for r in runtimes)
    print(head + "\n" + "-" * len(head))
    for row in rows:
        vals = "".join(f"{row[f'{r}_ms']:>13.1f}" if row[f"{r}_ms"] is not None else f"{'-':>13}" for r in runtimes)
        print(f"{row['model']:<14}{row['spd_form']:<10}{row['params_M']:>9}{row['GFLOPs']:>8}{vals}")
    # how much of each SPD model's extra cost over its plain twin the export form removes
    by = {(r["model"], r["spd_form"]): r for r in rows}
    for cfg in sorted({r["model"] for r in rows if "spd" in r["model"]}):
        plain = by.get((cfg.replace("-spd", ""), "-"))
        s, e = by.get((cfg, "slice")), by.get((cfg, "export"))
        if not (plain and s and e):
            continue
        parts = []
        for r in runtimes:
            k = f"{r}_ms"
            if None in (plain[k], s[k], e[k]) or s[k] <= plain[k]:
                continue
            parts.append(f"{r} {100 * (s[k] - e[k]) / (s[k] - plain[k]):.0f}%")
        if parts:
            print(f"{cfg}: export form removes this share of the SPD overhead (slice - plain): " + ", ".join(parts))


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="model configs (bare names in models/)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30, help="timed runs per engine")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nchw", action="store_true", help="PyTorch with plain NCHW weights (default channels-last)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: latency (default); cpu: process CPU time, for a machine shared with other jobs")
    p.add_argument("--calib-images", type=int, default=8, help="coco128 images calibrating the int8 columns")
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    p.add_argument("--csv", dest="csv_path", default=str(ROOT / "runs/benchmarks/export_latency.csv"))
    return p.parse_args(argv)


if __name__ == "__main__":
    from utils.errors import report_user_errors

    report_user_errors(lambda: run(**vars(parse_opt())))()
