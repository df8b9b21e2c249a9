"""``torch.compile`` of whole fused models, against the same models run eagerly.

transformers' MobileViTV2 (classification, segmentation) and SwiftFormer after ``fuse_``:
inference at two image sizes, and training (forward, loss, backward: every gradient); our
MobileViTv2 and SwiftFormer: three compiled training steps (forward and loss as one graph, its
compiled backward, the compiled SGD step) with the fused ops in the generated code; and the
inductor bug that fused transformers models met (docs/compile.md) in plain torch.

Each case runs in its own process (``fixtures/compile_checks.py``), so that generated code that
corrupts the heap (an abort, exit 134) fails its test and names the check, instead of ending the
run. Inductor's graph caches are off in them (their keys do not see the fix: a graph compiled
without it would be loaded as it was, and one compiled with it would hide its removal), so
inductor generates the code every time; the compiled kernels themselves are cached by their
source, which the fix changes. Compiling is mostly one busy core, so the selected cases start
together when the module does, two at a time.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TIMEOUT_S = 1200  # a hang, not a slow compile: each case takes 0.2-2 min on an idle core
TRANSFORMERS_CASES = [
    "transformers-mobilevitv2-classifier",
    "transformers-mobilevitv2-segmenter",
    "transformers-swiftformer",
]
TRAINING_STEP_CASES = ["mobilevitv2-training-step", "swiftformer-training-step"]


def run_case(case: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    return subprocess.run([sys.executable, "-m", "fixtures.compile_checks", case], cwd=TESTS,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def started(request) -> dict[str, Future]:
    """The processes of the cases selected in this module, started two at a time."""
    cases = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec and "case" in callspec.params:
            cases.append(callspec.params["case"])
    if importlib.util.find_spec("transformers") is None:  # those tests skip
        cases = [case for case in cases if case not in TRANSFORMERS_CASES]
    pool = ThreadPoolExecutor(max_workers=2)
    yield {case: pool.submit(run_case, case) for case in dict.fromkeys(cases)}
    pool.shutdown(cancel_futures=True)


def check_case(case: str, started: dict[str, Future]) -> None:
    proc = started[case].result()
    if proc.returncode == 0:
        return
    checks = [line[6:] for line in proc.stdout.splitlines() if line.startswith("check ")]
    check = checks[-1] if checks else "(start-up)"
    rc = proc.returncode
    how = ("failed" if rc == 1 else
           f"crashed ({signal.Signals(-rc).name})" if rc < 0 else f"crashed (exit {rc})")
    pytest.fail(f"{case}: check {check!r} {how}\n--- stdout\n{proc.stdout[-2000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}", pytrace=False)


@pytest.mark.parametrize("case", ["inductor-fold"])
def test_inductor_folds_a_transposed_tile_within_its_buffer(case, started):
    """docs/compile.md's repro: ``F.fold`` of a sum of a contiguous and a channels-last tensor,
    two threads. Without the fix the scatter writes past its buffer (a crash or wrong values)."""
    check_case(case, started)


@pytest.mark.parametrize("case", TRANSFORMERS_CASES)
def test_compiled_transformers_model_after_fuse_matches_eager(case, started):
    pytest.importorskip("transformers")
    check_case(case, started)


@pytest.mark.parametrize("case", TRAINING_STEP_CASES)
def test_compiled_training_steps_of_our_models_match_eager(case, started):
    check_case(case, started)
