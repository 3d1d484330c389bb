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
