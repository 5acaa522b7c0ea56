import configparser
import subprocess
import sys
from pathlib import Path
import pytest

PROJECT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: longer end-to-end checks, run by `make test-slow`')
    config.addinivalue_line('markers', 'gpu: the CUDA path (skipped without a GPU), run by `make gpu-check`')
    config.addinivalue_line('markers', 'browser: real-browser checks (headless Chromium; skipped with the reason when none can be installed)')


def console_scripts() -> dict[str, str]:
    "settings.ini's console scripts: name -> 'module:function'."
    settings = configparser.ConfigParser(interpolation=None)
    settings.read(PROJECT / 'settings.ini')
    entries = (line.split('=') for line in settings['DEFAULT']['console_scripts'].split())
    return {name.strip(): target.strip() for name, target in entries}


class Console:
    """Runs the project's console scripts as a user does: `console('mtabn_eval', run, '--split', 'test')` returns
    the finished process (text output captured). The launchers do what pip's entry-point launchers do, so the
    tests do not depend on how, or whether, the package's scripts were installed."""
    def __init__(self, folder: Path):
        self.folder = folder
        for name, target in console_scripts().items():
            module, function = target.split(':')
            (folder / name).write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
                                       f"if __name__ == '__main__': sys.exit({function}())\n")
            (folder / name).chmod(0o755)          # executable, as `torchrun --no-python` runs it

    def command(self, name: str, *args) -> list[str]:
        if not (self.folder / name).is_file(): raise KeyError(f"{name} is not a console script of settings.ini")
        return [sys.executable, str(self.folder / name), *map(str, args)]

    def __call__(self, name: str, *args, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, *args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def console(tmp_path_factory) -> Console:
    return Console(tmp_path_factory.mktemp('bin'))
