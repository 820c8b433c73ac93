"""Shared fixtures: paths to the read-only ../shared data, skipping cleanly where it is absent."""
from __future__ import annotations

import os
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
