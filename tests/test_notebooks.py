"""Every notebook also runs top to bottom in a real Jupyter kernel, as JupyterLab's "Run All" runs it: `#| eval: false`
cells included, since JupyterLab does not read nbdev's directives. By default the cells flagged with one of
settings.ini's `tst_flags` (`#| slow`) are left out, as nbdev_test leaves them out; `make test-slow` runs them too."""
from pathlib import Path
import nbformat
import papermill
import pytest
from nbdev.config import get_config
from nbdev.process import extract_directives

NBS = Path(__file__).parents[1]/'nbs'
NOTEBOOKS = [nb.name for nb in sorted(NBS.glob('*.ipynb')) if nb.name != 'train_run.ipynb']
TEST_FLAGS = set(get_config(path=NBS).tst_flags.split())


def without_flagged_cells(notebook: Path, out: Path) -> Path:
    "A copy of `notebook` in `out` without the code cells that carry a test flag (`#| slow`)."
    nb = nbformat.read(notebook, as_version=4)
    nb.cells = [cell for cell in nb.cells
                if cell.cell_type != 'code' or not TEST_FLAGS & extract_directives(cell, remove=False).keys()]
    nbformat.write(nb, out)
    return out


def run_in_kernel(notebook: Path, out: Path):
    papermill.execute_notebook(notebook, out, kernel_name='python3', cwd=str(NBS), progress_bar=False)


@pytest.mark.parametrize('notebook', NOTEBOOKS)
def test_notebook_runs_in_a_kernel(notebook, tmp_path):
    run_in_kernel(without_flagged_cells(NBS/notebook, tmp_path/f'unflagged_{notebook}'), tmp_path/notebook)


@pytest.mark.slow
@pytest.mark.parametrize('notebook', NOTEBOOKS)
def test_notebook_runs_in_a_kernel_with_slow_cells(notebook, tmp_path):
    run_in_kernel(NBS/notebook, tmp_path/notebook)
