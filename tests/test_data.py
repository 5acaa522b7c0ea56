"End-to-end checks of the data layer through its public API and the `mtabn_verify` console script."
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
