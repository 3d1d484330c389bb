"""Two real tuner processes on one cache (a SQLite file, and a PostgreSQL database): each finishes
with the other's measurements visible, no write failure was turned into a warning on the way, and
every row is the figure one tuner measured."""

from __future__ import annotations

import multiprocessing
import pytest

from .conftest import TEST_DB
from .tuners import SHARED_N, cost_s, own_n, tune_then_look

TUNERS = 2


@pytest.fixture(scope="module")
def tuner_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both tuners, run once against every backend present (a process that imports torch costs
    seconds, so one pair of processes serves both databases)."""
    urls = {"sqlite": f"sqlite:///{tmp_path_factory.mktemp('tuners') / 'shared.sqlite'}"}
    try:
        urls["postgresql"] = request.getfixturevalue("postgres_server").create_schema(TEST_DB, "tuners")
    except pytest.skip.Exception:
        pass  # the postgresql case reports the skip (or, under CI, the failure) itself
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(TUNERS)
    pipes = [ctx.Pipe(duplex=False) for _ in range(TUNERS)]
    procs = [ctx.Process(target=tune_then_look, args=(list(urls.values()), w, barrier, pipes[w][1]))
             for w in range(TUNERS)]
    for p in procs:
        p.start()
    seen: dict[int, dict[str, dict]] = {w: {} for w in range(TUNERS)}
    for w, (receiver, sender) in enumerate(pipes):
        sender.close()
        for _ in urls:
            if not receiver.poll(600):
                break
            got = receiver.recv()
            seen[w][got["url"]] = got
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
    return {"urls": urls, "seen": seen, "codes": [p.exitcode for p in procs]}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_tuners_see_each_others_measurements(request: pytest.FixtureRequest, backend: str,
                                                 tuner_run: dict) -> None:
    if backend == "postgresql":
        request.getfixturevalue("postgres_server")  # skip (or fail under CI) without a server
    assert tuner_run["codes"] == [0] * TUNERS, "a tuner process failed: see its traceback above"
    url = tuner_run["urls"][backend]
    for w in range(TUNERS):
        got = tuner_run["seen"][w][url]
        assert "failed" not in got["cache"], got["cache"]
        assert not [m for m in got["warnings"] if "cache" in m], got["warnings"]
        by_n: dict[int, list] = {}
        for n, _family, params, _timed, median in got["rows"]:
            by_n.setdefault(n, []).append((params, median))
        for other in range(TUNERS):
            mine = by_n.get(own_n(other), [])
            assert mine, f"tuner {w} finished without tuner {other}'s measurements of N={own_n(other)}"
            # each row of a tuner's own op holds that tuner's figure
            assert all(median == cost_s(other, own_n(other), params) for params, median in mine)
        shared = by_n.get(SHARED_N, [])
        assert shared and all(median in {cost_s(o, SHARED_N, params) for o in range(TUNERS)}
                              for params, median in shared)


def test_tuner_figures_name_the_tuner() -> None:
    """The check above can tell the tuners apart: no figure of one equals the other's."""
    assert cost_s(0, SHARED_N, "{}") != cost_s(1, SHARED_N, "{}")
    assert own_n(0) != own_n(1) != SHARED_N
