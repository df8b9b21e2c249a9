"""Checkpoint conversion: other libraries' state dicts to our models, with errors that list keys.

A model *family* (``"mobilevitv2"``, later ``"swiftformer"``) registers, per *source* library
(``"transformers"``, ``"timm"``, ``"cvnets"``, ...), a key converter and a detector, and once a
builder that makes the matching model of ours from converted weights::

    register_converter("mobilevitv2", "timm", KeyRules(...), detect=lambda keys: ...)
    register_builder("mobilevitv2", build_from_state_dict)
    register_transformers_class("MobileViTV2ForImageClassification", from_hf_classifier)

``convert_state_dict`` and ``load_pretrained`` then work for every registered family; the
family is detected from the keys unless given. Nothing is downloaded: files are read locally.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "KeyRules",
    "convert_state_dict",
    "from_transformers",
    "load_pretrained",
    "read_checkpoint",
    "register_builder",
    "register_converter",
    "register_transformers_class",
]

Converter = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Builder = Callable[..., nn.Module]  # (converted state dict, **model kwargs) -> model of ours


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted or loaded; the message lists the offending keys."""


def _listing(keys: Collection[str], limit: int = 25) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class KeyRules:
    """Renames keys by regular expressions; a key no rule accounts for is an error.

    Each source key not matching an ``ignore`` pattern (e.g. an auxiliary training head) first
    goes through every ``renames`` substitution in order (``re.sub``: the source library's
    vocabulary, e.g. ``.normalization.`` -> ``.bn.``), then must ``fullmatch`` one ``structure``
    pattern (the first that matches wins), whose template (``re.Match.expand`` syntax, ``\\1``)
    gives our key. Unknown keys are reported by their source names.
    """

    structure: Sequence[tuple[str, str]]
    renames: Sequence[tuple[str, str]] = ()
    ignore: Sequence[str] = ()

    def __post_init__(self) -> None:
        self._compiled = [(re.compile(p), t) for p, t in self.structure]
        self._renames = [(re.compile(p), t) for p, t in self.renames]
        self._ignore = [re.compile(p) for p in self.ignore]

    def __call__(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        unknown, clashes = [], []
        for key, value in state_dict.items():
            if any(p.fullmatch(key) for p in self._ignore):
                continue
            renamed = key
            for pattern, template in self._renames:
                renamed = pattern.sub(template, renamed)
            for pattern, template in self._compiled:
                m = pattern.fullmatch(renamed)
                if m:
                    new = m.expand(template)
                    break
            else:
                unknown.append(key)
                continue
            if new in out:
                clashes.append(key)
            out[new] = value
        if unknown:
            raise CheckpointError(f"{len(unknown)} unknown key(s): {_listing(unknown)}")
        if clashes:
            raise CheckpointError(f"key(s) mapping onto an already converted key: "
                                  f"{_listing(clashes)}")
        return out


@dataclass
class _Source:
    convert: Converter
    detect: Callable[[Collection[str]], bool]
    model_defaults: dict[str, Any]


_CONVERTERS: dict[str, dict[str, _Source]] = {}  # family -> source -> converter
_BUILDERS: dict[str, Builder] = {}
_HF_CLASSES: dict[str, Callable[..., nn.Module]] = {}


def register_converter(family: str, source: str, convert: Converter, *,
                       detect: Callable[[Collection[str]], bool],
                       model_defaults: Mapping[str, Any] | None = None) -> None:
    """Register how ``source`` checkpoints of ``family`` map to our keys.

    Args:
        convert: ``state_dict -> state_dict`` in our key names (a :class:`KeyRules` or any
            callable); raises :class:`CheckpointError` for keys it does not know.
        detect: whether a set of source keys belongs to this family.
        model_defaults: model arguments that reproduce the source library's numerics
            (e.g. ``odd_size="floor"`` for transformers); ``load_pretrained`` uses them unless
            the caller overrides them.
    """
    entry = _Source(convert, detect, dict(model_defaults or {}))
    _CONVERTERS.setdefault(family, {})[source] = entry


def register_builder(family: str, build: Builder) -> None:
    """Register ``build(converted_state_dict, **model_kwargs) -> nn.Module`` for ``family``.

    The builder infers the architecture (width, classes, head) from the converted weights.
    """
    _BUILDERS[family] = build


def register_transformers_class(class_name: str, build: Callable[..., nn.Module]) -> None:
    """Register ``build(hf_model, fused=..., backend=...)`` for a transformers model class."""
    _HF_CLASSES[class_name] = build


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` file (never downloads)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r} (only local files are read)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if not path.endswith((".pt", ".pth", ".bin")):
        raise CheckpointError(f"unsupported checkpoint extension in {path!r}: "
                              "use .safetensors, .pt, .pth or .bin")
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain_state_dict(obj: Any) -> dict[str, Tensor]:
    """Unwrap training checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) and the
    ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes."""
    for wrapper in ("state_dict", "model", "model_state", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"expected a non-empty state dict, got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"state dict entries that are not tensors: {_listing(not_tensors)}")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _detect_family(keys: Collection[str], source: str) -> str:
    families = [f for f, sources in _CONVERTERS.items() if source in sources]
    if not families:
        known = sorted({s for sources in _CONVERTERS.values() for s in sources})
        raise ValueError(f"unknown source {source!r}; registered sources: {known}")
    matches = [f for f in families if _CONVERTERS[f][source].detect(keys)]
    if len(matches) != 1:
        what = "no" if not matches else f"several ({matches})"
        raise CheckpointError(f"{what} model family recognises these {source} keys; pass "
                              f"family= (one of {families}). First keys: "
                              f"{_listing(list(keys)[:5])}")
    return matches[0]


def _check_against(converted: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                   what: str) -> None:
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    misshapen = [f"{k}: {tuple(converted[k].shape)} != expected {tuple(expected[k].shape)}"
                 for k in converted if k in expected and converted[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen tensor(s): {_listing(misshapen)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n  " + "\n  ".join(problems))


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str = "transformers", *,
                       family: str | None = None, model: nn.Module | None = None,
                       **model_kwargs) -> dict[str, Tensor]:
    """Map a ``source`` checkpoint to our key names and check it against the target model.

    Args:
        state_dict: the source state dict (training wrappers and ``module.`` prefixes are
            unwrapped).
        source: ``"transformers"``, ``"timm"``, ``"cvnets"`` or ``"mvit2"`` (ours), or any
            source registered with :func:`register_converter`.
        family: ``"mobilevitv2"`` etc.; detected from the keys when ``None``.
        model: the model to check against; when ``None`` it is inferred from the weights (and
            ``model_kwargs``) and built on the meta device.

    Returns:
        The converted state dict, ready for ``model.load_state_dict``.

    Raises:
        CheckpointError: listing unknown, missing, unexpected and misshapen keys.
    """
    sd = _plain_state_dict(state_dict)
    family = family or _detect_family(sd.keys(), source)
    try:
        entry = _CONVERTERS[family][source]
    except KeyError:
        raise ValueError(f"no {source!r} converter registered for family {family!r}; "
                         f"sources: {sorted(_CONVERTERS.get(family, {}))}") from None
    try:
        converted = entry.convert(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{family} checkpoint from {source}: {e}") from None
    if model is None:
        with torch.device("meta"):
            model = _BUILDERS[family](converted, **{**entry.model_defaults, **model_kwargs})
    expected = model.state_dict()
    for key in expected:  # BatchNorm's step counter: absent from older checkpoints, never used
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros((), dtype=torch.long)
    _check_against(converted, expected, f"{family} checkpoint from {source}")
    return converted


def load_pretrained(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                    source: str = "transformers", *, family: str | None = None,
                    model: nn.Module | None = None, fused: bool = True, backend: str = "auto",
                    **model_kwargs) -> nn.Module:
    """Our model with the weights of a local checkpoint from ``source``.

    Without ``model``, the architecture is inferred from the weights; ``model_kwargs`` set what
    weights cannot tell (``output_stride``, ``atrous_rates``, ``odd_size``, ...), defaulting to
    the source's own numerics. The built model is returned in eval mode; a given ``model`` is
    loaded in place and returned as it was (train or eval).
    """
    sd = path_or_state_dict
    if isinstance(sd, (str, os.PathLike)):
        sd = read_checkpoint(sd)
    sd = _plain_state_dict(sd)
    family = family or _detect_family(sd.keys(), source)
    converted = convert_state_dict(sd, source, family=family, model=model,
                                   fused=fused, backend=backend, **model_kwargs)
    if model is not None:
        model.load_state_dict(converted)
        return model
    defaults = _CONVERTERS[family][source].model_defaults
    model = _BUILDERS[family](converted, fused=fused, backend=backend,
                              **{**defaults, **model_kwargs})
    model.load_state_dict(converted)
    return model.eval()


def from_transformers(hf_model: nn.Module, fused: bool = True, backend: str = "auto") -> nn.Module:
    """Our model reproducing a transformers model exactly (same weights, same numerics).

    Its ``forward(pixel_values)`` returns the tensor transformers returns as ``.logits``. It is
    on the device and in the dtype and train/eval mode of ``hf_model``.
    """
    name = type(hf_model).__name__
    if name not in _HF_CLASSES:
        raise TypeError(f"from_transformers does not know {name}; supported: {sorted(_HF_CLASSES)}")
    model = _HF_CLASSES[name](hf_model, fused=fused, backend=backend)
    param = next(hf_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(hf_model.training)
