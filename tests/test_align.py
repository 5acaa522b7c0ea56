"Face detection and alignment for photos (`multitask_abn.align`) through `predict` and `mtabn_predict`."
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from multitask_abn.align import DETECTOR_INSTALL, align_photo, load_detector
from multitask_abn.data import ALIGNED_SIZE, CELEBA_ATTRIBUTES, MtabnError
from multitask_abn.explain import DETECTION_COLUMNS, SCORE_SUFFIX, predict
from multitask_abn.models import create_model, save_model

PREDICTION_COLUMNS = [*CELEBA_ATTRIBUTES, *(a + SCORE_SUFFIX for a in CELEBA_ATTRIBUTES)]   # decisions, then scores


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(create_model('abn_v1_resnet10'), tmp_path_factory.mktemp('ckpt')/'abn.pt', config={'transform': 'eval', 'image_size': 32})


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    "The astronaut (one face), two astronauts side by side (two faces), a grey card (no face)."
    from skimage import data
    folder = tmp_path_factory.mktemp('photos')
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder/'astronaut.png')
    Image.fromarray(np.concatenate([astronaut, astronaut], 1)).save(folder/'pair.png')
    Image.new('RGB', (300, 200), 'gray').save(folder/'card.png')
    return folder


def test_mtabn_predict_aligns_each_face_by_default(console, checkpoint, photos, tmp_path):
    result = console('mtabn_predict', '--checkpoint', checkpoint, photos, '--out', tmp_path/'out')
    assert result.returncode == 0, result.stderr
    assert 'aligning faces with MTCNN' in result.stderr and 'default when a detector is installed' in result.stderr
    assert f"no face found in {photos/'card.png'}: skipped" in result.stderr and 'Traceback' not in result.stderr
    table = pd.read_csv(tmp_path/'out'/'predictions.csv')
    assert list(table.columns) == ['path', *DETECTION_COLUMNS, *PREDICTION_COLUMNS]
    assert [Path(p).name for p in table.path] == ['astronaut.png', 'pair.png', 'pair.png'] and table.face.tolist() == [0, 0, 1]
    single, *pair = table.to_dict('records')
    assert sorted(abs(face['box_x'] - single['box_x']) for face in pair) == pytest.approx([0, 512], abs=2)   # the same face, 512 px apart
    assert all(face['detection_score'] > 0.99 for face in table.to_dict('records'))
    assert sorted(p.name for p in (tmp_path/'out'/'attention').iterdir()) == ['astronaut.jpg', 'pair_face0.jpg', 'pair_face1.jpg']
    assert result.stdout.strip().startswith('3 faces ->')


def test_the_prediction_is_the_aligned_crops(checkpoint, photos, tmp_path):
    "Predicting on a photo with alignment equals predicting on its aligned crop without it."
    crop = align_photo(Image.open(photos/'astronaut.png'), load_detector())[0].crop
    assert crop.size == ALIGNED_SIZE
    crop.save(tmp_path/'crop.png')
    aligned = predict(checkpoint, [photos/'astronaut.png'], tmp_path/'a', align=True, report=lambda m: None)
    direct = predict(checkpoint, [tmp_path/'crop.png'], tmp_path/'b', align=False, report=lambda m: None)
    assert list(direct.columns) == ['path', *PREDICTION_COLUMNS]
    np.testing.assert_allclose(aligned[PREDICTION_COLUMNS].to_numpy(), direct[PREDICTION_COLUMNS].to_numpy(), atol=1e-6)


def test_no_align_predicts_on_whole_images(console, checkpoint, photos, tmp_path):
    result = console('mtabn_predict', '--checkpoint', checkpoint, photos, '--out', tmp_path/'out', '--no-align')
    assert result.returncode == 0 and 'aligning' not in result.stderr, result.stderr
    table = pd.read_csv(tmp_path/'out'/'predictions.csv')
    assert list(table.columns) == ['path', *PREDICTION_COLUMNS] and len(table) == 3
    both = console('mtabn_predict', '--checkpoint', checkpoint, photos, '--out', tmp_path/'out2', '--align', '--no-align')
    assert both.returncode == 2 and both.stderr.strip() == 'mtabn_predict: error: --align and --no-align both given: choose one'


def test_a_missing_detector_is_named_with_its_install_command(checkpoint, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'facenet_pytorch', None)           # as if it were not installed
    with pytest.raises(MtabnError, match='no face detector: install one with') as error:
        predict(checkpoint, [photos/'astronaut.png'], tmp_path/'a', align=True)
    assert DETECTOR_INSTALL in str(error.value) and '--no-align' in str(error.value)
    notes = []
    table = predict(checkpoint, [photos/'astronaut.png'], tmp_path/'b', report=notes.append)   # the default: whole images
    assert len(table) == 1 and 'face' not in table.columns
    assert notes[0].startswith('note: no face detector installed') and DETECTOR_INSTALL in notes[0]


def test_mtabn_predict_align_on_wild_synth_faces(console, checkpoint, tmp_path):
    from multitask_abn.synth import make_synth_celeba
    wild = make_synth_celeba(tmp_path/'wild', n=8, seed=0, layout='wild', progress=False)
    result = console('mtabn_predict', '--checkpoint', checkpoint, wild/'img_align_celeba', '--out', tmp_path/'out', '--align')
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path/'out'/'predictions.csv')
    named = [line for line in result.stderr.splitlines() if 'no face found in' in line]
    assert table.path.nunique() + len(named) == 8 and table.path.nunique() >= 4       # every image: rows, or one line saying why not
    assert table.detection_score.between(0, 1).all() and (table.box_width > 0).all()
