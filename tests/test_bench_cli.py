"""The ``mvit2-bench`` command: it runs, prints its table, writes the documented JSON schema
(docs/performance.md) and a PNG, renders reports, and rejects bad filters clearly.

Runs are restricted to one small shape so that the file takes seconds. No test looks at a time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys

import pytest

from mvit2_kernels.bench import cases, shapes
from mvit2_kernels.bench.cli import main
from mvit2_kernels.bench.timing import rotation_count

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SHAPE = "w0.5-256px-L5-B1"  # C=128, P=4, N=16: the smallest design shape

# The schema of docs/performance.md, field by field: name -> accepted types.
TOP = {
    "schema_version": int,
    "kind": str,
    "created": str,
    "command": str,
    "environment": dict,
    "settings": dict,
    "rows": list,
    "skipped": list,
}
ENVIRONMENT = {
    "device": str,
    "device_name": str,
    "cpu_name": str,
    "cpu_count": int,
    "threads": int,
    "cpu_capability": str,
    "last_level_cache_bytes": int,
    "torch": str,
    "cuda": (str, type(None)),
    "triton": (str, type(None)),
    "transformers": (str, type(None)),
    "mvit2_kernels": str,
    "git_commit": (str, type(None)),
    "backends": list,
    "python": str,
    "platform": str,
    "gpu_multiprocessors": (int, type(None)),
    "gpu_memory_bytes": (int, type(None)),
}
NUM, OPT_NUM = (int, float), (int, float, type(None))
OP_ROW = {
    "shape": str,
    "batch": int,
    "channels": int,
    "pixels": int,
    "patches": int,
    "dtype": str,
    "pass": str,
    "impl": str,
    "median_ms": NUM,
    "iqr_ms": NUM,
    "repeats": int,
    "rotated_sets": int,
    "bytes": int,
    "gbps": NUM,
    "floor_ms": OPT_NUM,
    "floor_fraction": OPT_NUM,
    "speedup_vs_eager": OPT_NUM,
    "speedup_vs_compile": OPT_NUM,
}
MODEL_ROW = {
    "model": str,
    "resolution": int,
    "batch": int,
    "dtype": str,
    "mode": str,
    "impl": str,
    "median_ms": NUM,
    "iqr_ms": NUM,
    "repeats": int,
    "images_per_s": NUM,
    "attention_modules": int,
    "attention_ms": OPT_NUM,
    "attention_share": OPT_NUM,
}


def run_cli(*argv: str) -> str:
    """``mvit2-bench argv`` in this process; its stdout. Fails the test on a non-zero status."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def assert_fields(obj: dict, spec: dict, where: str) -> None:
    missing = set(spec) - set(obj)
    assert not missing, f"{where} lacks {sorted(missing)}"
    for key, types in spec.items():
        ok = isinstance(obj[key], types) and not isinstance(obj[key], bool)
        assert ok, f"{where}[{key!r}] = {obj[key]!r} is not {types}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run on the CPU at one shape and dtype, with --json and --plot."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--shape",
        SHAPE,
        "--dtype",
        "fp32",
        "--no-progress",
        "--json",
        str(out / "ops.json"),
    ]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(out / "ops.png")]
    stdout = run_cli(*argv)
    return stdout, json.loads((out / "ops.json").read_text()), out


def test_design_shapes_are_the_mobilevitv2_attention_stages():
    by_name = {s.name: s for s in shapes.design_shapes(32)}
    assert len(by_name) == 3 * 2 * 3 * 2  # widths × resolutions × stages × batches
    for name, (c, n) in {
        "w1.0-256px-L3-B32": (128, 256),
        "w1.0-256px-L4-B1": (192, 64),
        "w1.0-256px-L5-B1": (256, 16),
        "w0.5-256px-L3-B1": (64, 256),
        "w2.0-256px-L5-B32": (512, 16),
        "w1.0-512px-L3-B1": (128, 1024),
        "w2.0-512px-L5-B32": (512, 64),
    }.items():
        s = by_name[name]
        assert (s.channels, s.pixels, s.patches) == (c, 4, n), name
    assert {s.batch for s in shapes.design_shapes(256)} == {1, 256}


def test_op_bytes_follow_the_floor_of_design_section_1():
    s = shapes.Shape("s", batch=2, channels=3, pixels=4, patches=5)
    bpn = 2 * 4 * 5
    assert cases.op_bytes(s, cases.DTYPES["fp32"], "forward") == (1 + 3 * 3) * bpn * 4
    assert (
        cases.op_bytes(s, cases.DTYPES["bf16"], "forward+backward")
        == ((1 + 3 * 3) + (2 + 5 * 3)) * bpn * 2
    )


def test_rotation_outgrows_the_cache_within_its_memory_budget():
    assert rotation_count(1 << 20, 32 << 20) * (1 << 20) >= 2 * (32 << 20)
    assert rotation_count(1 << 30, 32 << 20) == 1  # one set larger than the budget: no copies
    assert rotation_count(1 << 20, 1 << 40, budget_bytes=8 << 20) == 8


def test_quick_run_prints_a_row_per_impl_pass_and_dtype(quick_run):
    stdout, doc, _ = quick_run
    header = next(line for line in stdout.splitlines() if line.startswith("shape"))
    for title in ("ms", "GB/s", "floor", "×eager", "×compile"):
        assert title in header.split()
    impls = ["copy", "eager", "compile", *cases.kernel_backends("cpu")]
    rows = [line.split() for line in stdout.splitlines() if line.startswith(SHAPE)]
    assert len(rows) == len(impls) * 2 == len(doc["rows"])
    assert {(r[5], r[6]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in impls}


def test_json_follows_the_documented_schema(quick_run):
    _, doc, _ = quick_run
    assert_fields(doc, TOP, "document")
    assert doc["schema_version"] == 1 and doc["kind"] == "ops"
    assert doc["command"].startswith("mvit2-bench --device cpu --quick")
    assert_fields(doc["environment"], ENVIRONMENT, "environment")
    assert doc["environment"]["device"] == "cpu" and doc["environment"]["threads"] >= 1
    assert doc["skipped"] == []
    for row in doc["rows"]:
        assert_fields(row, OP_ROW, f"row {row.get('impl')}")
        assert (row["shape"], row["dtype"], row["pixels"]) == (SHAPE, "fp32", 4)
        assert row["bytes"] == cases.op_bytes(
            shapes.Shape(SHAPE, 1, 128, 4, 16), cases.DTYPES["fp32"], row["pass"]
        )
        assert row["median_ms"] > 0 and row["repeats"] >= 1 and row["rotated_sets"] >= 1
        # The derived columns are the definitions of docs/performance.md.
        same = {r["impl"]: r["median_ms"] for r in doc["rows"] if r["pass"] == row["pass"]}
        assert math.isclose(row["gbps"], row["bytes"] / row["median_ms"] / 1e6)
        assert math.isclose(row["floor_ms"], same["copy"])
        assert math.isclose(row["floor_fraction"], same["copy"] / row["median_ms"])
        assert math.isclose(row["speedup_vs_eager"], same["eager"] / row["median_ms"])
        assert math.isclose(row["speedup_vs_compile"], same["compile"] / row["median_ms"])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="--plot needs matplotlib (in the test extra)")
def test_plot_is_a_png(quick_run):
    _, _, out = quick_run
    assert (out / "ops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_and_updates_the_results_section(quick_run, tmp_path):
    _, _, out = quick_run
    text = run_cli("report", str(out / "ops.json"))
    assert "### Kernels: " in text and "**fp32, fwd+bwd**" in text
    assert any(line.startswith(f"| {SHAPE} |") for line in text.splitlines())
    doc = tmp_path / "performance.md"
    doc.write_text("# Title\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    run_cli("report", str(out / "ops.json"), "--update", str(doc))
    updated = doc.read_text()
    assert updated.startswith("# Title\n<!-- results:begin -->\n### Kernels: ")
    assert "old" not in updated and updated.endswith("<!-- results:end -->\nafter\n")


def test_model_run_times_each_implementation_and_finds_all_attention_modules(tmp_path):
    pytest.importorskip("transformers")
    from mvit2_kernels.bench import models

    impls = [
        i for i in ("fused", "transformers") if i in models.model_builders("mobilevitv2", "0.5")
    ]
    path = tmp_path / "model.json"
    run_cli(
        "model",
        "--device",
        "cpu",
        "--quick",
        "--mode",
        "inference",
        "--impl",
        ",".join(impls),
        "--no-progress",
        "--json",
        str(path),
    )
    doc = json.loads(path.read_text())
    assert_fields(doc, TOP, "document")
    assert doc["kind"] == "model" and [r["impl"] for r in doc["rows"]] == impls
    for row in doc["rows"]:
        assert_fields(row, MODEL_ROW, f"row {row['impl']}")
        assert (row["model"], row["batch"], row["mode"]) == ("mobilevitv2-0.5", 1, "inference")
        assert row["attention_modules"] == 2 + 4 + 3  # attention layers of L3, L4, L5
        assert row["attention_ms"] > 0 and row["attention_share"] > 0


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", "cpu", "--backend", "triton"], "--backend 'triton' is not available on cpu"),
        (["--device", "cpu", "--backend", "nope"], "available:"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype 'fp16' is not benchmarked on cpu"),
        (["--device", "cpu", "--dtype", "int8"], "choose from fp32, bf16"),
        (["--shape", "w9*"], "--shape 'w9*' matches no shape"),
        (["--shape", "0x1x1x1"], "must be >= 1"),
        (["--pass", "sideways"], "--pass 'sideways'"),
        (["model", "--device", "cpu", "--impl", "nope"], "--impl 'nope'"),
        (["model", "--device", "cpu", "--width", "3.0"], "--width '3.0'"),
        (["model", "--device", "cpu", "--mode", "serving"], "--mode 'serving'"),
    ],
)
def test_bad_filters_exit_2_naming_the_value(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "error:" in err


def test_report_rejects_a_file_that_is_no_result(tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(bad)])
    assert exit_info.value.code == 2 and "schema_version" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "mvit2_kernels.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    assert "--quick" in done.stdout and "model" in done.stdout and "report" in done.stdout


def test_plain_progress_prints_rows_to_stdout_and_no_bar_when_disabled(capsys):
    from mvit2_kernels.bench.progress import PlainProgress

    bar = PlainProgress(2, enabled=False)
    bar.write("row 1")
    bar.update()
    bar.write("row 2")
    bar.update()
    bar.close()
    out = capsys.readouterr()
    assert out.out == "row 1\nrow 2\n" and out.err == ""
