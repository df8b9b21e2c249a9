"""The kernel benchmark (``mvit2-bench``), data-driven like Liger-Kernel's: per op (:data:`OPS`)
the tensors a model holds, the op's inputs made of them, the reference, the kernel and the bytes
it must move; the shapes, from the models' own configurations, named for ``--shape`` globs. The
backward is a training step's: ``backward()`` into the ``.grad`` of the tensors the model holds,
along each gradient path, the paths alternating over :data:`GRAD_ROUNDS` rounds so that one noisy
stretch cannot tilt the comparison.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..backends import available_backends
from ..models.mobilevitv2 import WIDTHS, mobilevitv2_channels
from ..models.swiftformer import CONFIGS as SWIFTFORMER
from ..ops import additive_attention, separable_attention, separable_attention_qkv
from ..reference import additive_attention_reference, separable_attention_reference
from .timing import Kind, last_level_cache_bytes, rotating, rotation_count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 has no fast CPU kernels in PyTorch's eager ops: the baselines would not be representative.
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32")}
PASSES = ("forward", "forward+backward")
# set_to_none: every step starts with .grad = None (zero_grad's default), so autograd hands the
# new gradient over; accumulate: it is added into the existing .grad (gradient accumulation).
GRAD_PATHS = ("set_to_none", "accumulate")
GRAD_ROUNDS = 3
# "softmax" moves the same bytes in the same passes (its token weights are all 1).
ADDITIVE_VARIANT = "normalize"


class Op(NamedTuple):
    reference: Callable[..., Any]
    kernel: Callable[..., Any]  # (*inputs, backend=...)
    leaves: Callable[[Shape, torch.dtype, str], tuple[torch.Tensor, ...]]  # what a model holds
    inputs: Callable[..., tuple[torch.Tensor, ...]]  # (*leaves) -> the op's inputs
    outputs: Callable[[Shape], list[tuple[int, ...]]]  # output shapes, for output gradients
    moved: Callable[[Shape, bool], int]  # elements the op must read and write: the floor
    grad_paths: tuple[str, ...] = GRAD_PATHS
    packed: Callable[..., Any] | None = None  # a kernel on the leaves themselves, if the op has one


# The impl of a backend's packed entry point is the backend's name with this suffix.
PACKED = "-qkv"


OPS = {
    # q, k and v are views of one [B, 1 + 2C, P, N] qkv, as qkv_proj's output is split in the
    # model: the strided case the kernels are built for; the gradient lands in qkv.grad.
    # Forward reads q, k, v and writes y: (1 + 3C)·BPN elements; the backward adds reads of g,
    # q, k, v and writes of dq, dk, dv: (2 + 5C)·BPN.
    "separable": Op(
        separable_attention_reference, separable_attention,
        lambda s, dtype, device: (torch.randn(s.batch, 1 + 2 * s.channels, s.pixels, s.patches,
                                              dtype=dtype, device=device),),
        lambda qkv: qkv.split([1, qkv.shape[1] // 2, qkv.shape[1] // 2], dim=1),
        lambda s: [(s.batch, s.channels, s.pixels, s.patches)],
        lambda s, backward: (1 + 3 * s.channels + backward * (2 + 5 * s.channels)) * s.elements,
        # separable_attention_qkv(qkv): its backward writes qkv's gradient in one tensor, where
        # autograd would concatenate the views' three (fused="kernel" runs it).
        packed=separable_attention_qkv,
    ),
    # q and k are separate contiguous [B, N, D] tensors, as to_query's and to_key's outputs are.
    # Forward reads q, k and writes G·kn and qn: 4·BND; the backward reads both output
    # gradients, q, k and writes dq, dk: 6·BND. w_g and dw_g (D each) are left out. Its
    # gradients are separate tensors: one path tells what there is to tell.
    "additive": Op(
        functools.partial(additive_attention_reference, variant=ADDITIVE_VARIANT),
        functools.partial(additive_attention, variant=ADDITIVE_VARIANT),
        lambda s, dtype, device: (*(torch.randn(s.batch, s.patches, s.channels, dtype=dtype,
                                                device=device) for _ in range(2)),
                                  torch.randn(s.channels, 1, dtype=dtype, device=device)),
        lambda q, k, w_g: (q, k, w_g),
        lambda s: [(s.batch, s.patches, s.channels)] * 2,
        lambda s, backward: (4 + 6 * backward) * s.channels * s.elements,
        ("set_to_none",),
    ),
}

RESOLUTION = {"mobilevitv2": 256, "swiftformer": 224}  # the models' ImageNet image sizes
TRAIN_BATCH = {"cpu": 32, "cuda": 256}  # the batch timed beside B=1
# MobileViTv2: the smallest, the default and the largest width, at ImageNet size and at the
# DeepLabV3 segmentation size. Its attention stages L3, L4, L5 run at output strides 8, 16, 32 on
# 2×2 patches: P = 4, N = (res/stride/2)².
TIMED_WIDTHS = (WIDTHS[0], 1.0, WIDTHS[-1])
RESOLUTIONS = (RESOLUTION["mobilevitv2"], 512)
STAGE_STRIDES = {3: 8, 4: 16, 5: 32}
# SwiftFormer: one attention block ends each of its four stages, at strides 4, 8, 16, 32. The
# default times the smallest and the largest variant; S and L1 lie between them (``--shape``).
SWIFTFORMER_TIMED = ("xs", "l3")
SWIFTFORMER_STRIDES = (4, 8, 16, 32)
QUICK_PREFIXES = ("w1.0-256px-L3-", "sf-xs-224px-s1-")  # per op the stage of most tokens
_CUSTOM = re.compile(r"^\d+(x\d+){2,3}$")  # commas separate list items, so sizes use "x"


class Shape(NamedTuple):
    """One attention call. ``separable``: q ``[batch, 1, pixels, patches]``, k and v
    ``[batch, channels, pixels, patches]``. ``additive``: q and k ``[batch, patches, channels]``
    (N tokens of D channels) with ``pixels == 1``, so that both fill the same JSON fields."""

    name: str
    batch: int
    channels: int
    pixels: int
    patches: int
    op: str = "separable"

    @property
    def elements(self) -> int:
        """``B·P·N``: the elements of one channel."""
        return self.batch * self.pixels * self.patches


def group_fields(group: tuple[Shape, str, str]) -> dict:
    """What the rows (and skips) of one (shape, dtype, pass) say of it."""
    s, dtype, pass_ = group
    return {"op": s.op, "shape": s.name, "batch": s.batch, "channels": s.channels,
            "pixels": s.pixels, "patches": s.patches, "dtype": dtype, "pass": pass_}


def design_shapes(batch: int, ops: Sequence[str] = tuple(OPS),
                  variants: Sequence[str] = SWIFTFORMER_TIMED) -> list[Shape]:
    """Every timed MobileViTv2 width × resolution × stage, then every stage of the SwiftFormer
    ``variants``, each at ``B=1`` and ``B=batch``; only those of ``ops``."""
    out, batches = [], list(dict.fromkeys((1, batch)))
    for width in TIMED_WIDTHS if "separable" in ops else ():
        for res in RESOLUTIONS:
            dims = zip(STAGE_STRIDES.items(), mobilevitv2_channels(width)["attn"], strict=True)
            for (stage, stride), c in dims:
                out += [Shape(f"w{width}-{res}px-L{stage}-B{b}", b, c, 4, (res // stride // 2) ** 2)
                        for b in batches]
    res = RESOLUTION["swiftformer"]
    for variant in variants if "additive" in ops else ():
        for stage, (d, stride) in enumerate(zip(SWIFTFORMER[variant][1], SWIFTFORMER_STRIDES,
                                                strict=True), 1):
            out += [Shape(f"sf-{variant}-{res}px-s{stage}-B{b}", b, d, 1, (res // stride) ** 2,
                          "additive") for b in batches]
    return out


def quick_shapes(batch: int, ops: Sequence[str] = tuple(OPS)) -> list[Shape]:
    """``--quick``: MobileViTv2-1.0's first attention stage and SwiftFormer-XS's first stage."""
    return [s for s in design_shapes(batch, ops) if s.name.startswith(QUICK_PREFIXES)]


def select_shapes(patterns: list[str], batch: int, ops: Sequence[str] = tuple(OPS)) -> list[Shape]:
    """The named shapes of ``ops`` (every SwiftFormer variant) matching any glob in
    ``patterns``, plus custom shapes, grouped by op; ``ValueError`` naming a bad pattern."""
    known, chosen = design_shapes(batch, ops, tuple(SWIFTFORMER)), {}
    for pattern in patterns:
        if _CUSTOM.match(pattern):
            sizes = [int(x) for x in pattern.split("x")]
            op, layout = ("separable", "BxCxPxN") if len(sizes) == 4 else ("additive", "BxNxD")
            if op not in ops:
                raise ValueError(f"--shape {pattern!r} is a {op} shape ({layout}) but --op leaves "
                                 f"{op} out")
            if min(sizes) < 1:
                raise ValueError(f"--shape {pattern!r}: every size of {layout} must be >= 1")
            if op == "separable":
                b, c, p, n = sizes
                shape = Shape(f"B{b}-C{c}-P{p}-N{n}", b, c, p, n)
            else:
                b, n, d = sizes
                shape = Shape(f"B{b}-N{n}-D{d}", b, d, 1, n, op)
            chosen[shape.name] = shape
        elif hits := [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]:
            chosen.update((s.name, s) for s in hits)
        else:
            raise ValueError(
                f"--shape {pattern!r} matches no {' or '.join(ops)} shape; give a glob over these "
                "names, or a custom 'BxCxPxN' (separable) or 'BxNxD' (additive): "
                + ", ".join(s.name for s in known))
    return sorted(chosen.values(), key=lambda s: list(OPS).index(s.op))


def kernel_backends(device: str) -> list[str]:
    """The fused backends timed on ``device``; Triton only on a GPU (its CPU interpreter is a
    correctness tool)."""
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return [b for b in available_backends() if b in wanted]


def fused_impls(backends: Sequence[str], ops: Sequence[str] = tuple(OPS)) -> list[str]:
    """The fused impls timed for ``ops``: each backend, then each backend's packed entry point
    where one of ``ops`` has one."""
    packed = any(OPS[op].packed for op in ops)
    return [*backends, *(b + PACKED for b in backends if packed)]


def op_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move at least: the copy floor's bytes."""
    return OPS[shape.op].moved(shape, pass_ != "forward") * dtype.itemsize


def op_function(impl: str, op: str) -> Callable[..., Any]:
    """The op as ``impl`` runs it: the reference, its ``torch.compile`` or a kernel backend."""
    if impl == "eager":
        return OPS[op].reference
    if impl == "compile":
        # A fresh dynamo state: each shape and dtype gets its own static graph instead of
        # hitting the recompile limit and silently falling back to eager.
        torch._dynamo.reset()
        return torch.compile(OPS[op].reference, dynamic=False)
    if impl.endswith(PACKED):
        return functools.partial(OPS[op].packed, backend=impl.removesuffix(PACKED))
    return functools.partial(OPS[op].kernel, backend=impl)


def step(fn: Callable[..., Any], op: str, grads: str | None,
         packed: bool = False) -> Callable[..., Any]:
    """``fn`` for a forward; with a gradient path, a training step on ``(leaves, output_grads)``:
    the op's forward on inputs made of the leaves (the leaves themselves if ``packed``),
    ``backward()`` into the leaves' .grad."""
    if grads is None:
        return fn
    inputs = (lambda *leaves: leaves) if packed else OPS[op].inputs

    def forward_backward(leaves: tuple[torch.Tensor, ...], out_grads: list[torch.Tensor]) -> None:
        if grads == "set_to_none":
            for t in leaves:
                t.grad = None
        out = fn(*inputs(*leaves))
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), out_grads)

    return forward_backward


def input_sets(shape: Shape, dtype: torch.dtype, device: str, backward: bool,
               cache: int, packed: bool = False) -> list[tuple]:
    """Enough independent sets to outgrow ``cache`` twice over: the op's inputs for a forward
    (views of the leaves, made once; the leaves if ``packed``), ``(leaves, output_grads)`` for a
    backward (counting the leaves' .grad)."""
    spec = OPS[shape.op]

    def one():
        leaves = spec.leaves(shape, dtype, device)
        if not backward:
            return leaves if packed else spec.inputs(*leaves)
        grads = [torch.randn(s, dtype=dtype, device=device) for s in spec.outputs(shape)]
        return tuple(t.requires_grad_() for t in leaves), grads

    first = one()
    tensors = [*first[0], *first[1]] if backward else first
    nbytes = sum(t.nbytes * (1 + t.requires_grad) for t in tensors)
    return [first, *(one() for _ in range(rotation_count(nbytes, cache) - 1))]


def copy_sets(nbytes: int, dtype: torch.dtype, device: str, cache: int) -> list:
    """Enough ``(dst, src)`` pairs to outgrow ``cache`` twice over; each copy moves ``nbytes``."""
    numel = max(1, nbytes // (2 * dtype.itemsize))
    return [(torch.empty(numel, dtype=dtype, device=device),
             torch.randn(numel, dtype=dtype, device=device))
            for _ in range(rotation_count(nbytes, cache))]


def jobs(group: tuple[Shape, str, str], impls: list[str]) -> list[tuple[str, str | None]]:
    spec = OPS[group[0].op]
    paths = spec.grad_paths if group[2] != "forward" else (None,)
    rounds = GRAD_ROUNDS if len(paths) > 1 else 1
    impls = [i for i in impls if spec.packed or not i.endswith(PACKED)]
    return [(impl, path) for _ in range(rounds) for path in paths for impl in impls]


def prepare(group: tuple[Shape, str, str], device: str, _budget) -> Callable:
    shape, dtype_name, pass_ = group
    dtype, cache = DTYPES[dtype_name], last_level_cache_bytes(device)
    nbytes, backward = op_bytes(shape, dtype, pass_), pass_ != "forward"
    sets: dict[bool, list[tuple]] = {}  # a forward of the packed entry point takes the leaves
    fns: dict[str, Callable] = {}  # one compile per group, whatever the rounds

    def build(impl: str, path: str | None):
        if impl == "copy":
            impl_sets, fn = copy_sets(nbytes, dtype, device, cache), torch.Tensor.copy_
        else:
            packed = impl.endswith(PACKED)
            if impl not in fns:
                fns[impl] = op_function(impl, shape.op)
            if (key := packed and not backward) not in sets:
                sets[key] = input_sets(shape, dtype, device, backward, cache, key)
            impl_sets, fn = sets[key], step(fns[impl], shape.op, path, packed)
        return rotating(fn, impl_sets), {"rotated_sets": len(impl_sets), "bytes": nbytes,
                                         "grads": path}

    return build


def finish(group, rows: list[dict], _timed) -> None:
    floor = {r["grads"]: r["median_ms"] for r in rows if r["impl"] == "copy"}
    for r in rows:
        r.update(gbps=r["bytes"] / r["median_ms"] / 1e6, floor_ms=floor.get(r["grads"]))


KIND = Kind(group_fields, prepare, {"floor_fraction": "copy", "speedup_vs_eager": "eager",
                                   "speedup_vs_compile": "compile"}, jobs, finish)
