"""The suite checks itself: plant a realistic bug in a temporary copy of the project and see the named
tests go red.

Each case patches one line of source text (the original must occur exactly once, so a refactor that
moves the line fails here loudly instead of silently testing nothing), then runs only the test
functions meant to catch that bug, in a subprocess. The unpatched copy passing those same tests is
checked once, so a red result means the mutation was caught, not that the copy is broken.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (id, file, original text, mutated text, test ids that must fail)
MUTATIONS = [
    ("nms-iou-hardcoded", "utils/nms.py",
     "torchvision.ops.nms(x[:, :4] + offsets, x[:, 4], iou_thres)",
     "torchvision.ops.nms(x[:, :4] + offsets, x[:, 4], 0.45)",
     ["tests/test_boxes_nms.py::test_nms_iou_threshold_by_hand"]),
    ("nms-agnostic-ignored", "utils/nms.py",
     "offsets = x[:, 5:6] * (0 if agnostic else MAX_WH)",
     "offsets = x[:, 5:6] * MAX_WH",
     ["tests/test_boxes_nms.py::test_nms_agnostic_merges_classes"]),
    ("nms-max-det-ignored", "utils/nms.py",
     "x[:, 4], iou_thres)[:max_det]",
     "x[:, 4], iou_thres)",
     ["tests/test_boxes_nms.py::test_nms_max_det_keeps_the_best"]),
    ("nms-labels-ignored", "utils/nms.py",
     "if labels and len(labels[xi]):",
     "if False:",
     ["tests/test_boxes_nms.py::test_nms_labels_are_added_as_certain_boxes"]),
    ("loss-balance", "utils/loss.py",
     "{3: [4.0, 1.0, 0.4]}",
     "{3: [4.0, 1.0, 0.25]}",
     ["tests/test_loss.py::test_objectness_level_balance_is_4_1_0_4"]),
    ("letterbox-int", "utils/augmentations.py",
     "new_unpad = (max(int(round(shape[1] * r)), 1), max(int(round(shape[0] * r)), 1))",
     "new_unpad = (max(int(shape[1] * r), 1), max(int(shape[0] * r), 1))",
     ["tests/test_boxes_nms.py::test_letterbox_rounds_sizes_that_do_not_scale_to_integers"]),
    ("allow-list-eval", "models/checkpoints.py",
     "[set, collections.OrderedDict, argparse.Namespace]",
     "[set, collections.OrderedDict, argparse.Namespace, __import__('builtins').eval]",
     ["tests/test_hostile_pickles.py::test_allow_list_refuses_every_payload"]),
]

IGNORE = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".benchmarks", "datasets", "*.pt",
                                "*.onnx", "*.torchscript")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tmp/repo (a copy of the project) beside tmp/shared (a link to the read-only ../shared)."""
    base = tmp_path_factory.mktemp("mut")
    shutil.copytree(ROOT, base / "repo", ignore=IGNORE)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (base / "shared").symlink_to(shared, target_is_directory=True)
    return base / "repo"


def run_tests(repo: Path, tests: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=repo, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_unmutated_copy_passes(workspace):
    tests = sorted({t for *_, ts in MUTATIONS for t in ts})
    r = run_tests(workspace, tests)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mid,file,old,new,tests", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_is_caught(workspace, mid, file, old, new, tests):
    path = workspace / file
    original = path.read_text()
    assert original.count(old) == 1, f"{mid}: the line to mutate is not in {file} exactly once"
    path.write_text(original.replace(old, new))
    try:
        r = run_tests(workspace, tests)
    finally:
        path.write_text(original)
    assert r.returncode == 1, f"{mid} survived (pytest exit {r.returncode}):\n{r.stdout[-3000:]}"
    assert " failed" in r.stdout.splitlines()[-1]
