"""The ``mvit2-bench`` command: its shapes come from the models, it runs, prints its tables,
writes the documented JSON schema (docs/performance.md) and a PNG, reads result files of every
version back, and rejects bad filters clearly.

Runs are restricted to one small shape per op so that the file takes seconds. No test looks at a
time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.optional import optional

from mvit2_kernels.bench import kernels, results
from mvit2_kernels.bench.cli import main
from mvit2_kernels.bench.timing import rotation_count

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPE = "w0.5-256px-L5-B1"  # separable: C=128, P=4, N=16: the smallest design shape
ADD_SHAPE = "sf-xs-224px-s4-B1"  # additive: N=49 tokens of D=220: SwiftFormer-XS's last stage
SIZES = {SHAPE: (1, 128, 4, 16), ADD_SHAPE: (1, 220, 1, 49)}  # B, C or D, P, N
OP_OF = {SHAPE: "separable", ADD_SHAPE: "additive"}
PNG = b"\x89PNG\r\n\x1a\n"

# The schema of docs/performance.md, field by field: name -> accepted types.
TOP = {"schema_version": int, "kind": str, "created": str, "command": str, "environment": dict,
       "settings": dict, "rows": list, "skipped": list}
ENVIRONMENT = {
    "device": str, "device_name": str, "cpu_name": str, "cpu_count": int, "threads": int,
    "cpu_capability": str, "last_level_cache_bytes": int, "torch": str,
    "cuda": (str, type(None)), "triton": (str, type(None)), "transformers": (str, type(None)),
    "mvit2_kernels": str, "git_commit": (str, type(None)), "backends": list, "python": str,
    "platform": str, "gpu_multiprocessors": (int, type(None)),
    "gpu_memory_bytes": (int, type(None)),
}
NUM, OPT_NUM = (int, float), (int, float, type(None))
TIMED = {"impl": str, "median_ms": NUM, "iqr_ms": NUM, "repeats": int, "round_ms": list,
         "peak_mib": OPT_NUM}
OP_ROW = {
    "op": str, "shape": str, "batch": int, "channels": int, "pixels": int, "patches": int,
    "dtype": str, "pass": str, "grads": (str, type(None)), **TIMED, "rotated_sets": int,
    "bytes": int, "gbps": NUM,
    "floor_ms": OPT_NUM, "floor_fraction": OPT_NUM, "speedup_vs_eager": OPT_NUM,
    "speedup_vs_compile": OPT_NUM,
}
SETTINGS = {"quick": bool, "repeat": int, "impls": list, "timer": str, "warmup_s": NUM,
            "min_run_time_s": NUM, "min_repeats": int}
OPS_SETTINGS = {**SETTINGS, "ops": list, "additive_variant": str, "grad_paths": dict,
                "grad_rounds": int, "train_batch": int, "dtypes": list, "passes": list,
                "shapes": list}
# The rows of one shape and pass: (pass, gradient path) of each op.
PATHS = {"separable": [("forward", None), ("forward+backward", "set_to_none"),
                       ("forward+backward", "accumulate")],
         "additive": [("forward", None), ("forward+backward", "set_to_none")]}
MODEL_ROW = {
    "model": str, "resolution": int, "batch": int, "dtype": str, "mode": str, **TIMED,
    "images_per_s": NUM, "attention_modules": int, "attention_ms": OPT_NUM,
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
        ok = isinstance(obj[key], types) and (types is bool or not isinstance(obj[key], bool))
        assert ok, f"{where}[{key!r}] = {obj[key]!r} is not {types}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run on the CPU at one shape of each op (both ops run by default) and one
    dtype, with --json and --plot."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--quick", "--shape", f"{SHAPE},{ADD_SHAPE}", "--dtype", "fp32",
            "--no-progress", "--json", str(out / "ops.json")]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(out / "ops.png")]
    stdout = run_cli(*argv)
    return stdout, json.loads((out / "ops.json").read_text()), out


def test_design_shapes_are_the_mobilevitv2_attention_stages():
    by_name = {s.name: s for s in kernels.design_shapes(32, ["separable"])}
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
        assert (s.channels, s.pixels, s.patches, s.op) == (c, 4, n, "separable"), name
    assert {s.batch for s in kernels.design_shapes(256, ["separable"])} == {1, 256}


# Stage dims of SwiftFormer as published, and the tokens each stage's attention sees at 224².
SWIFTFORMER_DIMS = {
    "xs": (48, 56, 112, 220),
    "s": (48, 64, 168, 224),
    "l1": (48, 96, 192, 384),
    "l3": (64, 128, 320, 512),
}
TOKENS = (3136, 784, 196, 49)


def test_additive_shapes_are_every_swiftformer_stage_of_xs_and_l3_and_all_variants_known():
    expected = {
        f"sf-{variant}-224px-s{stage + 1}-B{b}": (b, dims[stage], TOKENS[stage])
        for variant, dims in SWIFTFORMER_DIMS.items()
        for stage in range(4)
        for b in (1, 32)
    }
    known = kernels.design_shapes(32, ["additive"], SWIFTFORMER_DIMS)
    assert {s.name: (s.batch, s.channels, s.patches) for s in known} == expected
    assert all(s.op == "additive" and s.pixels == 1 for s in known)
    timed = {s.name for s in kernels.design_shapes(32, ["additive"])}
    assert timed == {n for n in expected if n.startswith(("sf-xs-", "sf-l3-"))}
    both = kernels.design_shapes(32)  # the default: both ops, separable first
    assert [s.op for s in both] == ["separable"] * 36 + ["additive"] * 16


@pytest.mark.parametrize(
    "family, variant, res", [("mobilevitv2", 0.5, 512), ("swiftformer", "l3", 224)]
)
def test_shapes_are_those_the_models_give_their_attention(family, variant, res):
    """The named shapes are derived from the models' configurations: they are the inputs that the
    models' attention modules see (traced on the meta device: no memory, no arithmetic)."""
    from mvit2_kernels import EfficientAdditiveAttention, SeparableAttention, models

    with torch.device("meta"):
        if family == "mobilevitv2":
            model, prefix = models.mobilevitv2(variant, fused=False), f"w{variant}-{res}px-"
        else:
            model = getattr(models, f"swiftformer_{variant}")(variant="normalize", fused=False)
            prefix = f"sf-{variant}-{res}px-"
    seen = []
    for m in model.modules():
        if isinstance(m, (SeparableAttention, EfficientAdditiveAttention)):
            m.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    model(torch.empty(1, 3, res, res, device="meta"))
    named = [s for s in kernels.design_shapes(1, variants=SWIFTFORMER_DIMS)
             if s.name.startswith(prefix)]
    layout = [(1, s.channels, s.pixels, s.patches) if s.op == "separable"
              else (1, s.patches, s.channels) for s in named]
    assert layout == list(dict.fromkeys(seen))


def test_quick_shapes_are_one_stage_per_op_at_both_batches():
    quick = [s.name for s in kernels.quick_shapes(32)]
    assert quick == ["w1.0-256px-L3-B1", "w1.0-256px-L3-B32", "sf-xs-224px-s1-B1",
                     "sf-xs-224px-s1-B32"]
    assert [s.name for s in kernels.quick_shapes(32, ["additive"])] == quick[2:]


def test_custom_shapes_are_bxcxpxn_for_separable_and_bxnxd_for_additive():
    (sep,) = kernels.select_shapes(["2x8x4x16"], 32)
    assert (sep.op, sep.batch, sep.channels, sep.pixels, sep.patches) == ("separable", 2, 8, 4, 16)
    (add,) = kernels.select_shapes(["2x49x48"], 32)
    assert (add.name, add.op, add.batch, add.channels, add.pixels, add.patches) == (
        "B2-N49-D48", "additive", 2, 48, 1, 49)
    with pytest.raises(ValueError, match="--op leaves additive out"):
        kernels.select_shapes(["2x49x48"], 32, ["separable"])


def test_op_bytes_follow_the_floor_of_each_op():
    s = kernels.Shape("s", batch=2, channels=3, pixels=4, patches=5)
    bpn = 2 * 4 * 5
    assert kernels.op_bytes(s, torch.float32, "forward") == (1 + 3 * 3) * bpn * 4
    assert kernels.op_bytes(s, torch.bfloat16, "forward+backward") == (
        (1 + 3 * 3) + (2 + 5 * 3)) * bpn * 2
    # Additive: forward reads q, k and writes G*kn, qn (4·B·N·D); backward reads grad_out,
    # grad_qn, q, k and writes dq, dk (6·B·N·D).
    a = kernels.Shape("a", batch=2, channels=3, pixels=1, patches=5, op="additive")
    bnd = 2 * 5 * 3
    assert kernels.op_bytes(a, torch.float32, "forward") == 4 * bnd * 4
    assert kernels.op_bytes(a, torch.bfloat16, "forward+backward") == (4 + 6) * bnd * 2


def test_rotation_outgrows_the_cache_within_its_memory_budget():
    assert rotation_count(1 << 20, 32 << 20) * (1 << 20) >= 2 * (32 << 20)
    assert rotation_count(1 << 30, 32 << 20) == 1  # one set larger than the budget: no copies
    assert rotation_count(1 << 20, 1 << 40, budget_bytes=8 << 20) == 8


def test_input_sets_rotate_views_of_one_qkv_and_count_its_bytes_once():
    s = kernels.Shape("s", batch=2, channels=8, pixels=4, patches=16)
    qkv_bytes, grad_y_bytes = (1 + 2 * 8) * s.elements * 4, 8 * s.elements * 4  # fp32
    # Forward: q, k, v are views of one qkv.
    sets = kernels.input_sets(s, torch.float32, "cpu", False, cache=5 * qkv_bytes)
    assert len(sets) == 10 and {t.data_ptr() for t, *_ in sets}.__len__() == 10
    q, k, v = sets[0]
    assert q._base is k._base is v._base and not q.requires_grad
    # Backward: the qkv leaf (and its .grad) and the output gradient.
    one_set = 2 * qkv_bytes + grad_y_bytes
    sets = kernels.input_sets(s, torch.float32, "cpu", True, cache=10 * one_set)
    assert len(sets) == 20
    (qkv,), (g,) = sets[0]
    assert qkv.shape == (2, 17, 4, 16) and qkv.requires_grad and not g.requires_grad
    # The packed entry point's forward: the qkv leaves themselves.
    sets = kernels.input_sets(s, torch.float32, "cpu", False, cache=5 * qkv_bytes, packed=True)
    assert len(sets) == 10 and [t.shape for t in sets[0]] == [(2, 17, 4, 16)]


SMALL = {"separable": kernels.Shape("s", 2, 8, 4, 16),
         "additive": kernels.Shape("a", 2, 8, 1, 16, op="additive")}


@pytest.mark.parametrize("op", list(kernels.OPS))
def test_both_gradient_paths_give_the_gradient_of_the_reference(op):
    """set_to_none leaves one step's gradient in the leaves' .grad (here qkv.grad, through the
    q, k, v views), accumulate adds the next step's to it; both are the reference's gradient."""
    torch.manual_seed(0)
    tensors = kernels.input_sets(SMALL[op], torch.float64, "cpu", True, cache=0)[0]
    leaves, grads = tensors
    spec = kernels.OPS[op]
    want = torch.autograd.grad(spec.reference(*spec.inputs(*leaves)), leaves, grads)
    for impl in ["eager", "compile", *kernels.fused_impls(kernels.kernel_backends("cpu"), [op])]:
        fn, packed = kernels.op_function(impl, op), impl.endswith(kernels.PACKED)
        set_to_none, accumulate = (kernels.step(fn, op, path, packed)
                                   for path in kernels.GRAD_PATHS)
        set_to_none(*tensors)
        set_to_none(*tensors)  # again: still one step's gradient
        for t, w in zip(leaves, want, strict=True):
            torch.testing.assert_close(t.grad, w, msg=f"{impl} set_to_none")
        accumulate(*tensors)
        for t, w in zip(leaves, want, strict=True):
            torch.testing.assert_close(t.grad, 2 * w, msg=f"{impl} accumulate")


def test_quick_run_prints_a_compare_table_per_op_and_pass(quick_run):
    stdout, doc, _ = quick_run
    lines = stdout.splitlines()
    impls = {op: ["copy", "eager", "compile", *kernels.fused_impls(kernels.kernel_backends("cpu"),
                                                                    [op])] for op in PATHS}
    assert impls["separable"][-1] == kernels.kernel_backends("cpu")[-1] + "-qkv"
    for shape, op in OP_OF.items():
        for pass_ in kernels.PASSES:
            title = f"{op} attention, fp32, {pass_}"
            (at,) = [i for i, line in enumerate(lines) if f" {title} " in line]
            header, _, *table = lines[at + 1 : at + 6]
            assert header.replace("|", " ").split() == impls[op]
            paths = [p for pass_of, p in PATHS[op] if pass_of == pass_]
            for path, row in zip(paths, table, strict=False):  # a line per gradient path
                assert row.split("|")[0].split() == [shape, *([f"({path})"] if path else [])]
                assert len(row.split("|")) == 1 + len(impls[op])
    for backend in kernels.kernel_backends("cpu"):  # a line of derived figures per kernel row
        assert f"{SHAPE}  {backend}: " in stdout and " of floor, " in stdout
    assert len(doc["rows"]) == sum(len(PATHS[op]) * len(impls[op]) for op in PATHS)


def test_json_follows_the_documented_schema(quick_run):
    _, doc, _ = quick_run
    assert_fields(doc, TOP, "document")
    assert doc["schema_version"] == 1 and doc["kind"] == "ops"
    assert doc["command"].startswith("mvit2-bench --device cpu --quick")
    assert_fields(doc["environment"], ENVIRONMENT, "environment")
    assert doc["environment"]["device"] == "cpu" and doc["environment"]["threads"] >= 1
    assert_fields(doc["settings"], OPS_SETTINGS, "settings")
    assert doc["settings"]["ops"] == ["separable", "additive"]
    assert doc["settings"]["additive_variant"] == "normalize"
    assert doc["settings"]["grad_paths"] == {"separable": ["set_to_none", "accumulate"],
                                             "additive": ["set_to_none"]}
    assert doc["skipped"] == []
    for row in doc["rows"]:
        assert_fields(row, OP_ROW, f"row {row.get('impl')}")
        assert row["op"] == OP_OF[row["shape"]] and row["dtype"] == "fp32"
        assert (row["pass"], row["grads"]) in PATHS[row["op"]]
        b, c, p, n = SIZES[row["shape"]]
        assert (row["batch"], row["channels"], row["pixels"], row["patches"]) == (b, c, p, n)
        shape = kernels.Shape(row["shape"], b, c, p, n, op=row["op"])
        assert row["bytes"] == kernels.op_bytes(shape, torch.float32, row["pass"])
        assert row["median_ms"] > 0 and row["repeats"] >= 1 and row["rotated_sets"] >= 1
        assert row["peak_mib"] is None  # CPU
        # Two paths alternate over GRAD_ROUNDS rounds: the figure is the median of the rounds'.
        rounds = kernels.GRAD_ROUNDS if row["op"] == "separable" and row["grads"] else 1
        assert len(row["round_ms"]) == rounds
        assert math.isclose(row["median_ms"], statistics.median(row["round_ms"]))
        # The derived columns are the definitions of docs/performance.md, within one group and
        # gradient path.
        same = {
            r["impl"]: r["median_ms"]
            for r in doc["rows"]
            if (r["shape"], r["pass"], r["grads"]) == (row["shape"], row["pass"], row["grads"])
        }
        assert math.isclose(row["gbps"], row["bytes"] / row["median_ms"] / 1e6)
        assert math.isclose(row["floor_ms"], same["copy"])
        assert math.isclose(row["floor_fraction"], same["copy"] / row["median_ms"])
        assert math.isclose(row["speedup_vs_eager"], same["eager"] / row["median_ms"])
        assert math.isclose(row["speedup_vs_compile"], same["compile"] / row["median_ms"])


def test_op_additive_times_only_the_additive_attention(tmp_path):
    path = tmp_path / "additive.json"
    stdout = run_cli("--device", "cpu", "--op", "additive", "--quick", "--train-batch", "1",
                     "--dtype", "fp32", "--pass", "fwd", "--no-compile", "--no-progress",
                     "--json", str(path))
    assert "additive attention, fp32, forward" in stdout and "separable" not in stdout
    doc = json.loads(path.read_text())
    assert doc["settings"]["ops"] == ["additive"]
    assert doc["settings"]["shapes"] == ["sf-xs-224px-s1-B1"]
    assert [r["impl"] for r in doc["rows"]] == ["copy", "eager", *kernels.kernel_backends("cpu")]
    for row in doc["rows"]:
        assert_fields(row, OP_ROW, f"row {row['impl']}")
        assert (row["op"], row["shape"]) == ("additive", "sf-xs-224px-s1-B1")
        assert row["pass"] == "forward"
        assert (row["batch"], row["channels"], row["pixels"], row["patches"]) == (1, 48, 1, 3136)
        assert row["bytes"] == 4 * 3136 * 48 * 4  # 4·B·N·D fp32 elements
        assert row["speedup_vs_compile"] is None


def test_an_impl_that_raises_is_skipped_not_fatal(tmp_path, monkeypatch, capsys):
    real = kernels.op_function

    def broken(impl, op):
        if impl == "eager":
            raise RuntimeError("broken on purpose")
        return real(impl, op)

    monkeypatch.setattr(kernels, "op_function", broken)
    path = tmp_path / "skip.json"
    run_cli("--device", "cpu", "--quick", "--shape", SHAPE, "--dtype", "fp32", "--pass", "fwd",
            "--no-compile", "--no-progress", "--json", str(path))
    doc = json.loads(path.read_text())
    (skip,) = doc["skipped"]
    assert (skip["shape"], skip["impl"], skip["reason"]) == (
        SHAPE, "eager", "RuntimeError: broken on purpose")
    assert [r["impl"] for r in doc["rows"]] == ["copy", *kernels.fused_impls(
        kernels.kernel_backends("cpu"))]
    assert all(r["speedup_vs_eager"] is None for r in doc["rows"])
    assert "skipped eager at separable, " in capsys.readouterr().err


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="--plot needs matplotlib (in the test extra)")
def test_plot_is_a_png(quick_run):
    _, _, out = quick_run
    assert (out / "ops.png").read_bytes()[:8] == PNG


def test_report_prints_the_tables_of_a_result_file(quick_run):
    stdout, _, out = quick_run
    text = run_cli("report", str(out / "ops.json"))
    assert text.startswith(f"{out / 'ops.json'}: ops on ")
    tables = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(tables) == 4 and all(t in text for t in tables)


def test_report_reads_files_written_before_the_additive_op(quick_run, tmp_path):
    """Rows without "op" (schema_version 1 files from before the additive op) are separable."""
    _, doc, _ = quick_run
    old = {**doc, "settings": {k: v for k, v in doc["settings"].items() if k != "ops"}}
    old["rows"] = [{k: v for k, v in r.items() if k not in ("op", "round_ms", "peak_mib")}
                   for r in doc["rows"] if r["op"] == "separable"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    argv = ["report", str(path)] + (["--plot", str(tmp_path / "old.png")] if HAS_MATPLOTLIB else [])
    text = run_cli(*argv)
    assert "separable attention, fp32, forward" in text and "additive" not in text
    if HAS_MATPLOTLIB:
        assert (tmp_path / "old.png").read_bytes()[:8] == PNG


def test_report_reads_every_committed_result_file():
    files = sorted(RESULTS.rglob("*.json"))
    assert files, RESULTS
    text = run_cli("report", *map(str, files))
    for f in files:
        assert f"{f}: {json.loads(f.read_text())['kind']} on " in text


def test_report_rejects_a_file_that_is_no_result(tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(bad)])
    assert exit_info.value.code == 2 and "schema_version" in capsys.readouterr().err


def test_render_prints_derived_figures_under_each_table():
    row = {"op": "separable", "shape": "s", "dtype": "fp32", "pass": "forward"}
    rows = [{**row, "impl": "copy", "median_ms": 1.0, "floor_fraction": 1.0},
            {**row, "impl": "cpu", "median_ms": 2.0, "floor_fraction": 0.5, "gbps": 3.0,
             "speedup_vs_eager": 4.0, "speedup_vs_compile": None}]
    text = results.render(rows, "ops", threads=2)
    assert "separable attention, fp32, forward" in text and "2 threads" in text
    assert "  s  cpu: 0.5 of floor, 3 GB/s, 4 ×eager\n" in text and "s  copy:" not in text


def test_model_run_times_each_implementation_and_finds_all_attention_modules(tmp_path):
    with optional("transformers"):  # the model classes, which transformers imports lazily
        from transformers import MobileViTV2Config, MobileViTV2ForImageClassification  # noqa: F401
    path = tmp_path / "model.json"
    run_cli("model", "--model", "mobilevitv2", "--device", "cpu", "--quick", "--mode", "inference",
            "--impl", "fused,transformers", "--resolution", "64", "--no-progress",
            "--json", str(path))
    doc = json.loads(path.read_text())
    assert_fields(doc, TOP, "document")
    assert doc["kind"] == "model" and [r["impl"] for r in doc["rows"]] == ["fused", "transformers"]
    assert_fields(doc["settings"], {**SETTINGS, "dtype": str, "backend": str, "cases": list},
                  "settings")
    for row in doc["rows"]:
        assert_fields(row, MODEL_ROW, f"row {row['impl']}")
        assert (row["model"], row["batch"], row["mode"]) == ("mobilevitv2-0.5", 1, "inference")
        assert row["attention_modules"] == 2 + 4 + 3  # attention layers of L3, L4, L5
        assert row["attention_ms"] > 0 and row["attention_share"] > 0
        assert math.isclose(row["images_per_s"], 1e3 / row["median_ms"])


def test_model_run_times_a_mixed_precision_training_step(tmp_path):
    """``--mode training+amp``: the fp32 model's training step under bf16 autocast, with the
    attention modules replayed under the same autocast."""
    with optional("transformers"):
        from transformers import MobileViTV2Config  # noqa: F401
    path = tmp_path / "model.json"
    run_cli("model", "--model", "mobilevitv2", "--width", "0.5", "--device", "cpu", "--quick",
            "--mode", "training+amp", "--impl", "fused", "--batch", "2", "--resolution", "64",
            "--no-progress", "--json", str(path))
    (row,) = json.loads(path.read_text())["rows"]
    assert_fields(row, MODEL_ROW, "row")
    assert (row["mode"], row["dtype"], row["batch"]) == ("training+amp", "fp32", 2)
    assert row["attention_modules"] == 2 + 4 + 3 and row["attention_ms"] > 0


def test_model_training_amp_needs_an_fp32_model(capsys):
    with pytest.raises(SystemExit):
        run_cli("model", "--device", "cpu", "--dtype", "bf16", "--mode", "training+amp")
    assert "training+amp runs an fp32 model under autocast" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", "cpu", "--backend", "triton"], "--backend 'triton' is not available on cpu"),
        (["--device", "cpu", "--backend", "nope"], "--backend 'nope' is not available on cpu"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype 'fp16' is not benchmarked on cpu"),
        (["--device", "cpu", "--dtype", "int8"], "choose from fp32, bf16"),
        (["--shape", "w9*"], "--shape 'w9*' matches no separable or additive shape"),
        (["--shape", "0x1x1x1"], "must be >= 1"),
        (["--shape", "1x0x48"], "every size of BxNxD must be >= 1"),
        (["--op", "nope"], "--op 'nope': choose from separable, additive"),
        (["--op", "separable,softmax"], "--op 'softmax'"),
        (["--op", "additive", "--shape", "w1.0-*"], "--shape 'w1.0-*' matches no additive shape"),
        (["--op", "additive", "--shape", "1x128x4x16"], "--op leaves separable out"),
        (["--pass", "sideways"], "--pass 'sideways'"),
        (["--repeat", "0"], "--repeat: must be >= 1"),
        (["--train-batch", "0"], "--train-batch: must be >= 1"),
        (["model", "--device", "cpu", "--batch", "0"], "--batch: must be >= 1"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["model", "--device", "cpu", "--impl", "nope"], "--impl 'nope'"),
        (["model", "--device", "cpu", "--width", "3.0"], "--width '3.0'"),
        (["model", "--device", "cpu", "--mode", "serving"], "--mode 'serving'"),
        (["model", "--device", "cpu", "--variant", "xl"], "--variant 'xl': choose from xs, s"),
        (["report", "a.json", "b.json", "--plot", "x.png"], "--plot charts one result file"),
    ],
)
def test_bad_filters_exit_2_naming_the_value(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "error:" in err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "mvit2_kernels.bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for word in ("--quick", "--json", "--plot", "--repeat", "layer", "model", "report", "--op",
                 "additive"):
        assert word in done.stdout, word
