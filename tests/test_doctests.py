"""The runnable examples in public docstrings stay true (run through the installed package)."""

import doctest
import importlib
import pkgutil

import pytest

import autoquant

MODULES = sorted(
    {"autoquant." + m.name for m in pkgutil.iter_modules(autoquant.__path__)}
    | {"autoquant.candidates." + m.name for m in pkgutil.iter_modules(importlib.import_module("autoquant.candidates").__path__)}
    | {"autoquant", "autoquant.candidates", "autoquant.cache_db"}
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
