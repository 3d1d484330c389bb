"""Shape profiles: the ops a model runs (shapes, dtypes, counts), without its weights.

A team records a profile once (``record_shapes``), ships it as JSON or stores it in the tuning
cache under a name, and pre-tunes every target GPU SKU from it (``autoquant pretune``).

>>> import torch
>>> p = record_shapes(torch.nn.Sequential(torch.nn.Linear(8, 4)), torch.randn(2, 8), name="tiny")
>>> [(op.m, op.k, op.n, n) for op, n in p.ops]
[(2, 8, 4, 1)]
>>> ShapeProfile.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .keys import OpShape

__all__ = ["ShapeProfile", "record_shapes", "model_fingerprint", "load_profile", "parse_m_buckets"]

PROFILE_FORMAT = "autoquant-shape-profile"


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's linear layers (names and shapes): same architecture, same print."""
    root = getattr(model, "_orig_mod", model)
    parts = [f"{n}:{m.in_features}x{m.out_features}:{m.bias is not None}"
             for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShapeProfile:
    """Ops and their call counts (summed over layers), sorted: a canonical, weight-free record.

    The same class travels through JSON files and the tuning cache (``autoquant.cache_db`` hands it
    out); ``created_at`` is set where a cache stored it, and takes no part in equality or JSON.
    """

    name: str
    model_fingerprint: str
    ops: tuple[tuple[OpShape, int], ...]
    created_at: datetime | None = field(default=None, compare=False)

    def counts(self) -> dict[OpShape, int]:
        return dict(self.ops)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "name": self.name, "model_fingerprint": self.model_fingerprint,
                "ops": [{"m": op.m, "k": op.k, "n": op.n, "bias": op.bias, "dtype": op.dtype, "count": n}
                        for op, n in self.ops]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "profile") -> "ShapeProfile":
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where} is not an autoquant shape profile (format {PROFILE_FORMAT!r} expected)")
        try:
            ops = tuple(sorted(
                (OpShape(int(o["m"]), int(o["k"]), int(o["n"]), bool(o["bias"]), str(o["dtype"])), int(o["count"]))
                for o in data["ops"]))
            return cls(str(data["name"]), str(data["model_fingerprint"]), ops)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed shape profile ({exc})") from exc

    @classmethod
    def from_json(cls, text: str, where: str = "profile") -> "ShapeProfile":
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc})") from exc

    def with_m(self, ms: Iterable[int]) -> "ShapeProfile":
        """The same layers at every M in `ms` as well: each recorded (K, N, bias, dtype) gains an op
        at each of those M (count 1 where it was not recorded), so that pretune and the workers
        also cover the batch sizes and prompt lengths a deployment will see.

        >>> p = ShapeProfile("p", "fp", ((OpShape(16, 8, 4, False, "float32"), 3),))
        >>> [(op.m, n) for op, n in p.with_m([1, 16, 64]).ops]
        [(1, 1), (16, 3), (64, 1)]
        """
        wanted = sorted({int(m) for m in ms})
        if not wanted or wanted[0] < 1:
            raise ValueError(f"M buckets must be positive integers, got {list(ms)}")
        counts = dict(self.ops)
        for op in {OpShape(0, o.k, o.n, o.bias, o.dtype) for o in counts}:
            for m in wanted:
                counts.setdefault(OpShape(m, op.k, op.n, op.bias, op.dtype), 1)
        return ShapeProfile(self.name, self.model_fingerprint, tuple(sorted(counts.items())), self.created_at)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")


def parse_m_buckets(text: str) -> list[int]:
    """M values from "1,2,4,8" or a range "1-128" (the powers of two within it, both ends kept),
    or both mixed: "1-16,24,100".

    >>> parse_m_buckets("1-16,24")
    [1, 2, 4, 8, 16, 24]
    """
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo < 1 or hi < lo:
                    raise ValueError
                out.update({lo, hi})
                p = 1
                while p <= hi:
                    if p >= lo:
                        out.add(p)
                    p *= 2
            else:
                value = int(part)
                if value < 1:
                    raise ValueError
                out.add(value)
        except ValueError:
            raise ValueError(f"M buckets {text!r}: {part!r} is neither a positive integer nor a range "
                             "like 1-128") from None
    if not out:
        raise ValueError(f"M buckets {text!r}: no value given (e.g. 1,2,4,8 or 1-128)")
    return sorted(out)


def load_profile(path: str | os.PathLike[str]) -> ShapeProfile:
    with open(path, encoding="utf-8") as fh:
        return ShapeProfile.from_json(fh.read(), where=str(path))


def record_shapes(model: nn.Module, *inputs: Any, name: str = "profile", **kwargs: Any) -> ShapeProfile:
    """Run `model(*inputs, **kwargs)` once and return the linear ops it ran, with counts.

    The model is left exactly as it was: weights are only wrapped for the call and then restored.
    """
    from .finalize import restore_float  # noqa: PLC0415 - avoid an import cycle at module load
    from .subclass import AutoQuantizableLinearWeight, LayerRecord  # noqa: PLC0415

    root = getattr(model, "_orig_mod", model)
    linears = [m for m in root.modules() if isinstance(m, nn.Linear)
               and not isinstance(m.weight, AutoQuantizableLinearWeight)]
    records = []
    try:
        for lin in linears:
            rec = LayerRecord("", max_rows=1)
            records.append(rec)
            lin.weight = nn.Parameter(AutoQuantizableLinearWeight.wrap(lin.weight, rec),
                                      requires_grad=lin.weight.requires_grad)
        with torch.no_grad():
            root(*inputs, **kwargs)
    finally:
        for lin in linears:
            restore_float(lin)
    total: dict[OpShape, int] = {}
    for rec in records:
        for op, n in rec.counts.items():
            total[op] = total.get(op, 0) + n
    return ShapeProfile(name, model_fingerprint(root), tuple(sorted(total.items())))
