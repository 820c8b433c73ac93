"""benchmarks/vs_yolov5.py: pairing, medians and ratios, the reference's SPD config, the dataset copy."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import vs_yolov5 as vs  # noqa: E402


def _job(name="val"):
    return vs.Job(name, "what", {vs.OURS: ["a"], vs.REF: ["b"]}, items=10)


def test_ratio_is_the_median_of_pairwise_ratios_not_the_ratio_of_medians():
    job = _job()
    ours, ref = [10.0, 30.0, 20.0], [20.0, 20.0, 80.0]  # pairwise 0.5, 1.5, 0.25 -> median 0.5
    rows = [{"job": "val", "side": s, "pair": i, "value": v, "per_s": 10 / v}
            for s, vals in ((vs.OURS, ours), (vs.REF, ref)) for i, v in enumerate(vals)]
    (s,) = vs.summarise([job], rows)
    assert s["ours"] == 20.0 and s["reference"] == 20.0  # the medians alone would say "level"
    assert s["ratio"] == 0.5 and s["ratios"] == "0.500 1.500 0.250" and s["pairs"] == 3


def test_summary_without_the_reference_has_no_ratio():
    rows = [{"job": "val", "side": vs.OURS, "pair": i, "value": v, "per_s": 1.0} for i, v in enumerate([3.0, 1.0])]
    (s,) = vs.summarise([_job()], rows)
    assert s["reference"] is None and s["ratio"] is None and s["ours"] == 2.0


def test_pairs_alternate_which_side_runs_first(monkeypatch):
    order = []
    monkeypatch.setattr(vs, "run_once", lambda job, side, env: (order.append((side, env)), {
        "job": job.name, "side": side, "wall_s": 1.0, "value": 1.0})[1])
    vs.measure([_job()], pairs=4, envs={vs.REF: {"X": "1"}})
    assert [s for s, _ in order] == [vs.OURS, vs.REF, vs.REF, vs.OURS, vs.OURS, vs.REF, vs.REF, vs.OURS]
    assert all((env == {"X": "1"}) == (side == vs.REF) for side, env in order)  # only the reference gets its env


def test_reference_spd_config_swaps_only_the_space_to_depth_layers(tmp_path):
    ours = yaml.safe_load((ROOT / "models" / "yolov5n-spd.yaml").read_text())
    ref = yaml.safe_load(vs.reference_spd_cfg(tmp_path).read_text())
    layers = lambda d: d["backbone"] + d["head"]  # noqa: E731
    swapped = [(a, b) for a, b in zip(layers(ours), layers(ref)) if a != b]
    n_spd = sum(layer[2] == "space_to_depth" for layer in layers(ours))  # 6: the stem is a Focus
    assert n_spd == 6 and len(swapped) == n_spd and all(a[2] == "space_to_depth" and b[2] == "Contract" and b[3] == [2]
                                     for a, b in swapped)


def test_dataset_is_copied_and_the_yaml_points_at_the_copy(tmp_path):
    data = ROOT.parent / "shared" / "data" / "coco8" / "coco8.yaml"
    if not data.is_file():
        pytest.skip("coco8 not available in ../shared")
    f, n = vs.prepare_data(data, tmp_path)
    d = yaml.safe_load(f.read_text())
    assert Path(d["path"]).is_relative_to(tmp_path) and (Path(d["path"]) / d["train"]).is_dir()
    assert n == len(list((data.parent / "images" / "train").glob("*.jpg")))


def test_reference_python_is_none_without_yolov5_and_a_missing_one_is_refused(monkeypatch):
    monkeypatch.setattr(vs.importlib.util, "find_spec", lambda name: None)
    assert vs.reference_python(None) is None
    with pytest.raises(SystemExit, match="does not exist"):
        vs.reference_python("/nonexistent/python")


def test_shown_command_hides_temporary_paths_and_quotes_empty_weights():
    job = vs.Job("t", "w", {vs.OURS: [sys.executable, "train.py", "--data", "/tmp/abc/d.yaml", "--weights", ""]})
    assert vs.shown_command(job, "/tmp/abc") == "python train.py --data <tmp>/d.yaml --weights ''"
    probe = vs.Job("l", "w", {vs.OURS: [sys.executable, "-c", "import x\nprint(1)", "yolov5n.yaml", "640"]})
    assert vs.shown_command(probe, "/tmp/abc") == "python -c <latency probe> yolov5n.yaml 640"
