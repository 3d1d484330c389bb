"""The notebooks execute top to bottom on small sizes, so they never rot."""

from pathlib import Path

import pytest
from helpers import require_module

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_team_cache.ipynb", "03_kernels.ipynb",
                                          "04_transformers.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat, nbclient = require_module("nbformat"), require_module("nbclient")
    monkeypatch.setenv("AUTOQUANT_NB_SMALL", "1")
    monkeypatch.setenv("AUTOQUANT_CACHE_URL", str(tmp_path / "nb-cache.sqlite"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
