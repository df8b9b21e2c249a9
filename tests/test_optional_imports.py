"""Specification of the optional-dependency helper (``fixtures/optional.py``): a test whose
optional import fails in any way is skipped with the reason, never errors."""

import sys
import types

import pytest
from fixtures.optional import importorskip, optional

BROKEN = "mvit2_test_broken_dependency"


class _Broken:
    """A meta path finder whose module fails to import the way a mismatched torchvision makes
    timm and transformers fail: not with an ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == BROKEN:
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.fixture
def broken_dependency(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_Broken(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, BROKEN, raising=False)


def test_a_dependency_that_raises_on_import_is_a_skip_with_the_reason(broken_dependency):
    with pytest.raises(RuntimeError):  # what pytest.importorskip lets through
        pytest.importorskip(BROKEN)
    with pytest.raises(pytest.skip.Exception, match=rf"'{BROKEN}' cannot be imported: "
                       r"RuntimeError: operator torchvision::nms does not exist"):
        importorskip(BROKEN)
    with pytest.raises(pytest.skip.Exception, match="RuntimeError: operator torchvision"):
        with optional(BROKEN):
            __import__(BROKEN)


def test_a_lazy_attribute_that_fails_is_a_skip(monkeypatch):
    """transformers imports its models when first accessed: the top-level import works and
    ``from transformers import Model`` raises the RuntimeError of its lazy module."""
    lazy = types.ModuleType(BROKEN)

    def __getattr__(name):
        raise RuntimeError(f"Failed to import {BROKEN}.{name} because of the following error")

    lazy.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, BROKEN, lazy)
    assert importorskip(BROKEN) is lazy
    with pytest.raises(pytest.skip.Exception,
                       match=rf"'{BROKEN}' cannot be imported: RuntimeError: Failed to import"):
        with optional(BROKEN):
            from mvit2_test_broken_dependency import Model  # noqa: F401


def test_a_missing_dependency_is_a_skip_and_a_present_one_imports():
    with pytest.raises(pytest.skip.Exception, match="ModuleNotFoundError"):
        importorskip(BROKEN + "_absent")
    assert importorskip("json.decoder") is sys.modules["json.decoder"]
    with optional("json"):
        from json import dumps
    assert dumps([]) == "[]"


def test_the_skip_is_allowed_at_module_level():
    """A test module may guard its module-level imports: pytest then skips the whole file."""
    with pytest.raises(pytest.skip.Exception) as skip:
        importorskip(BROKEN + "_absent")
    assert skip.value.allow_module_level
