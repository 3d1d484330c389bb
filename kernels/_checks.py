"""Argument checks shared by the op wrappers.

Every failure is a ValueError that names the op, the argument and what was expected, so a caller
(a candidate family, a test) can tell a bad call from a kernel failure. The checks read only
metadata (shape, dtype, device), so they also run on fake tensors while torch.compile traces.
"""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Kernels index with int32 offsets; larger operands would overflow them.
MAX_NUMEL = 2**31 - 1


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_matrix(
    op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype], layout: str
) -> None:
    """``t`` must be a 2-D tensor of one of ``dtypes``; ``layout`` names its shape ("[M, K]")."""
    if not isinstance(t, torch.Tensor):
        # ValueError, not TypeError: the op contract reports every bad argument the same way.
        msg = f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}"
        raise ValueError(msg)  # noqa: TRY004
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must have dtype {_names(dtypes)}, got {t.dtype}")
    if t.numel() > MAX_NUMEL:
        raise ValueError(
            f"{op}: {name} has {t.numel()} elements; the kernels support at most {MAX_NUMEL}"
        )


def check_vector(
    op: str, name: str, t: torch.Tensor, length: int, dtypes: Sequence[torch.dtype]
) -> None:
    """``t`` must be a 1-D tensor of ``length`` elements and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        msg = f"{op}: {name} must be a torch.Tensor [{length}], got {type(t).__name__}"
        raise ValueError(msg)  # noqa: TRY004  (see check_matrix)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have shape [{length}], got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must have dtype {_names(dtypes)}, got {t.dtype}")


def check_bias(op: str, bias: torch.Tensor | None, n: int) -> None:
    """Bias is optional; when given it is a float vector with one entry per output column."""
    if bias is not None:
        check_vector(op, "bias", bias, n, FLOAT_DTYPES)


def check_same_k(op: str, x_name: str, k_x: int, w_name: str, k_w: int) -> None:
    if k_x != k_w:
        raise ValueError(
            f"{op}: {x_name} has K={k_x} columns but {w_name} has K={k_w}; they must match"
        )


def check_out_dtype(op: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be {_names(FLOAT_DTYPES)}, got {out_dtype}")


def check_devices(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """All given tensors must live on one device (the first one's)."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all operands must be on one device"
            )
