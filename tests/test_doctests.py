"""The runnable examples in docstrings stay true (run through the installed package), and the public
verbs keep theirs (DESIGN.md section 7: docstrings give a short runnable example for public verbs).

Only modules that hold examples are collected: a module without any would pass vacuously.
"""

import doctest
import functools
import importlib
import inspect
import pkgutil

import pytest

import autoquant

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
ALL_MODULES = sorted(
    {"autoquant." + m.name for m in pkgutil.iter_modules(autoquant.__path__)}
    | {"autoquant.candidates." + m.name for m in pkgutil.iter_modules(importlib.import_module("autoquant.candidates").__path__)}
    | {"autoquant", "autoquant.candidates", "autoquant.cache_db"}
)
# Public verbs no example calls yet; the list may only shrink (test_public_verbs_have_examples).
VERBS_WITHOUT_EXAMPLES = {"get_report", "load_plan", "report", "save_plan"}


@functools.cache
def _examples(name: str) -> list[doctest.Example]:
    return [e for t in doctest.DocTestFinder().find(importlib.import_module(name)) for e in t.examples]


MODULES_WITH_EXAMPLES = [name for name in ALL_MODULES if _examples(name)]


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.attempted > 0, f"{name}: no example ran"
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"


def test_public_verbs_have_examples():
    """Every public function of `autoquant` is called by some docstring example in the package."""
    sources = [e.source for name in ALL_MODULES for e in _examples(name)]
    verbs = [n for n in autoquant.__all__ if inspect.isfunction(getattr(autoquant, n))]
    missing = {v for v in verbs if not any(f"{v}(" in s for s in sources)}
    assert missing <= VERBS_WITHOUT_EXAMPLES, f"public verbs without a docstring example: {missing}"
    assert VERBS_WITHOUT_EXAMPLES <= missing, (
        f"{VERBS_WITHOUT_EXAMPLES - missing} have examples now: drop them from VERBS_WITHOUT_EXAMPLES")
    assert MODULES_WITH_EXAMPLES, "no module has a docstring example: the finder or the docs broke"
