"""The workbook in a real browser (headless Chromium through Playwright): JupyterLab runs a notebook, the attention
browser answers a click and the attention editor saves a stroke painted with the mouse; the documentation site's pages
load with their figures and without broken links.
Screenshots go to $MTABN_SCREENSHOTS (default: mtabn-browser-screenshots/ in the system's temporary folder)."""
import functools
import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from multitask_abn.edit import load_edits
from multitask_abn.explore import BRUSH_RADIUS
from multitask_abn.workbook import build_docs, record_notebook, site_problems

pytestmark = pytest.mark.browser
PROJECT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
NOTEBOOK = '11_explore.ipynb'   # the widgets themselves, on its untrained stand-in when no demo run is there


@pytest.fixture(scope='module')
def browser():
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (make install installs it)')
    if CHROMIUM is None: pytest.skip("no Chromium on this machine: `make browser` installs Debian's chromium package (as root)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        yield chromium
        chromium.close()


@pytest.fixture(scope='module')
def screenshots() -> Path:
    "Kept after the run, passed or not (pytest deletes the temporary folders of passing tests)."
    folder = Path(os.environ.get('MTABN_SCREENSHOTS') or Path(tempfile.gettempdir())/'mtabn-browser-screenshots')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try: return urllib.request.urlopen(url, timeout=5)
        except OSError: time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture
def lab(tmp_path):
    "JupyterLab on a free loopback port, serving a copy of the notebook; yields its URL (token included)."
    shutil.copy(PROJECT/'nbs'/NOTEBOOK, tmp_path/NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, **{name: str(tmp_path/folder) for name, folder in (
        ('JUPYTER_CONFIG_DIR', 'config'), ('JUPYTER_RUNTIME_DIR', 'runtime'), ('JUPYTERLAB_SETTINGS_DIR', 'settings'),
        ('JUPYTERLAB_WORKSPACES_DIR', 'workspaces'))}}
    with open(tmp_path/'lab.log', 'w') as log:
        server = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
                                   f'--ServerApp.port={port}', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}'],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(f'http://127.0.0.1:{port}/api/status?token={token}').close()
            yield f'http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}'
        finally:
            server.terminate()
            server.wait(timeout=30)


ALL_CELLS_RUN = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
  return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p));
}"""


def run_all_cells(browser, lab: str, screenshot: Path):
    "A page on `lab`'s notebook after JupyterLab's Run All, checked: every cell ran, no output is a traceback."
    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    page.goto(lab)
    page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=90_000)
    page.get_by_text('Python 3 (ipykernel) | Idle').wait_for(timeout=90_000)         # the status bar: the kernel is up
    news = page.locator('.jp-toast-button', has_text='No')                          # JupyterLab's news question, in the way
    if news.count(): news.first.click()
    page.locator('.lm-MenuBar-item', has_text='Run').first.click()
    page.locator('.lm-Menu-item', has_text='Run All Cells').first.click()
    try: page.wait_for_function(ALL_CELLS_RUN, timeout=240_000)
    finally: page.screenshot(path=str(screenshot))
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text='Traceback')
    assert errors.count() == 0, errors.first.inner_text()[:2000]
    return page


def test_jupyterlab_runs_the_explore_notebook_and_the_attention_browser_answers(browser, lab, screenshots):
    page = run_all_cells(browser, lab, screenshots/'lab_after_run_all.png')
    images = page.locator('.jp-OutputArea-output img')
    page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output img')].every(i => i.complete)")
    sizes = images.evaluate_all('images => images.map(i => i.naturalWidth)')
    assert len(sizes) >= 3 and all(width > 0 for width in sizes), sizes    # browser, gallery and results pictures drawn

    attribute = page.locator('.widget-dropdown', has=page.locator('option', has_text='all 40')).locator('select').first
    picture = page.locator('.widget-vbox', has=attribute).locator('.widget-image').first
    attribute.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)                                                      # JupyterLab redraws what scrolls in
    page.screenshot(path=str(screenshots/'lab_attention_browser_all40.png'))
    before = picture.get_attribute('src')
    attribute.select_option(label='Smiling')
    page.wait_for_function('([img, old]) => img.src !== old && img.complete && img.naturalWidth > 0',
                           arg=[picture.element_handle(), before], timeout=30_000)
    assert picture.evaluate('img => img.naturalWidth') < sizes[0]          # one large panel instead of the 40-panel grid
    attribute.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(screenshots/'lab_attention_browser_smiling.png'))
    print(f"screenshots in {screenshots}")


def test_the_attention_editor_saves_a_stroke_painted_with_the_mouse_and_answers_what_if(browser, lab, screenshots):
    page = run_all_cells(browser, lab, screenshots/'lab_editor_after_run_all.png')
    editor = page.locator('.mtabn-editor').first
    canvas = editor.locator('canvas.mtabn-edit-canvas')
    canvas.scroll_into_view_if_needed()
    page.wait_for_function('canvas => canvas.width > 0', arg=canvas.element_handle(), timeout=30_000)   # the picture is drawn
    width, height = canvas.evaluate('canvas => [canvas.width, canvas.height]')       # the image's own resolution
    box = canvas.bounding_box()
    row, (left, right) = 0.45, (0.3, 0.7)                                            # a stroke across the face, in fractions
    page.mouse.move(box['x'] + left * box['width'], box['y'] + row * box['height'])
    page.mouse.down()
    page.mouse.move(box['x'] + right * box['width'], box['y'] + row * box['height'], steps=12)
    page.mouse.up()
    editor.locator('button', has_text='save').click()
    status = editor.locator('.mtabn-editor-status')
    status.get_by_text('saved').wait_for(timeout=30_000)
    saved = Path(re.search(r'saved (\S+\.png)', status.inner_text())[1])
    editor.locator('button', has_text='what if').click()
    editor.locator('.mtabn-editor-answer').get_by_text('looking where painted').wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(screenshots/'lab_attention_editor.png'))

    (edit,) = [e for e in load_edits(saved.parent) if e.file == saved]              # a valid edit file, listed in edits.csv
    assert edit.target.shape == (height, width), edit.target.shape
    y, x0, x1 = int(row * height), int(left * width), int(right * width)
    assert edit.target[y, x0:x1 + 1].min() == 1                                      # painted along the stroke...
    beyond = np.ones_like(edit.target, bool)
    beyond[y - BRUSH_RADIUS - 2:y + BRUSH_RADIUS + 3, x0 - BRUSH_RADIUS - 2:x1 + BRUSH_RADIUS + 3] = False
    assert edit.target[beyond].max() == 0                                            # ...and nowhere else
    print(f"edit {saved}; screenshots in {screenshots}")


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    "The docs site of the notebooks, one of them (11_explore) recorded first so that its page has figures."
    folder = tmp_path_factory.mktemp('docs')
    nbs = folder/'nbs'
    shutil.copytree(PROJECT/'nbs', nbs, ignore=shutil.ignore_patterns('_*', '.*'))
    record_notebook(nbs/NOTEBOOK)
    return build_docs(folder/'site', nbs, folder/'stage')


@pytest.fixture(scope='module')
def served(site):
    "The site over HTTP on a free loopback port."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_every_docs_page_loads_with_its_figures_and_no_broken_links(browser, site, served, screenshots):
    assert site_problems(site) == []
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html') if p.name != '404.html')
    expected = {'index.html', f"{NOTEBOOK[:-6]}.html", 'api/explore.html', *(f"{nb.stem}.html" for nb in (PROJECT/'nbs').glob('*.ipynb'))}
    assert expected <= set(pages), expected - set(pages)
    page, failed = browser.new_page(viewport={'width': 1400, 'height': 1000}), []
    # a link that is broken answers 404; a request cut off because the test moves on to the next page (net::ERR_ABORTED,
    # e.g. the favicon on a slow machine) is not a broken link
    page.on('response', lambda response: failed.append(response.url) if response.url.startswith(served) and response.status >= 400 else None)
    page.on('requestfailed', lambda request: failed.append(request.url)
            if request.url.startswith(served) and 'ERR_ABORTED' not in (request.failure or '') else None)
    for name in pages:
        response = page.goto(f'{served}/{name}')
        assert response.status == 200, name
        page.wait_for_load_state('load')
        assert page.locator('article').count() == 1, f"{name}: no page content"
        broken = page.locator('article img').evaluate_all('images => images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))')
        assert broken == [], f"{name}: images that did not load: {broken}"
        if name in ('index.html', f"{NOTEBOOK[:-6]}.html", 'api/explore.html'):
            if name == f"{NOTEBOOK[:-6]}.html": page.locator('article img').first.scroll_into_view_if_needed()
            page.screenshot(path=str(screenshots/f"docs_{name.replace('/', '_').replace('.html', '')}.png"), full_page=False)
    assert failed == []
    page.goto(f"{served}/{NOTEBOOK[:-6]}.html")
    figures = page.locator('article img').evaluate_all('images => images.filter(i => i.naturalWidth > 0).length')
    assert figures >= 3, f"the recorded {NOTEBOOK} page shows {figures} figures"
    page.locator('nav a[href$="06_analysis.html"]').first.click()                    # the navigation leads to the others
    page.wait_for_url(f'{served}/06_analysis.html')
    print(f"screenshots in {screenshots}")
