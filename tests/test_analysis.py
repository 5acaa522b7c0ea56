"End-to-end checks of multitask_abn.analysis: run loading, plots, papermill sweeps, the report and its console scripts."
import json
from html import escape
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from multitask_abn.analysis import (GRID_LEGEND, PUBLISHED_RESULTS, README_IMAGE_BYTES, README_IMAGES, load_runs,
                                    plot_attribute_metric, plot_branches, plot_published_comparison, plot_run_comparison,
                                    plot_run_delta, plot_training_curves, run_sweep, write_readme_images,
                                    write_report)
from multitask_abn.data import CELEBA_ATTRIBUTES, MtabnError
from helpers import write_fake_run

T = len(CELEBA_ATTRIBUTES)
PROJECT = Path(__file__).resolve().parent.parent
TRAIN_NOTEBOOK = PROJECT / 'nbs' / 'train_run.ipynb'
REPORT_SECTIONS = ('Runs', 'Headline metrics', 'Per-attribute metrics', 'Training curves', 'Published results',
                   'Explanations', 'Problems')


@pytest.fixture(scope='module')
def run_dirs(tmp_path_factory):
    "Two ABN runs (valid + test) and a baseline without attention branch (test only)."
    root = tmp_path_factory.mktemp('runs')
    return [write_fake_run(root / 'abn_a', seed=1, skill=0.7),
            write_fake_run(root / 'abn_b', seed=2, skill=0.85, epochs=4, recipe='recommended'),
            write_fake_run(root / 'base', model='resnet18', seed=3, attention=False, splits=('test',))]


def test_load_runs_tables(run_dirs):
    runs = load_runs(run_dirs)
    assert runs.names == ['abn_a', 'abn_b', 'base'] and runs.problems == []
    config = runs.config.set_index('run')
    assert config.loc['abn_b', 'recipe'] == 'recommended' and config.loc['base', 'model'] == 'resnet18'
    assert config.loc['abn_a', 'path'] == str(run_dirs[0])
    assert runs.epochs.groupby('run').epoch.max().to_dict() == {'abn_a': 3, 'abn_b': 4, 'base': 3}
    lines = [json.loads(l) for l in (run_dirs[1] / 'metrics.jsonl').read_text().splitlines()]
    assert list(runs.epochs[runs.epochs.run == 'abn_b'].train_loss) == [l['train_loss'] for l in lines]
    assert sorted(runs.summary[['run', 'split']].itertuples(index=False, name=None)) == [
        ('abn_a', 'test'), ('abn_a', 'valid'), ('abn_b', 'test'), ('abn_b', 'valid'), ('base', 'test')]
    sizes = runs.per_attribute.groupby(['run', 'split', 'branch']).size()
    assert set(sizes) == {T} and len(sizes) == 2 * 2 + 2 * 2 + 1
    csv = pd.read_csv(run_dirs[0] / 'eval' / 'test' / 'per_attribute.csv')
    ours = runs.per_attribute.query("run == 'abn_a' and split == 'test'").drop(columns=['run', 'split'])
    pd.testing.assert_frame_equal(ours[csv.columns].reset_index(drop=True), csv)
    summary = runs.summary.set_index(['run', 'split'])
    assert summary.loc[('abn_a', 'test'), 'mean_accuracy'] == pytest.approx(csv[csv.branch == 'perception'].accuracy.mean())
    assert pd.isna(summary.loc[('base', 'test'), 'attention_mean_accuracy'])


def test_broken_runs_are_reported_and_skipped(run_dirs, tmp_path):
    (tmp_path / 'bad_config').mkdir()
    (tmp_path / 'bad_config' / 'config.json').write_text('{"model": ')
    killed = write_fake_run(tmp_path / 'killed', splits=())
    with open(killed / 'metrics.jsonl', 'a') as f: f.write('{"epoch": 4, "tra')
    no_summary = write_fake_run(tmp_path / 'no_summary', splits=('test',))
    (no_summary / 'eval' / 'test' / 'summary.json').unlink()
    with pytest.warns(UserWarning):
        runs = load_runs([run_dirs[0], tmp_path / 'bad_config', killed, no_summary, tmp_path / 'nowhere'])
    assert runs.names == ['abn_a', 'killed', 'no_summary']
    assert len(runs.problems) == 5
    for expected in ('bad_config/config.json: not valid JSON', 'killed/metrics.jsonl:4:', 'killed/eval: no evaluation',
                     'no_summary/eval/test/summary.json: missing', 'nowhere: no run folder'):
        assert any(expected in p for p in runs.problems), expected
    assert len(runs.epochs[runs.epochs.run == 'killed']) == 3
    assert set(runs.summary.run) == {'abn_a'}
    assert len(runs.per_attribute[runs.per_attribute.run == 'no_summary']) == 2 * T  # both branches


@pytest.mark.parametrize('metric', ['accuracy', 'balanced_accuracy', 'f1'])
def test_attribute_metric_plot(run_dirs, metric):
    runs = load_runs(run_dirs)
    ax = plot_attribute_metric(runs, metric, run='abn_b').axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    expected = runs.per_attribute.query("run == 'abn_b' and split == 'test' and branch == 'perception'")[metric]
    assert widths == sorted(expected)
    assert [len(c.get_offsets()) for c in ax.collections] == [T, T]  # baseline ticks, positive-frequency dots


def test_comparison_plots(run_dirs):
    runs = load_runs(run_dirs)
    dots = plot_run_comparison(runs, metric='f1').axes[0]
    assert [len(c.get_offsets()) for c in dots.collections[1:]] == [T, T, T]
    assert len(plot_run_comparison(runs, ['abn_a', 'base'], kind='bar').axes[0].patches) == 2 * T
    delta = plot_run_delta(runs, 'abn_a', 'abn_b', 'balanced_accuracy').axes[0]
    tests = runs.per_attribute.query("split == 'test' and branch == 'perception'").pivot(index='attribute', columns='run')
    expected = tests.balanced_accuracy.abn_b - tests.balanced_accuracy.abn_a
    assert sorted(bar.get_width() for bar in delta.patches) == pytest.approx(sorted(expected))
    branches = plot_branches(runs, 'abn_a', split='valid').axes[0]
    assert [len(c.get_offsets()) for c in branches.collections[1:]] == [T, T]
    with pytest.raises(MtabnError, match='no attention-branch'): plot_branches(runs, 'base')


def test_training_curves_and_published(run_dirs, tmp_path):
    runs = load_runs(run_dirs)
    curves = plot_training_curves(runs, ['abn_a'])
    assert [len(ax.lines) for ax in curves.axes] == [2, 3, 1]
    curves.canvas.draw()
    assert all(float(tick).is_integer() for ax in curves.axes for tick in ax.get_xticks())  # whole epochs only
    lr_labels = [t.get_text() for t in curves.axes[2].get_yticklabels() if t.get_text()]
    assert lr_labels and all(label.replace('.', '').isdigit() for label in lr_labels)  # 0.01, not 10^-2
    assert len(plot_published_comparison(runs).axes[0].patches) == len(PUBLISHED_RESULTS)
    celeba = tmp_path / 'CelebA'
    celeba.mkdir()
    (celeba / 'list_attr_celeba.txt').touch()
    synth = tmp_path / 'synth'
    synth.mkdir()
    (synth / 'list_attr_celeba.txt').touch()
    (synth / 'synth_parts.csv').touch()
    real = load_runs([write_fake_run(tmp_path / 'real', data=celeba), write_fake_run(tmp_path / 'fake', data=synth)])
    assert real.config.set_index('run').data_kind.to_dict() == {'real': 'celeba', 'fake': 'synth'}
    ax = plot_published_comparison(real).axes[0]
    assert len(ax.patches) == len(PUBLISHED_RESULTS) + 1
    ours = real.summary.set_index(['run', 'split']).loc[('real', 'test'), 'mean_accuracy'] * 100
    assert any(bar.get_width() == pytest.approx(ours) for bar in ax.patches)


def _write_toy_notebook(path: Path):
    "A parameterised notebook standing in for train_run.ipynb: logs each execution, fails on request, writes a summary."
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out = None\nvalue = 0\nfail_on = None\nlog = None", metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell(
            "import json, pathlib\n"
            "with open(log, 'a') as f: f.write(f'{value}\\n')\n"
            "if value == fail_on: raise RuntimeError(f'failing on purpose at value={value}')\n"
            "run = pathlib.Path(out); (run / 'eval' / 'test').mkdir(parents=True)\n"
            "(run / 'config.json').write_text(json.dumps({'model': 'toy', 'value': value}))\n"
            "(run / 'eval' / 'test' / 'summary.json').write_text(json.dumps({'mean_accuracy': value / 10}))")],
        metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbformat.write(nb, path)
    return path


def test_sweep_skips_finished_and_continues_after_failure(tmp_path):
    notebook, log = _write_toy_notebook(tmp_path / 'toy.ipynb'), tmp_path / 'executions.log'
    out = tmp_path / 'sweep'
    first = run_sweep({'value': [1, 2, 3]}, out, notebook, params={'fail_on': 2, 'log': str(log)}, verbose=False)
    assert list(first.status.status) == ['ran', 'failed', 'ran']
    assert 'RuntimeError: failing on purpose at value=2' in first.status.error[1]
    assert (out / 'notebooks' / 'value=2.ipynb').is_file()  # the failed notebook is kept to show the error
    assert sorted(first.runs.summary.mean_accuracy) == [0.1, 0.3]
    second = run_sweep({'value': [1, 2, 3]}, out, notebook, params={'log': str(log)}, verbose=False)
    assert list(second.status.status) == ['skipped', 'ran', 'skipped']
    assert log.read_text().split() == ['1', '2', '3', '2']
    assert sorted(second.runs.summary.mean_accuracy) == [0.1, 0.2, 0.3]
    assert list(pd.read_csv(out / 'sweep.csv').status) == ['skipped', 'ran', 'skipped']
    with pytest.raises(MtabnError, match="parameter 'epochs'"):
        run_sweep({'epochs': [1]}, out, notebook, verbose=False)
    with pytest.raises(MtabnError, match='not found'):
        run_sweep({'value': [1]}, out, tmp_path / 'missing.ipynb', verbose=False)


def test_report_has_every_section(run_dirs, tmp_path):
    examples = tmp_path / 'explained'
    write_fake_run(examples, seed=4)
    (examples / 'explain' / 'test' / 'attention_examples').mkdir(parents=True)
    from PIL import Image
    Image.new('RGB', (40, 16), 'red').save(examples / 'explain' / 'test' / 'attention_examples' / 'a.jpg')
    Image.new('RGB', (40, 16), 'blue').save(examples / 'explain' / 'test' / 'explanation_metrics.png')
    pd.DataFrame({'attribute': ['Smiling'], 'energy_inside_part': [0.61]}).to_csv(
        examples / 'explain' / 'test' / 'explanation_metrics.csv', index=False)
    pd.DataFrame({'image': ['000001.jpg'] * 2, 'attribute': ['Smiling', 'Bald']}).to_csv(
        examples / 'explain' / 'test' / 'explanation_records.csv', index=False)
    out = tmp_path / 'report'
    page = write_report([*run_dirs, examples, tmp_path / 'gone'], out)
    html, md = page.read_text(), (out / 'report.md').read_text()
    for section in REPORT_SECTIONS:
        assert f'<h2>{section}</h2>' in html and f'\n## {section}\n' in md, section
    figures = sorted((out / 'figures').iterdir())
    assert html.count('src="data:image/png;base64,') == len(figures) - 1  # the example JPEG stays a JPEG
    assert html.count('src="data:image/jpeg;base64,') == 1 and 'energy_inside_part' in md
    assert 'explained, further tables: `explain/test/explanation_records.csv`' in md and '000001.jpg' not in md
    # Summary first (metrics figure, then table), then the legend and the example grids.
    order = [md.index(s) for s in ('explain/test/explanation_metrics.png', 'energy_inside_part', GRID_LEGEND[:40],
                                   'explain/test/attention_examples/a.jpg')]
    assert order == sorted(order)
    # Numbers right-aligned, text left-aligned: the published table's accuracy cells, not its sources.
    moon = escape(PUBLISHED_RESULTS.set_index('system').source['MOON'])
    assert '<td class="number">90.87</td>' in html and f'<td>{moon}</td>' in html and 'ECCV 2016' in moon
    assert all(f'](figures/{f.name})' in md for f in figures)
    assert 'gone: no run folder here' in md
    for name in ('abn_a', 'abn_b', 'base', 'explained'): assert f'| {name} |' in md or f' {name} ' in md
    bare = write_report(run_dirs[2], tmp_path / 'bare').read_text()
    assert 'No explanation outputs found' in bare and 'None: every file that was looked for was read' in bare


def test_readme_images(run_dirs, tmp_path):
    from PIL import Image
    explained = write_fake_run(tmp_path / 'explained', seed=5)
    grids = explained / 'explain' / 'test' / 'attention_examples'
    grids.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 255, (600, 1200, 3), dtype=np.uint8)  # incompressible: must shrink
    Image.fromarray(noise).save(grids / '000002.jpg', quality=95)
    Image.new('RGB', (80, 40), 'red').save(grids / '000009.jpg')
    out = tmp_path / 'images'
    written = write_readme_images(explained, out)
    assert [p.name for p in written] == list(README_IMAGES)
    assert sorted(p.name for p in out.iterdir()) == sorted(README_IMAGES)
    assert all(p.stat().st_size <= README_IMAGE_BYTES for p in written)
    grid = Image.open(out / 'attention_grid.png')
    assert grid.mode == 'P' and 200 < grid.width < 1200  # the first grid (000002), shrunk into the budget
    assert Image.open(out / 'per_attribute_accuracy.png').size == (600, round(80 * (1.5 + 0.22 * T)))
    baseline = write_readme_images(run_dirs[2], out)  # no attention branch, no explain outputs
    assert sorted(p.name for p in baseline) == sorted(p.name for p in out.iterdir()) == [
        'per_attribute_accuracy.png', 'training_curves.png']
    unevaluated = write_fake_run(tmp_path / 'unevaluated', splits=())
    with pytest.raises(MtabnError, match='evaluate the run first'): write_readme_images(unevaluated, out)
    with pytest.raises(MtabnError, match='expected one run folder'): write_readme_images(tmp_path, out)


def test_mtabn_report_cli(run_dirs, console, tmp_path, capsys):
    out = tmp_path / 'r'
    done = console('mtabn_report', run_dirs[2], tmp_path / 'missing', '--out', out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / 'report.html') and (out / 'report.md').is_file()
    assert 'missing: no run folder here' in (out / 'report.md').read_text()
    from multitask_abn.cli import mtabn_report  # the error path in-process: one interpreter start is enough
    with pytest.raises(SystemExit) as exit_info: mtabn_report([str(tmp_path / 'nothing')], out=str(tmp_path / 'r2'))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('mtabn_report: error: no readable run folder') and len(err.splitlines()) == 1


def test_mtabn_sweep_cli(console, tmp_path):
    notebook, log = _write_toy_notebook(tmp_path / 'toy.ipynb'), tmp_path / 'log'
    done = console('mtabn_sweep', '{"value": [1, 2]}', '--out', tmp_path / 's', '--notebook', notebook,
                   '--param', f'log={log}', 'fail_on=2')
    assert done.returncode == 1, done.stderr
    assert 'failed' in done.stdout and 'value=2' in done.stdout
    assert log.read_text().split() == ['1', '2']  # the failure did not stop the sweep


def test_sweep_reads_named_data_from_the_callers_folder_and_never_generates_it(tmp_path, monkeypatch):
    """`--param data=data/celeba` is the caller's data/celeba, though the notebook runs in nbs/; a named folder without
    CelebA annotations stops the run with the reader's error naming it: no SynthCelebA is generated in its place."""
    monkeypatch.chdir(tmp_path)
    sweep = run_sweep({'epochs': [1]}, 'sweep', TRAIN_NOTEBOOK, params={'data': 'data/celeba'}, verbose=False)
    assert list(sweep.status.status) == ['failed']
    assert f"CelebA folder not found: {tmp_path / 'data' / 'celeba'}" in sweep.status.error[0]
    assert not (tmp_path / 'data').exists() and not (TRAIN_NOTEBOOK.parent / 'data' / 'celeba').exists()
    assert (tmp_path / 'sweep' / 'sweep.csv').is_file()   # out_dir, relative too, is the caller's


@pytest.mark.slow
def test_sweep_trains_on_synth_celeba(tmp_path):
    from multitask_abn.synth import make_synth_celeba
    make_synth_celeba(tmp_path / 'synth', n=48, seed=0)
    grid = {'model': ['resnet10', 'abn_v1_resnet10']}
    sweep = run_sweep(grid, tmp_path / 'sweep', params=dict(recipe='demo', data=str(tmp_path / 'synth'), epochs=1, image_size=32),
                      report=True, verbose=False)
    assert list(sweep.status.status) == ['ran', 'ran'], sweep.status.error.tolist()
    runs = sweep.runs
    assert sorted(runs.config.model) == sorted(grid['model']) and set(runs.config.data_kind) == {'synth'}
    assert len(runs.per_attribute.query("run == 'model=resnet10'").branch.unique()) == 1
    attention_rows = len(runs.per_attribute.query("run == 'model=abn_v1_resnet10' and branch == 'attention'"))
    assert attention_rows > 0 and attention_rows % T == 0
    assert (tmp_path / 'sweep' / 'report' / 'report.html').is_file()
    again = run_sweep(grid, tmp_path / 'sweep', params=dict(recipe='demo', data=str(tmp_path / 'synth'), epochs=1, image_size=32), verbose=False)
    assert list(again.status.status) == ['skipped', 'skipped']


def test_report_shows_the_explanation_table_beside_its_baselines(tmp_path):
    "Where explain_run wrote its headline table, the report shows it (with the baselines' legend) instead of the wide metrics CSV."
    from multitask_abn.analysis import EXPLANATION_TABLE_LEGEND
    run = tmp_path / 'explained'
    write_fake_run(run, seed=5)
    folder = run / 'explain' / 'valid'
    folder.mkdir(parents=True)
    pd.DataFrame({'method': ['attention', 'prior'], 'pointing_game': ['0.812 [0.770, 0.850]', '0.213 [0.180, 0.250]'],
                  'pointing_game vs prior': ['+0.599 [0.540, 0.650]', '']}).to_csv(folder / 'explanation_table.csv', index=False)
    pd.DataFrame({'method': ['attention'], 'attribute': ['Smiling'], 'wide_column_only_in_metrics': [0.5]}).to_csv(
        folder / 'explanation_metrics.csv', index=False)
    md = (write_report([run], tmp_path / 'report').parent / 'report.md').read_text()
    assert '+0.599 [0.540, 0.650]' in md and EXPLANATION_TABLE_LEGEND[:60] in md and '(split `valid`)' in md
    assert 'wide_column_only_in_metrics' not in md and '`explain/valid/explanation_metrics.csv`' in md
