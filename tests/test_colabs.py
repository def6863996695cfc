"""Every notebook in colabs/ runs top to bottom in its small-size mode, and every figure it
draws is written as a PNG that is not blank."""
import glob
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
MIN_PIXEL_STD = 2.0  # on 0..255: a blank or single-colour canvas is below this


def test_there_are_notebooks():
  assert NOTEBOOKS, "colabs/ has no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  import nbclient
  import nbformat
  from PIL import Image
  figures = tmp_path / "figures"
  # The kernel inherits this environment: the small-size switch, where figures go, and the
  # checkout (not an installed copy) on the path.
  monkeypatch.setenv("VITOKEN_COLAB_SMALL", "1")
  monkeypatch.setenv("VITOKEN_COLAB_OUT", str(figures))
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(path, as_version=4)
  first = next(c for c in notebook.cells if c.cell_type == "code")
  assert "import vitoken" in first.source and "pip" in first.source, "first cell installs vitoken"
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)} failed in a cell:\n{e}")
  pngs = sorted(figures.glob("*.png"))
  assert pngs, f"{os.path.basename(path)} wrote no figure to $VITOKEN_COLAB_OUT"
  for png in pngs:
    pixels = np.asarray(Image.open(png).convert("L"), np.float32)
    assert pixels.std() > MIN_PIXEL_STD, f"{png.name} is blank"
