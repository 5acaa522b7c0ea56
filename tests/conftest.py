import sys
from pathlib import Path
import pytest

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: longer end-to-end checks, run by `make test-slow`')

@pytest.fixture(scope='session')
def bin_dir() -> Path:
    "The environment's script folder, where the `mtabn_*` console scripts are installed."
    return Path(sys.executable).parent
