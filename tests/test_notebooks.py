"Every notebook also runs top to bottom in a real Jupyter kernel (as in JupyterLab), slow cells included."
from pathlib import Path
import papermill
import pytest

NBS = Path(__file__).parents[1]/'nbs'
QUICK = {'00_data.ipynb', 'index.ipynb'}


@pytest.mark.parametrize('notebook', [pytest.param(nb.name, marks=[] if nb.name in QUICK else [pytest.mark.slow])
                                      for nb in sorted(NBS.glob('*.ipynb')) if nb.name != 'train_run.ipynb'])
def test_notebook_runs_in_a_kernel(notebook, tmp_path):
    papermill.execute_notebook(NBS/notebook, tmp_path/notebook, kernel_name='python3', cwd=str(NBS),
                               progress_bar=False)
