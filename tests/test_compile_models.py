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
source, which the fix changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TIMEOUT_S = 1200  # a hang, not a slow compile: each case takes 0.5-3 min on 2 idle cores


def run_case(case: str) -> None:
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "fixtures.compile_checks", case], cwd=TESTS,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode == 0:
        return
    started = [line[6:] for line in proc.stdout.splitlines() if line.startswith("check ")]
    check = started[-1] if started else "(start-up)"
    how = "failed" if proc.returncode == 1 else f"crashed (exit {proc.returncode})"
    pytest.fail(f"{case}: check {check!r} {how}\n--- stdout\n{proc.stdout[-2000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}", pytrace=False)


def test_inductor_folds_a_transposed_tile_within_its_buffer():
    """docs/compile.md's repro: ``F.fold`` of a sum of a contiguous and a channels-last tensor,
    two threads. Without the fix the scatter writes past its buffer (a crash or wrong values)."""
    run_case("inductor-fold")


@pytest.mark.parametrize("case", [
    "transformers-mobilevitv2-classifier",
    "transformers-mobilevitv2-segmenter",
    "transformers-swiftformer",
])
def test_compiled_transformers_model_after_fuse_matches_eager(case):
    pytest.importorskip("transformers")
    run_case(case)


@pytest.mark.parametrize("case", ["mobilevitv2-training-step", "swiftformer-training-step"])
def test_compiled_training_steps_of_our_models_match_eager(case):
    run_case(case)
