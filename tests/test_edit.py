"Attention editing (multitask_abn.edit) from the command line: the shortcut set, mtabn_finetune, and its run folder downstream."
import json

import numpy as np
import pandas as pd
import pytest

from multitask_abn.data import CelebA
from multitask_abn.edit import load_edits, write_ground_truth_edits
from multitask_abn.synth import MARKER_FILE, SHIFTED_DIR, load_part_map, shortcut_mask
from multitask_abn.train import make_config, train


@pytest.fixture(scope='module')
def shortcut_set(tmp_path_factory, console):
    "A 60-image SynthCelebA folder with the badge planted for Smiling, written by the console script."
    out = tmp_path_factory.mktemp('data') / 'synth'
    result = console('mtabn_synth', out, '--n', 60, '--seed', 2, '--shortcut', 'Smiling:1:0')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"shortcut Smiling:1:0, shifted valid and test in {out}/shifted")
    return out


def test_shortcut_statistics(shortcut_set):
    "p = 1, q = 0: in train the badge is exactly Smiling; in the shifted folder exactly not Smiling; the marker says so."
    for root, split, expected in ((shortcut_set, 'train', True), (shortcut_set / SHIFTED_DIR, 'valid', False),
                                  (shortcut_set / SHIFTED_DIR, 'test', False)):
        celeba = CelebA(root)
        names = celeba.split_index(split)
        marked = np.array([shortcut_mask(load_part_map(root, n)).any() for n in names])
        smiling = celeba.attributes.loc[names, 'Smiling'].to_numpy().astype(bool)
        assert (marked == (smiling if expected else ~smiling)).all(), (root, split)
    assert json.loads((shortcut_set / MARKER_FILE).read_text())['shortcut'] == dict(attribute='Smiling', p=1.0, q=0.0, valid_test='unbiased')


def test_bad_shortcut_is_one_line(console, tmp_path):
    result = console('mtabn_synth', tmp_path / 'bad', '--n', 5, '--shortcut', 'Smiling:0.9')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == ["mtabn_synth: error: --shortcut 'Smiling:0.9': write ATTR:p:q, e.g. "
                                                  "Smiling:0.95:0.05 (p, q: shares of the train images with and without ATTR that show the badge)"]


@pytest.mark.slow
def test_finetune_writes_a_run_that_eval_and_resume_take(shortcut_set, console, tmp_path):
    base = train(make_config('demo', data=str(shortcut_set), image_size=32, epochs=1, batch_size=8, max_eval_images=4,
                             precision='fp32', progress=False), tmp_path / 'base')
    write_ground_truth_edits(shortcut_set, 'Smiling', 4, tmp_path / 'edits')
    result = console('mtabn_finetune', base, '--edits', tmp_path / 'edits', '--out', tmp_path / 'tuned', '--epochs', 2,
                     '--batch-size', 2, '--train-layers', 'attention+heads')
    assert result.returncode == 0, result.stderr
    tuned = tmp_path / 'tuned'
    assert json.loads((tuned / 'finetune.json').read_text())['pairs'] == 4
    evaluated = console('mtabn_eval', tuned, '--data', shortcut_set / SHIFTED_DIR, '--split', 'test', '--quiet')
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tuned / 'eval' / 'test' / 'summary.json').read_text())['num_images'] == len(CelebA(shortcut_set).split_index('test'))
    resumed = console('mtabn_train', '--out', tuned, '--resume', '--quiet')
    assert resumed.returncode == 0, resumed.stderr
    assert len((tuned / 'metrics.jsonl').read_text().splitlines()) == 3          # nothing was left to train
    # a bad edit: one line naming the file
    pd.DataFrame([dict(image='000001.jpg', attribute='Smiling', file='gone.png')]).to_csv(tmp_path / 'edits' / 'edits.csv', index=False)
    bad = console('mtabn_finetune', base, '--edits', tmp_path / 'edits', '--out', tmp_path / 'again')
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"mtabn_finetune: error: {tmp_path / 'edits' / 'gone.png'} (edits.csv line 2): file not found"]
    assert not (tmp_path / 'again').exists()


def test_counterfactuals_redraw_the_badge(shortcut_set):
    "explain's Counterfactuals redraw every image of a shortcut set (and of its shifted folder) byte for byte, badge included."
    import cv2
    from multitask_abn.data import get_transform
    from multitask_abn.explain import Counterfactuals
    from multitask_abn.synth import JPEG_QUALITY
    for root in (shortcut_set, shortcut_set / SHIFTED_DIR):
        counterfactuals = Counterfactuals(root, get_transform('eval', 64))
        for path in sorted((root / 'img_align_celeba').iterdir()):
            image = counterfactuals.draw(int(path.stem))[0]
            jpeg = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
            assert jpeg.tobytes() == path.read_bytes(), path
