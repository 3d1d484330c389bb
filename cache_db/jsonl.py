"""The JSON-lines exchange format: one record per line, validated field by field on the way in.

    {"kind": "header", "format": "autoquant-tuning-cache", "version": 1}
    {"kind": "environment", "hash": "...", "device_kind": "cpu", "sku": ..., ...every field}
    {"kind": "profile", "name": ..., "model_fingerprint": ..., "ops": [{"m":..,"count":..}], ...}
    {"kind": "measurement", "env": "<environment hash>", "candidate": ..., "params": "<canonical
     JSON>", "version": 1, "m":.., "k":.., "n":.., "bias": false, "dtype": "float32",
     "timed": "full", "median_s":.., "p25_s":.., "p75_s":.., "samples":.., "load_avg": null,
     "created_at": "2025-01-01T00:00:00+00:00", "host": "..."}

The header is optional; records may come in any order. Plain JSON only: nothing is evaluated.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from ..hardware import Environment
from ..keys import BenchKey, Measurement, OpShape, Timed, canonical_json, parse_dtype
from .errors import CacheImportError
from .records import MeasurementRecord, ShapeProfile, StoredMeasurement, as_utc

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ParsedFile",
    "environment_line",
    "header_line",
    "measurement_line",
    "parse_lines",
    "profile_line",
]

FORMAT = "autoquant-tuning-cache"
FORMAT_VERSION = 1
_ENV_FIELDS = tuple(f.name for f in fields(Environment))
_INT_ENV_FIELDS = {"units", "memory_mb"}
_TIMED = {t.value: t for t in Timed}
_MAX_DIM = 1 << 40
_MAX_INT = (1 << 31) - 1  # version and samples are 32-bit columns
_MAX_SECONDS = 3600.0  # one call of one linear op: anything longer is a unit mistake
_MEASUREMENT_REQUIRED = {"kind", "env", "candidate", "params", "version", "m", "k", "n", "bias",
                         "dtype", "timed", "median_s", "p25_s", "p75_s", "samples"}
_MEASUREMENT_OPTIONAL = {"load_avg", "created_at", "host"}
_MEASUREMENT_ALL = _MEASUREMENT_REQUIRED | _MEASUREMENT_OPTIONAL


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n"


def header_line() -> str:
    return _dumps({"kind": "header", "format": FORMAT, "version": FORMAT_VERSION})


def environment_line(env: Environment) -> str:
    return _dumps({"kind": "environment", "hash": env.hash, **env.to_dict()})


def _iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value is not None else None


def measurement_line(sm: StoredMeasurement) -> str:
    k, m = sm.key, sm.measurement
    return _dumps({
        "kind": "measurement", "env": k.env_hash, "candidate": k.candidate, "params": k.params,
        "version": k.version, "m": k.op.m, "k": k.op.k, "n": k.op.n, "bias": k.op.bias,
        "dtype": k.op.dtype, "timed": k.timed.value, "median_s": m.median_s, "p25_s": m.p25_s,
        "p75_s": m.p75_s, "samples": m.samples, "load_avg": m.load_avg,
        "created_at": _iso(sm.created_at), "host": sm.host,
    })


def _op_dict(op: OpShape, count: int) -> dict[str, Any]:
    return {"m": op.m, "k": op.k, "n": op.n, "bias": op.bias, "dtype": op.dtype, "count": count}


def profile_ops_json(ops: Iterable[tuple[OpShape, int]]) -> str:
    return json.dumps([_op_dict(op, c) for op, c in sorted(ops)], separators=(",", ":"))


def profile_line(p: ShapeProfile) -> str:
    return _dumps({"kind": "profile", "name": p.name, "model_fingerprint": p.model_fingerprint,
                   "ops": [_op_dict(op, c) for op, c in p.ops], "created_at": _iso(p.created_at)})


# ---- validation: every check raises _Bad, turned into CacheImportError with the line number ----

class _Bad(ValueError):
    pass


def _str(rec: dict, name: str, *, empty: bool = True) -> str:
    value = rec.get(name)
    if not isinstance(value, str):
        raise _Bad(f"{name!r} must be a string, got {type(value).__name__}")
    if not empty and not value:
        raise _Bad(f"{name!r} must not be empty")
    return value


def _int(rec: dict, name: str, low: int, high: int = _MAX_DIM) -> int:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{name!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _Bad(f"{name!r} = {value} is out of range [{low}, {high}]")
    return value


def _seconds(rec: dict, name: str) -> float:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{name!r} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= _MAX_SECONDS):
        raise _Bad(f"{name!r} = {value} is out of range [0, {_MAX_SECONDS:g}] seconds")
    return float(value)


def _keys(rec: dict, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> None:
    missing = required - rec.keys()
    unknown = rec.keys() - required - optional
    if missing:
        raise _Bad(f"missing fields {sorted(missing)}")
    if unknown:
        raise _Bad(f"unknown fields {sorted(unknown)}")


def _created_at(rec: dict) -> datetime | None:
    value = rec.get("created_at")
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad(f"'created_at' must be an ISO 8601 string or null, got {value!r}")
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError as err:
        raise _Bad(f"'created_at' {value!r} is not an ISO 8601 timestamp") from err


def _op(rec: dict) -> OpShape:
    bias = rec.get("bias")
    if not isinstance(bias, bool):
        raise _Bad(f"'bias' must be true or false, got {bias!r}")
    dtype = _str(rec, "dtype")
    if dtype not in _checked_dtypes:
        try:
            parse_dtype(dtype)
        except ValueError as err:
            raise _Bad(str(err)) from err
        _checked_dtypes.add(dtype)
    return OpShape(_int(rec, "m", 0), _int(rec, "k", 1), _int(rec, "n", 1), bias, dtype)


# A file repeats a handful of dtype and params strings; each is checked once.
_checked_dtypes: set[str] = set()
_checked_params: set[str] = set()


def _params(rec: dict) -> str:
    params = _str(rec, "params")
    if params in _checked_params:
        return params
    try:
        decoded = json.loads(params)
    except ValueError as err:
        raise _Bad(f"'params' is not JSON: {params!r}") from err
    if not isinstance(decoded, dict) or canonical_json(decoded) != params:
        raise _Bad(f"'params' must be canonical JSON of an object (sorted keys, no spaces): "
                   f"{params!r}")
    if len(_checked_params) < 10_000:
        _checked_params.add(params)
    return params


def _environment(rec: dict) -> Environment:
    _keys(rec, {"kind", "hash", *_ENV_FIELDS})
    values = {n: (_int(rec, n, 0, 1 << 62) if n in _INT_ENV_FIELDS else _str(rec, n))
              for n in _ENV_FIELDS}
    env = Environment(**values)
    if env.hash != rec["hash"]:
        raise _Bad(f"environment hash {rec['hash']!r} does not match its fields ({env.hash!r})")
    return env


_FIELDS = operator.itemgetter("env", "candidate", "params", "version", "m", "k", "n", "bias",
                              "dtype", "timed", "median_s", "p25_s", "p75_s", "samples")


def _measurement(rec: dict) -> MeasurementRecord:
    """The common case, checked inline (an import spends most of its time here); anything
    unusual goes through :func:`_measurement_checked`, which accepts exactly the same records
    and names the field at fault."""
    if rec.keys() == _MEASUREMENT_ALL:
        env, cand, params, version, m, k, n, bias, dtype, timed, med, p25, p75, samples = \
            _FIELDS(rec)
        load, host = rec["load_avg"], rec["host"]
        if (type(env) is str and env and type(cand) is str and cand
                and params in _checked_params and dtype in _checked_dtypes and timed in _TIMED
                and type(version) is int and 0 <= version <= _MAX_INT
                and type(m) is int and type(k) is int and type(n) is int
                and 0 <= m <= _MAX_DIM and 0 < k <= _MAX_DIM and 0 < n <= _MAX_DIM
                and type(bias) is bool and type(samples) is int and 1 <= samples <= _MAX_INT
                and type(med) is float and type(p25) is float and type(p75) is float
                and 0.0 <= p25 <= med <= p75 <= _MAX_SECONDS  # False for NaN; inf is too big
                and (load is None or (type(load) is float and 0.0 <= load <= _MAX_SECONDS))
                and type(host) is str and rec["created_at"] is None):
            return MeasurementRecord(env, (cand, m, k, n, dtype, bias, timed, params, version),
                                     (med, p25, p75, samples, load), None, host)
    return MeasurementRecord.from_stored(_measurement_checked(rec))


def _measurement_checked(rec: dict) -> StoredMeasurement:
    _keys(rec, _MEASUREMENT_REQUIRED, _MEASUREMENT_OPTIONAL)
    params = _params(rec)
    timed = rec.get("timed")
    if timed not in _TIMED:
        raise _Bad(f"'timed' must be one of {sorted(_TIMED)}, got {timed!r}")
    median, p25, p75 = _seconds(rec, "median_s"), _seconds(rec, "p25_s"), _seconds(rec, "p75_s")
    if not p25 <= median <= p75:
        raise _Bad(f"need p25_s <= median_s <= p75_s, got {p25} / {median} / {p75}")
    load = rec.get("load_avg")
    if load is not None:
        load = _seconds(rec, "load_avg")  # same checks: a finite, non-negative number
    host = rec.get("host", "")
    if not isinstance(host, str):
        raise _Bad(f"'host' must be a string, got {host!r}")
    key = BenchKey(_str(rec, "env", empty=False), _str(rec, "candidate", empty=False), params,
                   _int(rec, "version", 0, _MAX_INT), _op(rec), _TIMED[timed])
    figures = Measurement(median, p25, p75, _int(rec, "samples", 1, _MAX_INT), load)
    return StoredMeasurement(key, figures, _created_at(rec), host)


def _profile(rec: dict) -> ShapeProfile:
    _keys(rec, {"kind", "name", "model_fingerprint", "ops"}, {"created_at"})
    ops = rec.get("ops")
    if not isinstance(ops, list):
        raise _Bad("'ops' must be a list")
    parsed = []
    for i, item in enumerate(ops):
        if not isinstance(item, dict):
            raise _Bad(f"ops[{i}] must be an object")
        try:
            _keys(item, {"m", "k", "n", "bias", "dtype", "count"})
            parsed.append((_op(item), _int(item, "count", 1, 1 << 62)))
        except _Bad as err:
            raise _Bad(f"ops[{i}]: {err}") from err
    return ShapeProfile(_str(rec, "name", empty=False), _str(rec, "model_fingerprint"),
                        tuple(sorted(parsed)), _created_at(rec))


@dataclass
class ParsedFile:
    records: int
    environments: dict[str, Environment]
    measurements: list[tuple[int, MeasurementRecord]]  # (line number, record)
    profiles: list[tuple[int, ShapeProfile]]


def _header(rec: dict) -> None:
    _keys(rec, {"kind", "format", "version"})
    if rec["format"] != FORMAT:
        raise _Bad(f"format {rec['format']!r} is not {FORMAT!r}")
    if rec["version"] != FORMAT_VERSION:
        raise _Bad(f"format version {rec['version']!r} is not supported (this autoquant reads "
                   f"version {FORMAT_VERSION}); upgrade autoquant")


def _decode_line(number: int, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise CacheImportError(number, f"not valid JSON ({err})") from err


def _decode(batch: list[tuple[int, str]]) -> Iterable[tuple[int, Any]]:
    """Decode a batch of lines as one JSON array (half the cost of one json.loads per line).
    Only when every line is a single {...} object and the count matches; otherwise line by
    line, which names the line at fault."""
    if all(t[0] == "{" and t[-1] == "}" for _, t in batch):
        try:
            values = json.loads("[" + ",".join(t for _, t in batch) + "]")
        except ValueError:
            values = None
        if values is not None and len(values) == len(batch):
            return zip([n for n, _ in batch], values)
    return [(n, _decode_line(n, t)) for n, t in batch]


def _records(lines: Iterable[str], batch_size: int = 4096) -> Iterable[tuple[int, Any]]:
    batch: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if text:
            batch.append((number, text))
            if len(batch) == batch_size:
                yield from _decode(batch)
                batch = []
    yield from _decode(batch)


def parse_lines(lines: Iterable[str]) -> ParsedFile:
    """Validate every line; raise CacheImportError naming the first bad line."""
    out = ParsedFile(0, {}, [], [])
    for number, rec in _records(lines):
        if not isinstance(rec, dict):
            raise CacheImportError(number, f"expected a JSON object, got {type(rec).__name__}")
        try:
            kind = rec.get("kind")
            if kind == "measurement":
                out.measurements.append((number, _measurement(rec)))
            elif kind == "environment":
                env = _environment(rec)
                out.environments[env.hash] = env
            elif kind == "profile":
                out.profiles.append((number, _profile(rec)))
            elif kind == "header":
                _header(rec)
            else:
                raise _Bad(f"unknown record kind {kind!r} (expected measurement, environment, "
                           "profile or header)")
        except ValueError as err:  # _Bad, and the dataclasses' own checks
            raise CacheImportError(number, str(err)) from err
        out.records += 1
    return out
