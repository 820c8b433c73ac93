"""Shared fixtures: paths to the read-only ../shared data, skipping cleanly where it is absent."""
from __future__ import annotations


import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared fixture {p} not present")
    return p


@pytest.fixture(scope="session")
def yolov5n_weights() -> Path:
    return shared_path("weights", "yolov5n.pt")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return shared_path("images")


def pytest_collection_modifyitems(items: list) -> None:
    """Run tests/test_mutations.py first: it copies the tree and runs pytest in subprocesses, and in a whole-suite
    run its first subprocess start crashed the parent (SIGSEGV, twice) once earlier tests had loaded OpenVINO,
    NNCF and ONNX Runtime thread pools into it. The cause is not found yet; .ci/run also keeps test_int8.py (OpenVINO/NNCF) in a process of its own."""
    items.sort(key=lambda item: 0 if item.path.name == "test_mutations.py" else 1)  # stable: the rest keep their order
    for item in items:
        if _is_heavy(item.nodeid) or "trained" in getattr(item, "fixturenames", ()):  # (a fixture that trains)
            item.add_marker(pytest.mark.slow)


# Cases that run the same code as a cheaper sibling, only bigger (the m/l/x model sizes), and the few unit tests
# that train or export end to end: slow, so `-m "not slow"` stays a quick loop (the whole suite runs them all).
_HEAVY_PARAMS = re.compile(r"\[(yolov5[mlx]\b[^\]]*|[mlx](-\d+)?)\]")
_HEAVY_TESTS = {
    "tests/test_classify.py::test_train_outputs", "tests/test_classify.py::test_benchmark_smoke",
    "tests/test_classify.py::test_one_batch_overfit",
    "tests/test_detect.py::test_video_end_to_end", "tests/test_export.py::test_dynamic_exports_match_pt",
    "tests/test_spd_study.py::test_seeds_summary_pareto_and_resume_per_seed",
    "tests/test_export.py::test_spd_openvino_export",
    "tests/test_first_hour.py::test_val_on_a_fixed_shape_export_says_it_forces_size_and_batch",
}


def _is_heavy(nodeid: str) -> bool:
    return nodeid.split("[")[0] in _HEAVY_TESTS or bool(_HEAVY_PARAMS.search(nodeid))
