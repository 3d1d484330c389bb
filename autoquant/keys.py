"""Plain, hashable keys and results shared by the tuner, the harness and every cache store.

These are the cache's vocabulary (DESIGN.md section 6). They hold only str / int / float / bool so a
store can write them as typed SQL columns or JSON lines, never pickles.

>>> op = OpShape(m=16, k=1024, n=4096, bias=True, dtype="float32")
>>> BenchKey(env_hash="abc", candidate="int8_dynamic", params='{"kernel":"fbgemm"}', version=1,
...          op=op, timed=Timed.FULL).op.m
16
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["OpShape", "Timed", "BenchKey", "Measurement", "canonical_json", "dtype_name", "parse_dtype"]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling used in keys, reports and JSON."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ValueError naming the bad string."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: expected a torch dtype name such as 'float32'")
    return value


def canonical_json(params: Mapping[str, Any]) -> str:
    """Key-sorted, whitespace-free JSON: equal params always give equal strings (cache key part)."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, order=True)
class OpShape:
    """One linear op as the tuner sees it: x[M, K] @ W[N, K].T (+ bias), activations of `dtype`.

    Leading activation dims are folded into M, so a [2, 7, K] input is M=14.
    """

    m: int
    k: int
    n: int
    bias: bool
    dtype: str

    def __post_init__(self) -> None:
        if self.m < 0 or self.k <= 0 or self.n <= 0:
            raise ValueError(f"bad op shape M={self.m} K={self.k} N={self.n}: need M >= 0, K, N > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n}{'+b' if self.bias else ''} {self.dtype}"


class Timed(str, enum.Enum):
    """What a measurement timed (DESIGN.md section 4).

    FULL: the whole installed op, activation quantization included.
    MATMUL: for dynamic-activation schemes, the matmul alone on an already quantized activation.
    RELU: relu(op(relu(x))), the `relu` cost model's stand-in for fusion with neighbours.
    EAGER: on CUDA, the whole installed op called eagerly through Python, host time included
    (synchronized calls timed with the host clock), which is what a finalized layer costs in a
    model that is not compiled or graph-captured. FULL, MATMUL and RELU are CUDA-graph replays on
    CUDA (GPU time only); on a CPU, FULL is already an eager call and EAGER is never timed.
    """

    FULL = "full"
    MATMUL = "matmul"
    RELU = "relu"
    EAGER = "eager"


@dataclass(frozen=True, order=True)
class BenchKey:
    """Identity of one raw measurement: everything but the figures.

    `env_hash` names the device + software fingerprint (see :mod:`autoquant.hardware`); a row from
    another environment is never a hit. `params` is :func:`canonical_json` of the candidate's params
    (kernel choice included) and `version` bumps when a candidate's implementation changes.
    """

    env_hash: str
    candidate: str
    params: str
    version: int
    op: OpShape
    timed: Timed


@dataclass(frozen=True)
class Measurement:
    """Seconds per call: median and interquartile range over `samples` samples.

    `load_avg` is the 1-minute load average when it was taken (None where unknown); a high one
    explains a noisy figure in the report.
    """

    median_s: float
    p25_s: float
    p75_s: float
    samples: int
    load_avg: float | None = None

    def __post_init__(self) -> None:
        if not (self.median_s >= 0 and self.p25_s >= 0 and self.p75_s >= 0):
            raise ValueError(f"measurement times must be >= 0 seconds, got {self}")
        if self.samples < 1:
            raise ValueError(f"a measurement needs at least one sample, got {self.samples}")

    @property
    def spread(self) -> float:
        """Relative half-IQR, the noise band used to call two candidates a tie."""
        if self.median_s == 0:
            return 0.0
        return (self.p75_s - self.p25_s) / (2.0 * self.median_s)
