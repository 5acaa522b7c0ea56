"SynthCelebA (multitask_abn.synth): layout, determinism, part maps, label rules, frequencies, evidence, console script."
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask_abn.data import CELEBA_ATTRIBUTES, LANDMARK_COLUMNS, CelebA, MtabnError
from multitask_abn.synth import (ATTRIBUTE_PARTS, BEARDS, HAIR_COLOURS, HAIR_TEXTURES,
                                 MARKER_FILE, PART_DIR, PART_IDS, PART_NAMES, PART_TABLE, attribute_mask,
                                 compare_frequencies, evidence_table, load_part_map, make_synth_celeba,
                                 sample_attributes, synth_split_sizes)

N = 500


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    "One 500-image SynthCelebA folder shared by the tests of this module."
    return make_synth_celeba(tmp_path_factory.mktemp('synth') / 'celeba', n=N, seed=3)


@pytest.fixture(scope='module')
def celeba(synth): return CelebA(synth)


def folder_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    one = folder_bytes(make_synth_celeba(tmp_path / 'one', n=30, seed=11))
    two = folder_bytes(make_synth_celeba(tmp_path / 'two', n=30, seed=11, num_workers=2))
    assert len(one) == 2 * 30 + 6 and one == two          # images, part maps, 4 annotation files, part table, marker
    other = folder_bytes(make_synth_celeba(tmp_path / 'other', n=30, seed=12))
    jpgs = [p for p in one if p.suffix == '.jpg']
    assert all(one[p] != other[p] for p in jpgs)
    assert len({one[p] for p in jpgs}) == 30              # every image differs


def test_layout_and_headers(synth, celeba):
    names = [f"{i:06d}.jpg" for i in range(1, N + 1)]
    assert sorted(os.listdir(synth / 'img_align_celeba')) == names
    assert sorted(os.listdir(synth / PART_DIR)) == [n.replace('.jpg', '.png') for n in names]
    lines = (synth / 'list_attr_celeba.txt').read_text().splitlines()
    assert lines[0] == str(N) and lines[1].split() == list(CELEBA_ATTRIBUTES) and len(lines) == N + 2
    row = lines[2].split()
    assert row[0] == '000001.jpg' and len(row) == 41 and set(row[1:]) <= {'-1', '1'}
    marks = (synth / 'list_landmarks_align_celeba.txt').read_text().splitlines()
    assert marks[0] == str(N) and tuple(marks[1].split()) == LANDMARK_COLUMNS and len(marks) == N + 2
    partition = pd.read_csv(synth / 'list_eval_partition.txt', sep=' ', header=None, names=['image', 'split'])
    assert partition.image.tolist() == names
    train, valid, test = synth_split_sizes(N)
    assert partition.split.tolist() == [0] * train + [1] * valid + [2] * test      # contiguous like CelebA
    assert (train, valid, test) == (402, 49, 49)
    assert pd.read_csv(synth / PART_TABLE).to_dict('list') == {'part_id': list(range(len(PART_NAMES))), 'name': list(PART_NAMES)}
    assert celeba.attributes.index.tolist() == names and len(celeba.landmarks) == N
    with Image.open(synth / 'img_align_celeba' / '000007.jpg') as image:
        assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (178, 218))
    part_map = load_part_map(synth, '000007.jpg')
    assert part_map.shape == (218, 178) and part_map.dtype == np.uint8 and part_map.max() < len(PART_NAMES)


def test_landmarks_lie_on_their_parts(synth, celeba):
    for name, (lx, ly, rx, ry, nx, ny, mlx, mly, mrx, mry) in celeba.landmarks.iterrows():
        part_map = load_part_map(synth, name)
        for x, y, allowed in ((lx, ly, {'eyes', 'eyeglasses'}), (rx, ry, {'eyes', 'eyeglasses'}), (nx, ny, {'nose'}),
                              (mlx, mly, {'mouth'}), (mrx, mry, {'mouth'})):
            assert PART_NAMES[part_map[y, x]] in allowed, (name, x, y, PART_NAMES[part_map[y, x]])
    lm = celeba.landmarks
    assert (lm.lefteye_x < lm.righteye_x).all() and (lm.leftmouth_x < lm.rightmouth_x).all()
    assert (lm.lefteye_y < lm.nose_y).all() and (lm.nose_y < lm.leftmouth_y).all()


def test_accessory_parts_follow_labels(synth, celeba):
    "An accessory's part appears in the part map exactly when its label is positive."
    accessories = {'Eyeglasses': 'eyeglasses', 'Wearing_Hat': 'hat', 'Wearing_Earrings': 'earrings',
                   'Wearing_Necklace': 'necklace', 'Wearing_Necktie': 'necktie'}
    for name, labels in celeba.attributes.iterrows():
        present = set(np.unique(load_part_map(synth, name)))
        for attribute, part in accessories.items():
            assert (PART_IDS[part] in present) == bool(labels[attribute]), (name, attribute)
        assert {PART_IDS[p] for p in ('face', 'nose', 'mouth', 'chin', 'neck')} <= present
        assert PART_IDS['eyes'] in present or PART_IDS['eyeglasses'] in present     # sunglasses cover the eyes


def test_dependency_rules(celeba):
    a = celeba.attributes.astype(bool)
    beard = a[list(BEARDS)].any(axis=1)
    assert (a.No_Beard == ~beard).all()
    assert not (beard & ~a.Male).any()
    assert not (a.Heavy_Makeup & a.Male).any()
    assert (a[list(HAIR_COLOURS)].sum(axis=1) <= 1).all() and (a[list(HAIR_TEXTURES)].sum(axis=1) <= 1).all()
    assert not (a.Gray_Hair & a.Young).any()
    assert not (a.Bald & a[list(HAIR_COLOURS + HAIR_TEXTURES) + ['Bangs', 'Receding_Hairline']].any(axis=1)).any()
    assert not (a.Bald & ~a.Male).any()
    assert not (a.Wearing_Hat & (a.Bangs | a.Bald | a.Receding_Hairline)).any()
    assert not (a.Big_Nose & a.Pointy_Nose).any() and not (a.Chubby & a.Oval_Face).any()
    # correlations of CelebA's kind, not just exclusions
    assert a.Mouth_Slightly_Open[a.Smiling].mean() > a.Mouth_Slightly_Open[~a.Smiling].mean() + 0.3
    assert a.Wearing_Lipstick[~a.Male].mean() > 0.6 > 0.05 > a.Wearing_Lipstick[a.Male].mean()
    assert a.Attractive[a.Young].mean() > a.Attractive[~a.Young].mean() + 0.2


def test_frequencies_close_to_celeba(celeba):
    table = compare_frequencies(celeba.attributes)
    p = table.celeba
    tolerance = 3.5 * np.sqrt(p * (1 - p) / N) + 0.01                    # ~3.5 sigma for 500 images
    assert (table.difference.abs() <= tolerance).all(), table[table.difference.abs() > tolerance]
    draws = pd.DataFrame([sample_attributes(np.random.default_rng([99, i])) for i in range(20_000)]).astype(int)
    assert (compare_frequencies(draws).difference.abs() < 0.015).all()
    # the absolute rates, not only the ratios of the normalised frequencies: CelebA's faces are 83.5 % beardless, ~42 % male
    assert abs(draws.No_Beard.mean() - 0.835) < 0.012 and abs(draws.Male.mean() - 0.42) < 0.015


def _mean_over(synth, celeba, attribute, measure):
    "Mean of `measure(image, mask)` over positives and over negatives of `attribute`, inside its evidence mask."
    values = {True: [], False: []}
    for name, label in celeba.attributes[attribute].items():
        image = cv2.imread(str(synth / 'img_align_celeba' / name))[..., ::-1].astype(np.float32)
        mask = attribute_mask(load_part_map(synth, name), attribute)
        values[bool(label)].append(measure(image, mask))
    return np.mean(values[True]), np.mean(values[False])


def test_evidence_is_where_attribute_parts_say(synth, celeba):
    "The pixels of an attribute's parts differ between positives and negatives in the drawn direction."
    redness = lambda image, mask: (image[..., 0] - image[..., 1:].mean(-1))[mask].mean()
    darkness = lambda image, mask: -image[mask].mean()
    brightness = lambda image, mask: image[mask].mean()
    for attribute, measure, margin in (('Wearing_Lipstick', redness, 25), ('Goatee', darkness, 25),
                                       ('Mustache', darkness, 25), ('Blond_Hair', brightness, 60),
                                       ('Pale_Skin', brightness, 30)):
        positive, negative = _mean_over(synth, celeba, attribute, measure)
        assert positive > negative + margin, (attribute, positive, negative)
    sharpness = {True: [], False: []}
    for name, blurry in celeba.attributes.Blurry.items():
        grey = cv2.imread(str(synth / 'img_align_celeba' / name), cv2.IMREAD_GRAYSCALE)
        sharpness[bool(blurry)].append(cv2.Laplacian(cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA), cv2.CV_32F).var())
    assert np.mean(sharpness[True]) * 5 < np.mean(sharpness[False])     # still blurred at 64x64


def test_switching_an_attribute_changes_only_its_parts():
    "Rendering a face with one attribute on and off (same random draws) changes pixels mostly inside its ATTRIBUTE_PARTS."
    table = evidence_table(n=20, seed=8)
    local = [a for a, parts in ATTRIBUTE_PARTS.items() if parts and a != 'No_Beard']
    assert table.index.tolist() == local
    assert (table.inside >= 0.72).all(), table[table.inside < 0.72]
    assert (table.changed_pixels >= 150).all(), table[table.changed_pixels < 150]   # every local attribute is drawn


def test_attribute_masks(synth):
    part_map = load_part_map(synth, '000001.jpg')
    assert not attribute_mask(part_map, 'Blurry').any() and not attribute_mask(part_map, 'Attractive').any()
    assert (attribute_mask(part_map, 'Smiling') == (part_map == PART_IDS['mouth'])).all()
    assert set(ATTRIBUTE_PARTS) == set(CELEBA_ATTRIBUTES)
    with pytest.raises(MtabnError, match='unknown attribute'): attribute_mask(part_map, 'Sunburn')
    with pytest.raises(MtabnError, match='not found'): load_part_map(synth, '999999.jpg')


def test_cache_overwrite_and_refusals(tmp_path):
    out = make_synth_celeba(tmp_path / 'set', n=12, seed=1)
    stamp = (out / 'img_align_celeba' / '000001.jpg').stat().st_mtime_ns
    assert make_synth_celeba(out, n=12, seed=1) == out                               # cached: untouched
    assert (out / 'img_align_celeba' / '000001.jpg').stat().st_mtime_ns == stamp
    make_synth_celeba(out, n=5, seed=2)                                              # other parameters: rewritten
    assert len(os.listdir(out / 'img_align_celeba')) == 5 and len(os.listdir(out / PART_DIR)) == 5
    assert CelebA(out).attributes.shape == (5, 40)
    (out / 'img_align_celeba' / '000003.jpg').unlink()                              # damaged: regenerated
    make_synth_celeba(out, n=5, seed=2)
    assert (out / 'img_align_celeba' / '000003.jpg').is_file()
    foreign = tmp_path / 'photos'; foreign.mkdir(); (foreign / 'a.jpg').write_bytes(b'mine')
    with pytest.raises(MtabnError, match='not a SynthCelebA folder'): make_synth_celeba(foreign, n=3)
    assert os.listdir(foreign) == ['a.jpg']
    with pytest.raises(MtabnError, match='is a file'): make_synth_celeba(foreign / 'a.jpg', n=3)
    for bad in (dict(n=0), dict(n=-1), dict(n=True), dict(n=1.5), dict(seed=-3), dict(num_workers=0)):
        with pytest.raises(MtabnError, match='must be an integer'): make_synth_celeba(tmp_path / 'bad', **{'n': 3, **bad})
    assert not (tmp_path / 'bad').exists()


def test_interrupted_folder_is_regenerated(tmp_path):
    out = make_synth_celeba(tmp_path / 'set', n=6, seed=4)
    marker = (out / MARKER_FILE).read_text()
    (out / MARKER_FILE).write_text(marker.replace('"complete": true', '"complete": false'))
    (out / 'list_attr_celeba.txt').unlink()
    make_synth_celeba(out, n=6, seed=4)
    assert CelebA(out).attributes.shape == (6, 40) and '"complete": true' in (out / MARKER_FILE).read_text()


def test_console_script(console, tmp_path):
    result = console('mtabn_synth', tmp_path / 'synth', '--n', 20, '--seed', 5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'synth'}: 20 SynthCelebA images (seed 5, aligned layout): train 16, valid 2, test 2"
    assert CelebA(tmp_path / 'synth').attributes.shape == (20, 40)
    assert folder_bytes(tmp_path / 'synth') == folder_bytes(make_synth_celeba(tmp_path / 'lib', n=20, seed=5))
    bad = console('mtabn_synth', tmp_path / 'bad', '--n', 0)
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["mtabn_synth: error: n=0: must be an integer from 1 to 999999 "
                                               "(the number of images to generate, e.g. 1000)"]


@pytest.mark.slow
def test_resnet18_learns_synthceleba_at_64px(tmp_path):
    "A ResNet-18 trained from scratch for 3 short epochs on 1,600 images at 64x64 beats the majority baseline clearly."
    import torch
    from multitask_abn.models import attribute_logits, create_model
    torch.manual_seed(0)
    data = CelebA(make_synth_celeba(tmp_path / 'synth', n=2000, seed=21))

    def tensors(split):
        names = data.split_index(split)
        images = np.stack([cv2.resize(cv2.imread(str(data.image_dir / n))[..., ::-1], (64, 64), interpolation=cv2.INTER_AREA) for n in names])
        x = (torch.tensor(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        return x, torch.tensor(data.attributes.loc[names].to_numpy()).float()

    (x, y), (x_test, y_test) = tensors('train'), tensors('test')
    model = create_model('resnet18')
    epochs, batch = 3, 64
    steps = epochs * (len(x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = loss_fn(attribute_logits(model(x[idx]).perception), y[idx])
            optimizer.zero_grad(); loss.backward(); optimizer.step(); schedule.step()
    model.eval()
    with torch.no_grad(): accuracy = ((attribute_logits(model(x_test).perception) >= 0).float() == y_test).float().mean(0)
    majority = ((y.mean(0) >= 0.5).float() == y_test).float().mean(0)
    assert accuracy.mean() >= majority.mean() + 0.05, (accuracy.mean().item(), majority.mean().item())
    assert (accuracy >= 0.9).sum() >= 10
