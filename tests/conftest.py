"""Shared fixtures and suite rules.

- `device`: "cpu" always, "cuda" when a GPU is present (skipped with a reason otherwise).
- Every test that needs CUDA (a "cuda" device parameter, or a skip mark saying it needs a GPU)
  gets the `cuda` marker, so `pytest -m cuda` selects the whole GPU run in one command.
- Where Triton is a declared dependency (Linux x86_64), a broken Triton or kernels install stops
  the session with the import error, once, before any test: it must not turn into hundreds of
  skips or float fallbacks.

At import it changes one piece of global state: without a CUDA GPU it sets TRITON_INTERPRET=1
(unless already set), so Triton kernels run on CPU through the interpreter; nothing else (no seeds,
other env vars or thread counts).
"""

import os
import re

import pytest
import torch

_CUDA = torch.cuda.is_available()

# Triton sets up its language library (tl.zeros, tl.max, ...) once, at the process's first `import
# triton`: for the interpreter if TRITON_INTERPRET=1 is in the environment at that moment, for the
# compiler otherwise. `pytest_sessionstart` below imports triton before any test file or nested
# conftest is collected, so the switch must be on here, at this module's import; set any later
# (e.g. in tests/kernel_ops/conftest.py), every CPU Triton kernel test of a whole-suite run fails
# (tests/test_suite_rules.py checks this). This is the suite's one place that sets it. With a GPU
# it is left alone: kernels run compiled.
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Skip reasons that say a test needs a GPU ("no CUDA GPU in this process", "CUDA timer needs a GPU").
_NEEDS_GPU = re.compile(r"\b(no|needs?|requires?|without)\s+(a\s+)?(cuda|gpu)\b", re.IGNORECASE)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no CUDA GPU in this process")),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _is_cuda_value(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def needs_cuda(item: pytest.Item) -> bool:
    """Whether a collected test needs a CUDA device: a parameter naming it, or a skip mark whose
    reason says the test needs a GPU."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda_value(v) for v in callspec.params.values()):
        return True
    return any(_NEEDS_GPU.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


def pytest_sessionstart(session: pytest.Session) -> None:
    from autoquant.candidates._util import triton_required

    if not triton_required():
        return
    try:
        import triton  # noqa: F401

        import autoquant.kernels  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure of a required package stops the run
        pytest.exit(f"a required package failed to import ({type(exc).__name__}: {exc}). Triton is a "
                    "declared dependency on Linux x86_64 and autoquant.kernels needs it: reinstall "
                    "with `pip install -e '.[dev]'`", returncode=4)


# Property tests explore fresh examples on a developer's machine; in CI they replay a fixed,
# derandomized sequence so a run's result depends only on the code.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev dependency
    pass
