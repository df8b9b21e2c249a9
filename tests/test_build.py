"""Specification of the CPU builds: one per instruction set, the best one the CPU runs imported
(as torch judges the CPU), each computing the same as the reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvit2_kernels import backends

PROBE = """
import json, torch, mvit2_kernels as m
from mvit2_kernels import backends
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, c, 3, 37, generator=g) for c in (1, 33, 33))
err = (m.separable_attention(q, k, v, backend="cpu")
       - m.separable_attention_reference(q, k, v)).abs().max().item()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "isa": backends.cpu_isa(), "err": err}))
"""


def probe(capability: str | None) -> dict:
    env = {**os.environ}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def built_isas() -> set[str]:
    package = Path(backends.__file__).parent
    return {p.name.split(".")[0].removeprefix("_cpu_") for p in package.glob("_cpu_*.*")}


@pytest.mark.parametrize("capability, isa",
                         [("avx2", "avx2"), ("default", "generic"), (None, None)])
def test_the_best_cpu_build_that_torch_allows_is_imported(capability, isa):
    if not backends.compiled_cpu():
        pytest.skip("the CPU kernels are not built")
    if "native" in built_isas():
        pytest.skip("a single MVIT2_CPU_ISA=native build: nothing to choose from")
    if isa is not None and isa not in built_isas():
        pytest.skip(f"the {isa} build is not there (MVIT2_CPU_ISA picked another)")
    got = probe(capability)
    if isa is None:  # torch's own choice: the best build there is for it
        order = backends._CPU_ISA_ORDER.get(got["capability"], ("generic",))
        isa = next(i for i in order if i in built_isas())
    assert got["isa"] == isa
    assert got["err"] <= 1e-6

