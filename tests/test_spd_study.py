"""benchmarks/spd_study.py: run planning, dataset subsets, area buckets, report, and one tiny study end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, shared_path

sys.path.insert(0, str(ROOT / "benchmarks"))
import spd_study  # noqa: E402

from utils.errors import UserError  # noqa: E402


def test_plan_without_gpu_skips_scratch_and_says_so():
    runs, notes = spd_study.plan_runs(["a.yaml", "b-spd.yaml"], [256, 320], "w.pt", 10, False, 100, cuda=False)
    assert [(r.cfg, r.init, r.imgsz, r.epochs) for r in runs] == [
        ("a.yaml", "transferred", 256, 10), ("b-spd.yaml", "transferred", 256, 10),
        ("a.yaml", "transferred", 320, 10), ("b-spd.yaml", "transferred", 320, 10)]
    assert any("skipped" in n for n in notes)


def test_plan_adds_scratch_on_gpu_when_asked_or_without_weights():
    runs, notes = spd_study.plan_runs(["a.yaml"], [256], "w.pt", 10, False, 100, cuda=True)
    assert {(r.init, r.epochs, r.weights) for r in runs} == {("transferred", 10, "w.pt"), ("scratch", 100, "")}
    assert not notes
    runs, notes = spd_study.plan_runs(["a.yaml"], [256], "", 10, False, 7, cuda=False)
    assert [(r.init, r.epochs) for r in runs] == [("scratch", 7)] and "CPU" in notes[0]
    runs, _ = spd_study.plan_runs(["a.yaml"], [256], "w.pt", 10, True, 7, cuda=False)
    assert [r.init for r in runs] == ["transferred", "scratch"]


def test_study_data_subsets_are_seeded_and_stay_out_of_shared(tmp_path):
    data = shared_path("data", "deeppcb", "deeppcb.yaml")
    f1, info = spd_study.write_study_data(str(data), tmp_path / "a", 0.05, 0.02, seed=0)
    f2, _ = spd_study.write_study_data(str(data), tmp_path / "b", 0.05, 0.02, seed=0)
    f3, _ = spd_study.write_study_data(str(data), tmp_path / "c", 0.05, 0.02, seed=1)
    assert (info["n_train"], info["n_val"], info["nc"]) == (50, 10, 6)
    d = yaml.safe_load(f1.read_text())
    train = Path(d["train"]).read_text().split()
    assert Path(d["train"]).parent == tmp_path / "a" and len(train) == 50
    assert train == Path(yaml.safe_load(f2.read_text())["train"]).read_text().split()
    assert train != Path(yaml.safe_load(f3.read_text())["train"]).read_text().split()
    assert all(Path(p).is_file() for p in train)


def test_reused_run_folder_with_other_settings_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "study_settings.json").write_text(json.dumps({"epochs": 5, "imgsz": 256}))
    with pytest.raises(UserError, match="epochs: 5 -> 6"):
        spd_study.check_settings(run_dir, {"epochs": 6, "imgsz": 256})
    spd_study.check_settings(run_dir, {"epochs": 5, "imgsz": 256})  # same settings: fine
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not made by this study"):
        spd_study.check_settings(tmp_path / "foreign", {"epochs": 5})


def test_markdown_marks_empty_buckets_and_failures():
    nan = float("nan")
    rows = [{"model": "m", "init": "transferred", "imgsz": 256, "epochs": 1, "device": "cpu", "status": "ok",
             "AP": 0.5, "AP50": 0.75, "APs": 0.1, "APm": 0.2, "APl": nan, "APs_in": 0.3, "APm_in": nan,
             "params": 1_870_000, "GFLOPs": 0.73, "cpu_ms": 12.34, "train_min": 3.0},
            {"model": "m", "init": "transferred", "imgsz": 320, "epochs": 1, "device": "cpu", "status": "boom",
             "AP": nan, "AP50": nan, "APs": nan, "APm": nan, "APl": nan, "APs_in": nan, "APm_in": nan,
             "params": nan, "GFLOPs": nan, "cpu_ms": nan, "train_min": 0.1}]
    lines = spd_study.markdown_table(pd.DataFrame(rows)).splitlines()
    assert len(lines) == 4
    assert "| 0.500 | 0.750 | 0.100 | 0.200 | n/a | 0.300 | n/a | 1.87M | 0.73 | 12.3 | 3.0 | cpu |" in lines[2]
    assert "failed: boom" in lines[3]


def test_buckets_by_network_input_area():
    """A 40x40 px object is medium in a 640 px image, small once the network sees it at half size."""
    import torch

    box = torch.tensor([[100.0, 100.0, 140.0, 140.0]])
    one, cls = torch.tensor([0.9]), torch.tensor([0.0])
    r = spd_study.bucket_aps([(box, one, cls, box, cls, 0.5)])
    assert r["APm"] == pytest.approx(1) and math.isnan(r["APs"]) and math.isnan(r["APl"])
    assert r["APs_in"] == pytest.approx(1) and math.isnan(r["APm_in"]) and r["AP_coco"] == pytest.approx(1)
    miss = torch.tensor([[300.0, 300.0, 340.0, 340.0]])  # a second, undetected 40x40 object at gain 1
    r = spd_study.bucket_aps([(box, one, cls, box, cls, 0.5), (miss[:0], one[:0], cls[:0], miss, cls, 1.0)])
    assert r["APs_in"] == pytest.approx(1) and r["APm_in"] == 0 and r["APm"] == pytest.approx(0.5, abs=0.01)


def test_native_buckets_match_val(tmp_path, yolov5n_weights):
    import torch

    import val as validate
    from utils.data_config import check_dataset

    data = check_dataset(shared_path("data", "coco8", "coco8.yaml"))
    r = validate.run(data, weights=yolov5n_weights, imgsz=320, batch_size=4, workers=0, plots=False, half=False,
                     project=tmp_path)
    aps, apm, apl = r.aps, r.apm, r.apl
    a = spd_study.area_aps(yolov5n_weights, data, 320, 4, torch.device("cpu"), 0)
    assert (a["APs"], a["APm"], a["APl"]) == pytest.approx((aps, apm, apl), abs=1e-9)
    assert a["APs"] > 0 and a["APl_in"] != pytest.approx(a["APl"], abs=1e-3)  # objects move to smaller buckets


def test_one_failing_run_does_not_stop_the_study(tmp_path, monkeypatch, yolov5n_weights):
    """Training failures and crashes become 'failed' rows; the other runs are evaluated and reported."""
    data = shared_path("data", "deeppcb", "deeppcb.yaml")

    def fake_train(run, opt, data_yaml, study_dir):
        if run.imgsz == 64 and "spd" in run.cfg:
            return False, 0.5, "train.py exited with 1: out of memory"
        if run.imgsz == 96 and "spd" in run.cfg:
            raise RuntimeError("disk full")
        return True, 1.0, "trained"

    metrics = {"AP": 0.4, "AP50": 0.6, "AP_coco": 0.41, "APs": 0.2, "APm": 0.5, "APl": float("nan"), "APs_in": 0.3,
               "APm_in": 0.45, "APl_in": float("nan"), "params": 1_800_000, "GFLOPs": 0.1, "cpu_ms": 5.0,
               "cpu_ms_min": 4.0, "load_at_latency": 1.0, "eval_s": 1.0}
    monkeypatch.setattr(spd_study, "train_run", fake_train)
    monkeypatch.setattr(spd_study, "evaluate_run", lambda *a: dict(metrics))
    df, study_dir = spd_study.main(["--data", str(data), "--weights", str(yolov5n_weights), "--fraction", "0.01",
                                    "--val-fraction", "0.01", "--imgsz", "96", "64", "--device", "cpu",
                                    "--project", str(tmp_path), "--name", "f"])
    assert df["imgsz"].tolist() == [64, 64, 96, 96]  # sizes sorted, models in --cfgs order
    assert df["status"].tolist() == ["ok", "train.py exited with 1: out of memory", "ok", "RuntimeError disk full"]
    md = (study_dir / "results.md").read_text()
    assert md.count("failed:") == 2 and "| 0.400 | 0.600 | 0.200 | 0.500 | n/a | 0.300 | 0.450 |" in md
    assert "28.0/37.4/45.4/49.0" in md and (study_dir / "study.png").stat().st_size > 0
    assert (study_dir / "yolov5n-transferred-64-s0" / "study_row.json").is_file()
    assert not (study_dir / "yolov5n-spd-transferred-64-s0" / "study_row.json").exists()  # failed runs are retried


@pytest.mark.slow
def test_study_end_to_end_tiny_and_rerun_reuses(tmp_path, yolov5n_weights):
    """The real path (train.py processes, val.py, area buckets, cost, latency) on 5 DeepPCB images at 64 px.

    One size keeps it fast; several sizes, sorting and failures are covered by the test above.
    """
    data = shared_path("data", "deeppcb", "deeppcb.yaml")
    argv = ["--data", str(data), "--weights", str(yolov5n_weights), "--fraction", "0.005", "--val-fraction", "0.01",
            "--epochs", "1", "--imgsz", "64", "--batch-size", "8", "--workers", "0", "--latency-runs", "2",
            "--device", "cpu", "--project", str(tmp_path), "--name", "s"]
    df, study_dir = spd_study.main(argv)
    assert study_dir == tmp_path / "s"
    for f in ("results.md", "results.csv", "study.png"):
        assert (study_dir / f).is_file() and (study_dir / f).stat().st_size > 0
    csv = pd.read_csv(study_dir / "results.csv")
    assert list(zip(csv["model"], csv["init"], csv["imgsz"])) == [("yolov5n", "transferred", 64),
                                                                  ("yolov5n-spd", "transferred", 64)]
    assert (csv["status"] == "ok").all()
    for c in ("AP", "AP50", "APs", "APs_in", "params", "GFLOPs", "cpu_ms"):
        assert pd.api.types.is_numeric_dtype(csv[c]) and csv[c].notna().all(), c
    assert csv[["AP", "AP50", "APs"]].apply(lambda s: s.between(0, 1)).all().all()
    base, spd = csv.iloc[0], csv.iloc[1]
    assert spd["params"] > base["params"] and spd["GFLOPs"] > base["GFLOPs"]  # SPD's extra (zero-started) capacity
    md = (study_dir / "results.md").read_text()
    # each model once in the per-config (mean ± std) table and once in the per-run table
    assert md.count("| yolov5n") == 4 and "## Per config" in md
    assert "From-scratch rows skipped" in md and "ORIGINAL image pixels" in md
    assert (study_dir / "yolov5n-spd-transferred-64-s0" / "weights" / "best.pt").is_file()

    # a rerun into the same folder trains nothing: finished runs are reused, a lost evaluation is redone
    run = study_dir / "yolov5n-spd-transferred-64-s0"
    (run / "study_row.json").unlink()
    (run / "train_done.json").unlink()
    log_size = (run / "train.log").stat().st_size
    df2, _ = spd_study.main([*argv, "--exist-ok"])
    assert (run / "train.log").stat().st_size == log_size  # no train.py was started
    assert df2["AP"].tolist() == pytest.approx(df["AP"].tolist(), nan_ok=True)

    train_list = (study_dir / "data" / "train.txt").read_text()
    with pytest.raises(SystemExit):  # other settings into the same folder: refused, nothing overwritten
        spd_study.main([*argv, "--exist-ok", "--hyp", "hyp.scratch-med.yaml"])
    assert (study_dir / "data" / "train.txt").read_text() == train_list


def test_plan_seeds_vary_slower_than_configs():
    runs, _ = spd_study.plan_runs(["a.yaml", "b.yaml"], [64], "w.pt", 1, False, 1, cuda=False, seeds=(0, 1))
    assert [(r.cfg, r.seed) for r in runs] == [("a.yaml", 0), ("b.yaml", 0), ("a.yaml", 1), ("b.yaml", 1)]
    assert runs[2].name == "a-transferred-64-s1"


def test_seeds_summary_pareto_and_resume_per_seed(tmp_path, monkeypatch, yolov5n_weights):
    """Mean ± std across seeds per config, the APs-per-GFLOP front, pareto.png; a rerun redoes only what is missing."""
    data = shared_path("data", "deeppcb", "deeppcb.yaml")
    aps = {("yolov5n", 0): 0.20, ("yolov5n", 1): 0.24, ("yolov5n-spdlite", 0): 0.18, ("yolov5n-spdlite", 1): 0.22,
           ("yolov5n-spd", 0): 0.19, ("yolov5n-spd", 1): 0.21}
    gflops = {"yolov5n": 0.66, "yolov5n-spdlite": 0.5, "yolov5n-spd": 1.36}
    evaluated = []

    def fake_eval(run, run_dir, data_, opt, device):
        m = Path(run.cfg).stem
        evaluated.append((m, run.seed))
        ap_s = aps.get((m, run.seed), 0.2)
        return {"AP": ap_s + 0.1, "AP50": 0.5, "AP_coco": 0.3, "APs": ap_s, "APm": 0.4,
                "APl": float("nan"), "APs_in": 0.3, "APm_in": 0.4, "APl_in": float("nan"), "params": 1e6,
                "GFLOPs": gflops[m], "cpu_ms": 10.0 + run.seed, "cpu_ms_min": 9.0, "load_at_latency": 1.0, "eval_s": 1.0}

    monkeypatch.setattr(spd_study, "train_run", lambda *a: (True, 1.0, "trained"))
    monkeypatch.setattr(spd_study, "evaluate_run", fake_eval)
    argv = ["--data", str(data), "--weights", str(yolov5n_weights), "--fraction", "0.01", "--val-fraction", "0.01",
            "--imgsz", "64", "--device", "cpu", "--cfgs", "yolov5n.yaml", "yolov5n-spdlite.yaml", "yolov5n-spd.yaml",
            "--seeds", "0", "1", "--project", str(tmp_path), "--name", "p"]
    df, study_dir = spd_study.main(argv)
    assert len(evaluated) == 6 and df["seed"].tolist() == [0, 0, 0, 1, 1, 1]
    s = pd.read_csv(study_dir / "summary.csv")
    row = s.set_index("model").loc["yolov5n"]
    assert row["seeds"] == 2 and row["APs_mean"] == pytest.approx(0.22) and row["APs_std"] == pytest.approx(0.04 / 2**0.5)
    assert row["cpu_ms_mean"] == pytest.approx(10.5)
    # spd: fewer APs at more GFLOPs than plain -> dominated; spdlite: cheapest -> on the front
    assert s.set_index("model")["pareto"].to_dict() == {"yolov5n": True, "yolov5n-spdlite": True, "yolov5n-spd": False}
    md = (study_dir / "summary.md").read_text()
    assert "| yolov5n | transferred | 64 | 2 | 0.320 ± 0.028 | 0.500 ± 0.000 | 0.220 ± 0.028 |" in md
    assert (study_dir / "pareto.png").stat().st_size > 0 and "seeds 0 1" in md

    # resumable per (config, seed): a lost evaluation is redone, nothing else; a new seed adds only its runs
    (study_dir / "yolov5n-spd-transferred-64-s1" / "study_row.json").unlink()
    evaluated.clear()
    spd_study.main([*argv, "--exist-ok"])
    assert evaluated == [("yolov5n-spd", 1)]
    evaluated.clear()
    spd_study.main([*argv[:-7], "--seeds", "0", "1", "2", "--project", str(tmp_path), "--name", "p", "--exist-ok"])
    assert sorted(evaluated) == [("yolov5n", 2), ("yolov5n-spd", 2), ("yolov5n-spdlite", 2)]
    assert pd.read_csv(study_dir / "summary.csv")["seeds"].tolist() == [3, 3, 3]


def test_remeasure_latency_times_every_run_in_alternating_rounds(tmp_path, monkeypatch, yolov5n_weights):
    """--remeasure-latency R: every run's model timed again in R rounds, the order reversed every other round,
    and the new figures replace the ones measured while the study shared the machine (rows and their caches)."""
    import shutil

    def fake_train(run, opt, data_yaml, study_dir):
        (study_dir / run.name / "weights").mkdir(parents=True, exist_ok=True)
        shutil.copy(yolov5n_weights, study_dir / run.name / "weights" / "best.pt")
        return True, 1.0, "trained"

    def fake_eval(run, run_dir, data_, opt, device):
        return {"AP": 0.3, "AP50": 0.5, "APs": 0.2, "APm": 0.4, "params": 1e6, "GFLOPs": 1.0, "cpu_ms": 99.0,
                "cpu_ms_min": 98.0, "load_at_latency": 5.0, "eval_s": 1.0}

    timed = []

    def fake_times(model, x, runs, warmup=3):
        seed = int(Path(model.weights).parts[-3][-1])  # .../<cfg>-transferred-64-s<seed>/weights/best.pt
        timed.append(seed)
        return [10.0 + seed + k for k in range(runs)]

    monkeypatch.setattr(spd_study, "train_run", fake_train)
    monkeypatch.setattr(spd_study, "evaluate_run", fake_eval)
    monkeypatch.setattr(spd_study, "forward_times_ms", fake_times)
    argv = ["--data", str(shared_path("data", "deeppcb", "deeppcb.yaml")), "--weights", str(yolov5n_weights),
            "--fraction", "0.01", "--val-fraction", "0.01", "--imgsz", "64", "--device", "cpu", "--cfgs", "yolov5n.yaml",
            "--seeds", "0", "1", "--project", str(tmp_path), "--name", "p", "--latency-runs", "2",
            "--remeasure-latency", "3"]
    df, study_dir = spd_study.main(argv)
    assert timed == [0, 1, 1, 0, 0, 1]
    assert df["cpu_ms"].tolist() == [10.5, 11.5] and df["cpu_ms_min"].tolist() == [10.0, 11.0]
    cached = json.loads((study_dir / "yolov5n-transferred-64-s1" / "study_row.json").read_text())
    assert cached["cpu_ms"] == 11.5 and cached["load_at_latency"] != 5.0
    assert "3 rounds x 2 batch-1 forward passes" in (study_dir / "summary.md").read_text()
