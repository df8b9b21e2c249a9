"""scripts/gpu_check.sh (the one-call GPU verification) where there is no GPU: it says so in one
line and exits non-zero at once, building and writing nothing; and its sanitizer driver's
--dry-run (scripts/gpu_sanitize_cases.py: every CUDA op's schema exists, its cases run on the CPU
kernels). The GPU run itself is rehearsed with GPU_CHECK_DRY_RUN=1 (docs/performance.md)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvit2_kernels.backends import compiled_cpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

NO_DRIVER = (
    "#!/bin/sh\n"
    "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
    "exit 9\n"
)
NO_DEVICE = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


@pytest.mark.parametrize("nvidia_smi", ["absent", "no driver", "no device"])
def test_without_a_gpu_it_says_so_in_one_line_and_exits_at_once(tmp_path, nvidia_smi):
    """At once: exit 3 with one line, before any step, so nothing is built or written."""
    # PATH holds only the few tools the script needs before its GPU check (and the stub
    # nvidia-smi), so the case is the same on a machine that has a GPU; were the script to go
    # on, it would find no python to build with.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "basename", "timeout", "head"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"needs {tool}")
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi != "absent":
        stub = bin_dir / "nvidia-smi"
        stub.write_text(NO_DRIVER if nvidia_smi == "no driver" else NO_DEVICE)
        stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(PATH=str(bin_dir), OUT=str(out), GPU_CHECK_WORK=str(work))
    done = subprocess.run([BASH, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check.sh: no GPU on this machine"), lines
    assert ("no nvidia-smi" in lines[0]) == (nvidia_smi == "absent"), lines
    assert not out.exists() and not work.exists(), "nothing is written without a GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_ci_deselects_the_slow_tests_and_the_gpu_check_selects_them():
    """scripts/test.sh (CI, 2 cores) runs pytest with ``-m "not slow"`` before the caller's
    arguments; scripts/gpu_check.sh names the slow tests explicitly, so that they run on a GPU."""
    ci = [line for line in (ROOT / "scripts" / "test.sh").read_text().splitlines()
          if "-m pytest" in line]
    assert ci == ['"$PY" -m pytest -q tests -m "not slow" "$@"'], ci
    assert '-m "slow or not slow"' in SCRIPT.read_text()


def test_the_script_parses():
    done = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not compiled_cpu(), reason="needs the CPU kernels built")
def test_the_sanitizer_driver_dry_run_runs_every_case_on_the_cpu_kernels():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_sanitize_cases.py"), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "8 ops registered" in lines[0], lines
    assert sum(line.startswith("ok ") for line in lines) == 14, lines
    assert lines[-1] == "gpu_sanitize_cases: 0 of 14 cases failed on cpu", lines
