"End-to-end checks of the data layer through its public API and the `mtabn_verify` console script."
import json
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from multitask_abn.data import (CELEBA_ATTRIBUTES, IMAGE_DIR, PARTITION_FILE, ATTRIBUTE_FILE, CelebA, CelebADataset,
                                get_transform, write_celeba_annotations)


@pytest.fixture
def celeba(tmp_path):
    "A 9-image folder in CelebA's layout, labels known (image i has attribute i % 40)."
    rng = np.random.default_rng(1)
    root = tmp_path/'celeba'
    (root/IMAGE_DIR).mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 10)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root/IMAGE_DIR/name)
    labels = np.zeros((9, 40), int); labels[np.arange(9), np.arange(9)] = 1
    write_celeba_annotations(root, names, labels, [0, 0, 0, 0, 0, 1, 1, 2, 2], rng.integers(0, 178, (9, 10)))
    return root




def test_verify_prints_summary(console, celeba):
    result = console('mtabn_verify', celeba.parent)  # torchvision's layout: the parent of celeba/
    assert result.returncode == 0, result.stderr
    assert '9 images, all present' in result.stdout
    assert 'train' in result.stdout and 'Young' in result.stdout


@pytest.mark.parametrize('break_it, message', [
    (lambda r: (r/PARTITION_FILE).unlink(), 'list_eval_partition.txt not found'),
    (lambda r: (r/IMAGE_DIR/'000004.jpg').unlink(), '000004.jpg not found'),
    (lambda r: (r/ATTRIBUTE_FILE).write_text((r/ATTRIBUTE_FILE).read_text().replace(' 1 -1', ' 2 -1', 1)), "line 3: label '2'"),
    (lambda r: (r/ATTRIBUTE_FILE).write_bytes(bytes(range(128, 256)) * 8), f"{ATTRIBUTE_FILE}, line 1: byte 0x80 is not text"),
])
def test_verify_names_the_problem(console, celeba, break_it, message):
    break_it(celeba)
    result = console('mtabn_verify', celeba)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('mtabn_verify: error: ') and message in lines[0], result.stderr


def test_dataset_through_workers_keeps_order_and_labels(celeba):
    ds = CelebADataset(celeba, 'train', get_transform('recommended', 32, train=True), return_landmarks=True)
    images, labels, landmarks = next(iter(DataLoader(ds, batch_size=5, num_workers=2)))
    assert images.shape == (5, 3, 32, 32) and landmarks.shape == (5, 10)
    assert torch.equal(labels.argmax(1), torch.arange(5))
    assert torch.equal(labels, torch.tensor(CelebA(celeba).attributes.iloc[:5].to_numpy(), dtype=torch.float32))
    assert list(CelebA(celeba).attributes.columns) == list(CELEBA_ATTRIBUTES)


def test_verify_names_every_bad_image_without_decoding(console, celeba):
    (celeba/IMAGE_DIR/'000002.jpg').write_bytes(b'')
    (celeba/IMAGE_DIR/'000007.jpg').write_text('<html>quota exceeded</html>')
    result = console('mtabn_verify', celeba)
    assert result.returncode == 2
    *named, error = result.stderr.strip().splitlines()
    assert [line.split(':')[0] for line in named] == [str(celeba/IMAGE_DIR/'000002.jpg'), str(celeba/IMAGE_DIR/'000007.jpg')]
    assert all(line.endswith(f'replace it with the original from {IMAGE_DIR}.zip') for line in named), named
    assert error.startswith('mtabn_verify: error: ') and '2 of 9 listed images are bad' in error, error


# --- the other layouts users have: Kaggle's CSV copy, the in-the-wild photos -------------------------------------

def republish(synth_root, out, layout):
    "A SynthCelebA folder rewritten in `layout` ('kaggle': CSV files, nested images; 'wild': img_celeba/ + list_landmarks_celeba.txt)."
    import shutil
    from multitask_abn.data import CELEBA_LAYOUTS
    source = CelebA(synth_root)
    images = out/CELEBA_LAYOUTS[layout]['images']
    images.mkdir(parents=True)
    for name in source.attributes.index: shutil.copy(source.image_dir/name, images/name)
    write_celeba_annotations(out, source.attributes.index, source.attributes.to_numpy(), source.partition.to_numpy(),
                             source.landmarks.to_numpy(), source.bboxes.to_numpy(), layout=layout, crlf=True)
    return out


@pytest.fixture(scope='module')
def synth_pair(tmp_path_factory):
    "The same 24 SynthCelebA faces drawn in the aligned and in the wild layout."
    from multitask_abn.synth import make_synth_celeba
    root = tmp_path_factory.mktemp('pair')
    return (make_synth_celeba(root/'aligned', n=24, seed=3, progress=False),
            make_synth_celeba(root/'wild', n=24, seed=3, layout='wild', progress=False))


def test_kaggle_layout_trains_and_evaluates_like_the_official_one(console, synth_pair, tmp_path):
    from multitask_abn.train import make_config, train
    official = synth_pair[0]
    kaggle = republish(official, tmp_path/'kaggle', 'kaggle')
    verified = console('mtabn_verify', kaggle)
    assert verified.returncode == 0, verified.stderr
    assert 'layout: kaggle, images in img_align_celeba/img_align_celeba/' in verified.stdout
    assert 'list_landmarks_align_celeba.csv, list_bbox_celeba.csv' in verified.stdout
    settings = dict(image_size=32, batch_size=8, epochs=1, eval_batch_size=32, progress=False, precision='bf16')   # 'auto' probes each run
    runs = [train(make_config('demo', data=str(folder), **settings), tmp_path/name) for folder, name in ((official, 'a'), (kaggle, 'b'))]
    logs = [[{k: v for k, v in json.loads(line).items() if 'time' not in k and 'second' not in k}
             for line in (run/'metrics.jsonl').read_text().splitlines()] for run in runs]
    assert logs[0] == logs[1]                                   # the same data, read from either layout
    evaluated = console('mtabn_eval', runs[1], '--data', kaggle, '--split', 'test', '--quiet')
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((runs[1]/'eval'/'test'/'summary.json').read_text())['num_images'] == len(CelebA(kaggle).split_index('test'))
    (kaggle/'list_attr_celeba.csv').write_bytes((kaggle/'list_attr_celeba.csv').read_bytes().replace(b'\r\n000002.jpg,', b'\r\n000002.jpg,0,', 1))
    broken = console('mtabn_verify', kaggle)
    assert broken.returncode == 2 and broken.stderr.count('\n') == 1
    assert f"{kaggle/'list_attr_celeba.csv'}, line 3: expected 41 fields (filename + 40 values), found 42" in broken.stderr


def test_wild_layout_is_aligned_like_the_aligned_crops(console, synth_pair, tmp_path):
    "The in-the-wild photos, aligned by their landmarks, put each face where the aligned layout draws the same face."
    import cv2
    from multitask_abn.data import similarity_transform
    from multitask_abn.synth import FACE_BOX_PARTS, PART_IDS, load_part_map
    aligned, wild_synth = synth_pair
    wild = republish(wild_synth, tmp_path/'wild', 'wild')
    verified = console('mtabn_verify', wild)
    assert verified.returncode == 0, verified.stderr
    assert 'layout: wild, images in img_celeba/ (in-the-wild photos, aligned on the fly by their landmarks)' in verified.stdout
    celeba = CelebA(wild)
    face_ids = [PART_IDS[p] for p in FACE_BOX_PARTS]
    overlaps = []
    for name in celeba.attributes.index:
        matrix = similarity_transform(celeba.source_landmarks.loc[name].to_numpy())
        warped = cv2.warpAffine(load_part_map(wild_synth, name), matrix, (178, 218), flags=cv2.INTER_NEAREST)
        a, b = np.isin(warped, face_ids), np.isin(load_part_map(aligned, name), face_ids)
        overlaps.append((a & b).sum() / (a | b).sum())
    assert np.median(overlaps) > 0.8, overlaps
    image, _ = CelebADataset(wild, 'all', get_transform('fukui2019', 64))[0]
    assert image.shape == (3, 64, 64)
    (wild/'list_landmarks_celeba.txt').unlink()
    missing = console('mtabn_verify', wild)
    assert missing.returncode == 2 and 'list_landmarks_celeba.txt not found: the wild layout needs' in missing.stderr
