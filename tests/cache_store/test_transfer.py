"""Export / import / merge as JSON lines: round trips, the conflict rule, and validation."""

from __future__ import annotations

import io
import json
import re

import pytest
from autoquant.cache_db import CacheImportError, SQLStore
from autoquant.cache_db.jsonl import measurement_line, parse_lines
from autoquant.cache_db.records import StoredMeasurement
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.keys import BenchKey, Measurement, OpShape, Timed, canonical_json

from .conftest import CPU_ENV, GPU_ENV
from .helpers import figures, key, model_keys


def _export(store: SQLStore, sku: str | None = None) -> str:
    buf = io.StringIO()
    store.export_jsonl(buf, sku)
    return buf.getvalue()


def _lines(text: str, kind: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r["kind"] == kind]


def test_round_trip_between_backends(store: SQLStore, tmp_path) -> None:
    items = model_keys(CPU_ENV, 50)
    store.put_many(CPU_ENV, items)
    store.put_many(GPU_ENV, {key(GPU_ENV): figures()})
    store.save_profile("mlp", "fp", {OpShape(16, 96, 4097, True, "bfloat16"): 3})
    text = _export(store)
    other = SQLStore(tmp_path / "other.sqlite")
    report = other.import_jsonl(io.StringIO(text))
    assert (report.inserted, report.environments_added, report.profiles_added) == (51, 2, 1)
    assert other.get_many(list(items)) == items
    assert other.load_profile("mlp").counts() == store.load_profile("mlp").counts()
    original = {s.key: (s.measurement, s.host, s.created_at) for s in store.measurements()}
    assert {s.key: (s.measurement, s.host, s.created_at) for s in other.measurements()} == original
    again = other.import_jsonl(io.StringIO(text))
    assert (again.inserted, again.identical, again.conflicts) == (0, 51, 0)


def test_export_filters_by_sku(store: SQLStore) -> None:
    store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    store.put_many(GPU_ENV, {key(GPU_ENV, 1): figures(), key(GPU_ENV, 2): figures()})
    store.save_profile("p", "fp", {OpShape(1, 8, 8, False, "float32"): 1})
    text = _export(store, sku="h100")
    assert [e["sku"] for e in _lines(text, "environment")] == [GPU_ENV.sku]
    assert len(_lines(text, "measurement")) == 2 and not _lines(text, "profile")
    assert not _lines(_export(store, sku="no such gpu"), "measurement")


def _line(k: BenchKey, m: Measurement) -> str:
    return measurement_line(StoredMeasurement(k, m))


def test_conflicts_keep_the_better_sampled(store: SQLStore) -> None:
    a, b, c = key(CPU_ENV, 1), key(CPU_ENV, 2), key(CPU_ENV, 3)
    store.put_many(CPU_ENV, {a: figures(1e-5, samples=10), b: figures(1e-5, samples=10),
                             c: figures(1e-5, samples=10)})
    text = "".join([_line(a, figures(2e-5, samples=50)),   # more samples: replaces
                    _line(b, figures(2e-5, samples=5)),    # fewer: stored one kept
                    _line(c, figures(2e-5, samples=10))])  # tie: stored one kept
    from autoquant.cache_db.jsonl import environment_line
    r = store.import_jsonl(io.StringIO(environment_line(CPU_ENV) + text))
    assert (r.replaced, r.kept_existing, r.conflicts, r.inserted) == (1, 2, 3, 0)
    assert len(r.conflict_examples) == 3 and "kept incoming" in r.conflict_examples[0]
    got = store.get_many([a, b, c])
    assert (got[a].samples, got[b].samples, got[c].samples) == (50, 10, 10)


def test_duplicates_inside_one_file_follow_the_same_rule(store: SQLStore) -> None:
    from autoquant.cache_db.jsonl import environment_line
    a = key(CPU_ENV)
    text = environment_line(CPU_ENV) + _line(a, figures(1e-5, samples=3)) + \
        _line(a, figures(2e-5, samples=30)) + _line(a, figures(3e-5, samples=30))
    r = store.import_jsonl(io.StringIO(text))
    assert (r.inserted, r.conflicts) == (1, 2)
    assert store.get_many([a])[a].median_s == 2e-5


def test_merge(store: SQLStore, tmp_path) -> None:
    other = SQLStore(tmp_path / "team.sqlite")
    other.put_many(GPU_ENV, {key(GPU_ENV): figures(samples=40)})
    other.put_many(CPU_ENV, {key(CPU_ENV): figures(9e-6, samples=99)})
    other.save_profile("bert", "fp", {OpShape(8, 768, 768, True, "float16"): 72})
    store.put_many(CPU_ENV, {key(CPU_ENV): figures(1e-5, samples=5)})
    r = store.merge(other)
    assert (r.inserted, r.replaced, r.environments_added, r.profiles_added) == (1, 1, 1, 1)
    assert store.get_many([key(CPU_ENV)])[key(CPU_ENV)].samples == 99
    assert store.merge(other).identical == 2


GOOD = json.loads(_line(key(CPU_ENV), figures()))


@pytest.mark.parametrize("change,message", [
    ({"m": -1}, "'m' = -1 is out of range"),
    ({"k": 0}, "'k' = 0 is out of range"),
    ({"n": "4097"}, "'n' must be an integer"),
    ({"samples": 0}, "'samples' = 0 is out of range"),
    ({"samples": 2.5}, "'samples' must be an integer"),
    ({"bias": 1}, "'bias' must be true or false"),
    ({"timed": "fused"}, "'timed' must be one of"),
    ({"dtype": "float33"}, "unknown dtype"),
    ({"median_s": -1.0}, "'median_s' = -1.0 is out of range"),
    ({"median_s": 1e9}, "out of range"),
    ({"p25_s": 1.0}, "p25_s <= median_s <= p75_s"),
    ({"params": '{"b":1, "a":2}'}, "canonical JSON"),
    ({"params": "[1]"}, "canonical JSON"),
    ({"params": "{"}, "not JSON"),
    ({"candidate": ""}, "must not be empty"),
    ({"created_at": "yesterday"}, "ISO 8601"),
    ({"extra": 1}, "unknown fields ['extra']"),
    ({"kind": "measurment"}, "unknown record kind"),
], ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_bad_records_name_their_line(store: SQLStore, change: dict, message: str) -> None:
    from autoquant.cache_db.jsonl import environment_line, header_line
    bad = json.dumps({**GOOD, **change})
    text = header_line() + environment_line(CPU_ENV) + "\n" + bad + "\n"
    with pytest.raises(CacheImportError, match=re.escape(message)) as info:
        store.import_jsonl(io.StringIO(text))
    assert info.value.line == 4 and "line 4:" in str(info.value)


@pytest.mark.parametrize("text,line,message", [
    ("not json\n", 1, "not valid JSON"),
    ("[1, 2]\n", 1, "expected a JSON object"),
    ('{"kind": "header", "format": "autoquant-tuning-cache", "version": 9}\n', 1,
     "format version 9"),
    ('{"kind": "header", "format": "other", "version": 1}\n', 1, "is not"),
], ids=["garbage", "array", "future-format", "foreign-format"])
def test_bad_lines(store: SQLStore, text: str, line: int, message: str) -> None:
    with pytest.raises(CacheImportError, match=re.escape(message)) as info:
        store.import_jsonl(io.StringIO(text))
    assert info.value.line == line


def test_environment_hash_must_match_its_fields(store: SQLStore) -> None:
    rec = {"kind": "environment", "hash": "0" * 16, **CPU_ENV.to_dict()}
    with pytest.raises(CacheImportError, match="does not match its fields"):
        store.import_jsonl(io.StringIO(json.dumps(rec)))


def test_unknown_environment_and_nothing_written(store: SQLStore) -> None:
    from autoquant.cache_db.jsonl import environment_line
    text = environment_line(CPU_ENV) + _line(key(CPU_ENV, 1), figures()) + \
        _line(key(GPU_ENV, 1), figures())
    with pytest.raises(CacheImportError, match="neither in the file nor") as info:
        store.import_jsonl(io.StringIO(text))
    assert info.value.line == 3
    assert store.measurements() == [] and store.environments() == []


_names = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1,
                 max_size=12)
_secs = st.floats(min_value=0, max_value=1.0, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(candidate=_names, params=st.dictionaries(_names, st.integers() | _names, max_size=3),
       m=st.integers(0, 1 << 20), k=st.integers(1, 1 << 20), bias=st.booleans(),
       timed=st.sampled_from(list(Timed)), times=st.lists(_secs, min_size=3, max_size=3),
       samples=st.integers(1, 10_000), load=st.none() | _secs, host=st.text(max_size=8))
def test_measurement_lines_round_trip(candidate, params, m, k, bias, timed, times, samples, load,
                                      host) -> None:
    p25, median, p75 = sorted(times)
    sm = StoredMeasurement(
        BenchKey(CPU_ENV.hash, candidate, canonical_json(params), 3, OpShape(m, k, 7, bias,
                                                                             "float16"), timed),
        Measurement(median, p25, p75, samples, load), None, host)
    parsed = parse_lines([measurement_line(sm)])
    assert [(n, r.to_stored()) for n, r in parsed.measurements] == [(1, sm)]


_values = (st.none() | st.booleans() | st.integers(-5, 1 << 41) | st.floats(allow_nan=True)
           | st.text(max_size=4) | st.just("float32") | st.just("full") | st.just("{}"))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(GOOD)), value=_values)
def test_fast_and_checked_validation_agree(field: str, value: object) -> None:
    from autoquant.cache_db import jsonl
    rec = {**GOOD, field: value}
    from autoquant.cache_db.records import MeasurementRecord

    def checked(r: dict) -> MeasurementRecord:
        return MeasurementRecord.from_stored(jsonl._measurement_checked(r))

    outcomes = []
    for check in (jsonl._measurement, checked):
        try:
            outcomes.append(("ok", check(dict(rec))))
        except ValueError:
            outcomes.append(("error", None))
    assert outcomes[0] == outcomes[1]


def test_lines_that_are_not_one_object_each_are_refused(store: SQLStore) -> None:
    good = _line(key(CPU_ENV), figures()).strip()
    from autoquant.cache_db.jsonl import environment_line
    text = environment_line(CPU_ENV) + good + ", " + good + "\n"
    with pytest.raises(CacheImportError, match="not valid JSON") as info:
        store.import_jsonl(io.StringIO(text))
    assert info.value.line == 2
