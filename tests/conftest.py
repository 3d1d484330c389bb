"""Shared fixtures. `device`: "cpu" always, "cuda" when a GPU is present (skipped with a reason
otherwise). Nothing here changes global state (no seeds, env vars or thread counts set at import)."""

import pytest
import torch

_CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no CUDA GPU in this process")),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


# Property tests explore fresh examples on a developer's machine; in CI they replay a fixed,
# derandomized sequence so a run's result depends only on the code.
try:
    import os

    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev dependency
    pass
