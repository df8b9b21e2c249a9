"""``mvit2-bench layer`` and the model benchmark's layer-fusion impls: the layer command runs
every implementation of the attention layer in rounds, prints its table, writes the documented
JSON schema (docs/performance.md) and a PNG, and rejects bad filters clearly.

One tiny custom shape keeps the file to seconds (plus small compiles). No test looks at a time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics

import pytest
import torch
from fixtures.optional import optional
from test_bench_cli import ENVIRONMENT, OP_ROW, OPS_SETTINGS, PNG, TOP, assert_fields, run_cli

from mvit2_kernels import SeparableAttention
from mvit2_kernels.bench import layer
from mvit2_kernels.bench.cli import main

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SHAPE, NAME = "2x8x4x16", "B2-C8-P4-N16"  # B, D, P, N
BACKEND = "auto"  # the fused impls run what a user gets: the C++ kernels on a CPU
IMPLS = ["fused-layer", "fused-kernel", "eager", "compile", "fused-layer+compile"]

# The layer's rows and settings: the kernel benchmark's, less what only an op has (its bytes,
# the copy floor, the op's name), plus the backend the fused impls ran.
OP_ONLY = ("op", "grads", "bytes", "gbps", "floor_ms", "floor_fraction")
LAYER_ROW = {k: t for k, t in OP_ROW.items() if k not in OP_ONLY}
LAYER_SETTINGS = {
    **{k: t for k, t in OPS_SETTINGS.items()
       if k not in ("ops", "additive_variant", "grad_paths", "grad_rounds")},
    "backend": str,
    "resolved_backend": str,
}


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    """One ``--quick`` layer run on the CPU at one tiny shape, every impl and both passes, each
    timed in two rounds."""
    out = tmp_path_factory.mktemp("layer")
    argv = ["layer", "--device", "cpu", "--quick", "--shape", SHAPE, "--backend", BACKEND,
            "--repeat", "2", "--no-progress", "--json", str(out / "layer.json")]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(out / "layer.png")]
    stdout = run_cli(*argv)
    return stdout, json.loads((out / "layer.json").read_text()), out


def test_default_shapes_are_the_attention_stages_of_mobilevitv2_1_0():
    got = {
        s.name: (s.batch, s.channels, s.pixels, s.patches) for s in layer.default_shapes(32, False)
    }
    assert got == {
        f"w1.0-256px-{stage}-B{b}": (b, d, 4, n)
        for stage, d, n in (("L3", 128, 256), ("L4", 192, 64), ("L5", 256, 16))
        for b in (1, 32)
    }
    quick = [s.name for s in layer.default_shapes(256, True)]
    assert quick == ["w1.0-256px-L3-B1", "w1.0-256px-L3-B256"]


def test_layer_run_prints_a_compare_table_per_pass(layer_run):
    stdout, _, _ = layer_run
    lines = stdout.splitlines()
    for pass_ in ("forward", "forward+backward"):
        (at,) = [i for i, line in enumerate(lines) if f" attention layer, fp32, {pass_} " in line]
        header, _, row = lines[at + 1 : at + 4]
        assert header.replace("|", " ").split() == IMPLS
        assert row.split()[0] == NAME and len(row.split("|")) == 1 + len(IMPLS)
        # The derived figures of every impl but the baselines, against both baselines.
        derived = [line for line in lines[at + 4 :] if line.startswith(f"  {NAME}  ")]
        assert [d.split()[1] for d in derived[:3]] == ["fused-layer:", "fused-kernel:",
                                                       "fused-layer+compile:"]
        assert all(" ×eager, " in d and d.endswith(" ×compile") for d in derived[:3])


def test_layer_json_follows_the_documented_schema(layer_run):
    _, doc, _ = layer_run
    assert_fields(doc, TOP, "document")
    assert doc["schema_version"] == 1 and doc["kind"] == "layer"
    assert doc["command"].startswith("mvit2-bench layer --device cpu --quick")
    assert_fields(doc["environment"], ENVIRONMENT, "environment")
    assert_fields(doc["settings"], LAYER_SETTINGS, "settings")
    settings = doc["settings"]
    assert settings["impls"] == IMPLS and settings["shapes"] == [NAME] and settings["repeat"] == 2
    assert settings["dtypes"] == ["fp32"] and settings["passes"] == ["forward", "forward+backward"]
    assert settings["resolved_backend"] in doc["environment"]["backends"]
    assert doc["skipped"] == []
    assert len(doc["rows"]) == 2 * len(IMPLS)
    for row in doc["rows"]:
        assert_fields(row, LAYER_ROW, f"row {row.get('impl')}")
        assert (row["batch"], row["channels"], row["pixels"], row["patches"]) == (2, 8, 4, 16)
        assert row["median_ms"] > 0 and row["repeats"] >= 2 and row["rotated_sets"] >= 1
        # --repeat 2: the figure is the median of the two rounds' medians
        assert len(row["round_ms"]) == 2
        assert math.isclose(row["median_ms"], statistics.median(row["round_ms"]))
        same = {r["impl"]: r["median_ms"] for r in doc["rows"] if r["pass"] == row["pass"]}
        assert math.isclose(row["speedup_vs_eager"], same["eager"] / row["median_ms"])
        assert math.isclose(row["speedup_vs_compile"], same["compile"] / row["median_ms"])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="--plot needs matplotlib (in the test extra)")
def test_layer_plot_is_a_png(layer_run):
    _, _, out = layer_run
    assert (out / "layer.png").read_bytes()[:8] == PNG


def test_layer_impls_share_parameters_and_compute_the_same_layer():
    """Every impl is the same layer: equal outputs for the same parameters (the speed-ups
    compare like with like)."""
    torch.manual_seed(0)
    state = SeparableAttention(8).state_dict()
    x = torch.randn(2, 8, 4, 16)
    want = layer.layer_step(layer.layer_module("eager", state, 8, BACKEND, False), "forward")(x)
    for impl in ("fused-layer", "fused-kernel"):
        got = layer.layer_step(layer.layer_module(impl, state, 8, BACKEND, False), "forward")(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_module_takes_the_dtype_and_values_of_its_parameters(impl):
    state = {k: v.to(torch.bfloat16) for k, v in SeparableAttention(8).state_dict().items()}
    module = layer.layer_module(impl, state, 8, BACKEND, training=False)
    got = getattr(module, "_orig_mod", module).state_dict()  # compiled lazily: nothing runs
    assert got.keys() == state.keys()
    for name, value in got.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, state[name]), name


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--impl", "nope"], "--impl 'nope': choose from fused-layer, fused-kernel"),
        (["--dtype", "fp16"], "--dtype 'fp16' is not benchmarked on cpu"),
        (["--pass", "sideways"], "--pass 'sideways'"),
        (["--shape", "w9*"], "--shape 'w9*' matches no separable shape"),
        (["--shape", "1x49x48"], "--op leaves additive out"),
        (["--backend", "nope"], "--backend 'nope'"),
        (["--train-batch", "0"], "--train-batch: must be >= 1"),
        (["--repeat", "0"], "--repeat: must be >= 1"),
    ],
)
def test_layer_bad_filters_exit_2_naming_the_value(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["layer", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "error:" in err


def test_model_bench_has_the_layer_fusion_impls():
    """``fused-kernel`` is our model with the convolutions around the fused op in every attention
    module; ``fused+compile`` and ``transformers+compile`` are our fused model and transformers'
    under torch.compile (compiled lazily, at the first call)."""
    with optional("transformers"):  # the model classes, which transformers imports lazily
        from transformers import MobileViTV2Config, MobileViTV2ForImageClassification  # noqa: F401
    from mvit2_kernels.bench import models

    builders = models.model_builders("mobilevitv2", "0.5")
    wanted = {"fused", "fused+compile", "fused-kernel", "unfused", "transformers+compile"}
    assert wanted <= set(builders)
    attention = models.attention_modules(builders["fused-kernel"]("auto"))
    assert len(attention) == 2 + 4 + 3 and {m.fused for m in attention} == {"kernel"}
    compiled = builders["transformers+compile"]("auto")
    assert type(compiled._orig_mod).__name__ == "_Logits"
    ours = builders["fused+compile"]("auto")._orig_mod
    assert {m.fused for m in models.attention_modules(ours)} == {True}
    assert "fused-kernel" not in models.model_builders("swiftformer", "xs")
    assert "transformers+compile" in models.model_builders("swiftformer", "xs")
