"End-to-end checks of `multitask_abn.explain`: scaling, the two renderers, explanation metrics, Grad-CAM, prediction."
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from multitask_abn.data import CELEBA_ATTRIBUTES, IMAGE_DIR, CelebADataset, MtabnError, get_transform, write_celeba_annotations
from multitask_abn.explain import (BASELINE_METHODS, AttributeRegions, Counterfactuals, Explanation, attention_grid, attention_saliency,
                                   attribute_grid, attribute_prior, compare_explanations, curve_auc, deletion_insertion_curves, energy_share,
                                   explanation_records, explanation_table, fit_prior, gradcam_saliency, grid_origins, peak_location,
                                   pointing_ceiling, pointing_game, resize_maps, attention_panels, explain_images, explain_run, predict,
                                   save_attention_grids, scale_maps, summarize_explanations)
from multitask_abn.models import create_model, save_model, save_seed_checkpoint

TYPICAL_LANDMARKS = [69, 111, 108, 111, 88, 135, 72, 152, 105, 152]


@pytest.fixture(scope='module')
def abn():
    torch.manual_seed(0)
    return create_model('abn_v1_resnet10').eval()


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    "Six random 178x218 images in CelebA's layout with typical landmarks (test split)."
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp('faces')
    (root/IMAGE_DIR).mkdir()
    names = [f'{i:06d}.jpg' for i in range(1, 7)]
    for name in names: Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root/IMAGE_DIR/name)
    write_celeba_annotations(root, names, rng.integers(0, 2, (6, 40)), [2] * 6, np.tile(TYPICAL_LANDMARKS, (6, 1)))
    return CelebADataset(root, 'test', get_transform('eval', 64))


def random_explanation(seed=0, size=48):
    rng = np.random.default_rng(seed)
    return Explanation(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.normal(0, 50, (40, 3, 3)).astype(np.float32),
                       rng.normal(0, 2, 40), rng.normal(0, 2, 40), rng.integers(0, 2, 40).astype(float), f'{seed}.jpg')


# --- scaling -------------------------------------------------------------------------------------------------

def test_scaling_modes_match_hand_computed_values():
    maps = np.array([[[-6., 0.], [2., 4.]], [[1., 1.], [1., 1.]], [[-1., -3.], [-2., -1.]]])
    np.testing.assert_allclose(scale_maps(maps, 'pos'), [[[0, 0], [.5, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    np.testing.assert_allclose(scale_maps(maps, 'neg'), [[[0, 1], [1, 1]], [[0, 0], [0, 0]], [[1, 0], [.5, 1]]])
    np.testing.assert_allclose(scale_maps(maps, 'both'), [[[0, .5], [2/3, 5/6]], [[1, 1], [1, 1]], [[1/3, 0], [1/6, 1/3]]])


# --- placing a feature grid on the image ---------------------------------------------------------------------

@pytest.mark.parametrize('size, cells, stride', [(80, 5, 16), (64, 4, 16), (80, 3, 32), (224, 7, 32), (218, 14, 16)])
def test_each_cell_peaks_on_its_receptive_field_centre(size, cells, stride):
    "Cell i of a stride-s ResNet map sees the input around pixel s * i: a one-hot map peaks exactly there."
    maps = np.zeros((cells * cells, cells, cells), np.float32)
    maps[np.arange(cells * cells), np.arange(cells * cells) // cells, np.arange(cells * cells) % cells] = 1
    placed = resize_maps(maps, (size, size))
    assert placed.shape == (cells * cells, size, size)
    for k in range(cells * cells - 1):        # the last cell is held to the border: a plateau
        i, j = divmod(k, cells)
        assert np.unravel_index(placed[k].argmax(), (size, size)) == (stride * i, stride * j) and placed[k].max() == 1


def test_placed_maps_keep_constant_directions_and_values():
    rng = np.random.default_rng(0)
    rows = np.tile(rng.normal(size=(1, 5)), (5, 1)).astype(np.float32)           # constant along y
    placed = resize_maps(rows, (80, 80))
    np.testing.assert_allclose(placed, np.tile(placed[:1], (80, 1)))
    np.testing.assert_allclose(placed[0, ::16], rows[0], rtol=1e-6)                 # the cell values sit at 0, 16, ...
    np.testing.assert_allclose(resize_maps(np.full((3, 5, 5), 7.), (80, 80)), 7.)


def test_panels_draw_a_cell_over_its_evidence():
    "At 2x display size a one-hot cell of a 64 px input's 4x4 map is hottest around panel pixel 2 * 16 * i + 0.5."
    image = np.full((64, 64, 3), 100, np.uint8)
    cell = np.zeros((1, 4, 4), np.float32); cell[0, 1, 2] = 1
    panel = attention_panels(image, cell, size=(128, 128))[0].astype(int)
    redness = panel[..., 0] - panel[..., 2]
    assert peak_location(redness) == pytest.approx((32.5, 64.5))


def test_gradcam_is_placed_like_attention():
    "Grad-CAM is taken at its layer's grid and placed by `resize_maps`: its values sit on the cell centres (stride 32 at layer4)."
    torch.manual_seed(2)
    baseline = create_model('resnet10').eval()
    images = torch.randn(2, 3, 80, 80)
    cams, grid = gradcam_saliency(baseline, images, [15, 31])
    assert grid == (3, 3) and cams.shape == (2, 2, 80, 80)
    on_grid = cams[..., ::32, ::32]
    assert on_grid.max(axis=(-2, -1)) == pytest.approx(1.0) and on_grid.min(axis=(-2, -1)) == pytest.approx(0.0)  # min-max on the grid
    np.testing.assert_allclose(resize_maps(on_grid.reshape(-1, 3, 3), (80, 80)).reshape(cams.shape), cams, atol=1e-6)


# --- renderers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mode', ['pos', 'neg', 'both'])
def test_fast_and_matplotlib_renderers_show_the_same_panels(mode):
    grid = attention_grid(random_explanation(), mode, show_probs=True)
    canvas, figure = grid.render(), grid.plot()
    height, width = grid.panels.shape[1:3]
    for i, (y, x) in enumerate(grid_origins(len(grid.panels), grid.ncols, (height, width), grid.title_height())):
        np.testing.assert_array_equal(canvas[y:y + height, x:x + width], grid.panels[i])
        np.testing.assert_array_equal(np.asarray(figure.axes[i].images[0].get_array()), grid.panels[i])
        assert figure.axes[i].get_title().split('\n')[0] == CELEBA_ATTRIBUTES[i]


def test_attribute_view_renders_one_attribute_of_many_images():
    explanations = [random_explanation(s) for s in range(16)]
    grid = attribute_grid(explanations, 'Eyeglasses')
    assert grid.shape == (2, 8) and grid.titles[5][0] == '5.jpg'
    np.testing.assert_array_equal(grid.panels[5], attention_grid(explanations[5], attributes=['Eyeglasses']).panels[0])
    assert grid.render().shape[1] == 8 * grid.panels.shape[2] + 9 * 4     # 8 panels, 9 margins of 4 px


def test_explaining_never_modifies_the_callers_tensors(abn):
    images, labels = torch.randn(2, 3, 32, 32), torch.ones(2, 40)
    kept = images.clone(), labels.clone()
    for e in explain_images(abn, images, 'eval', labels):
        e.perception[:] = -1; e.maps[:] = 0
        attention_grid(e, 'both', show_probs=True).render()
    assert torch.equal(images, kept[0]) and torch.equal(labels, kept[1])


# --- metrics -------------------------------------------------------------------------------------------------

def test_pointing_game_and_energy_share_on_hand_built_maps():
    mask = np.zeros((40, 40), bool); mask[10:20, 10:20] = True
    inside, outside, near = (np.zeros((40, 40)) for _ in range(3))
    inside[15, 12] = 5; outside[30, 30] = 5; near[21, 15] = 5   # near: 2 px below the region, tolerance 5 % of 40 = 2 px
    assert pointing_game(inside, mask) and not pointing_game(outside, mask)
    assert pointing_game(near, mask) and not pointing_game(near, mask, tolerance=0)
    uniform_plus = np.ones((40, 40)); uniform_plus[mask] = 2      # min-max -> 1 inside, 0 outside
    assert energy_share(uniform_plus, mask) == pytest.approx(1.0)
    half = np.zeros((40, 40)); half[10:20, 15:25] = 1             # half of the mass in the region
    assert energy_share(half, mask) == pytest.approx(0.5)


def test_deletion_and_insertion_rank_a_faithful_map_above_an_unfaithful_one():
    image, baseline = torch.ones(1, 8, 8), torch.zeros(1, 8, 8)
    region = torch.zeros(8, 8, dtype=torch.bool); region[:4, :4] = True    # a quarter of the image
    intact = lambda batch: batch[:, 0][:, region].mean(1)
    faithful = deletion_insertion_curves(intact, image, region.float(), steps=4, baseline=baseline)
    unfaithful = deletion_insertion_curves(intact, image, (~region).float(), steps=4, baseline=baseline)
    assert [curve_auc(c) for c in faithful] == pytest.approx([1/8, 7/8])
    assert [curve_auc(c) for c in unfaithful] == pytest.approx([7/8, 1/8])


def test_gradcam_comparison_runs_on_tiny_models(abn, faces):
    torch.manual_seed(2)
    baseline = create_model('resnet10')
    attributes = ['Eyeglasses', 'Smiling', 'Big_Nose']
    records = compare_explanations(abn, baseline, faces, n=4, deletion_images=1, steps=4, batch_size=2, attributes=attributes)
    present = faces.labels[:4, [CELEBA_ATTRIBUTES.index(a) for a in attributes]]
    assert set(records.method) == {'attention', 'gradcam'}
    assert len(records) == 2 * int(present.sum()) and (records.label == 1).all()     # present attributes only
    # each energy share, recomputed by hand from the maps (min-max normalised, mass inside the region / all mass)
    regions, columns = AttributeRegions(faces), [CELEBA_ATTRIBUTES.index(a) for a in attributes]
    images = torch.stack([faces[i][0] for i in range(4)])
    maps = {'attention': attention_saliency(abn, images, columns)[0], 'gradcam': gradcam_saliency(baseline, images, columns)[0]}
    for row in records.itertuples():
        i, k = faces.filenames.index(row.image), attributes.index(row.attribute)
        s = maps[row.method][i, k].astype(np.float64)
        s = (s - s.min()) / (s.max() - s.min())
        mask = regions.masks(i, images.shape[-2:])[row.attribute]
        assert row.energy_share == pytest.approx(s[mask].sum() / s.sum(), rel=1e-5), row
    per_attribute = records.groupby(['method', 'attribute']).deletion_auc.count()
    assert (per_attribute == 1).all()                                                # deletion_images=1 per attribute
    summary = summarize_explanations(records)
    assert summary[summary.attribute == 'mean'].method.tolist() == ['attention', 'gradcam']
    with pytest.raises(MtabnError, match='unknown explanation method'):
        explanation_records(abn, faces, 'lime')


def test_on_aligned_faces_a_map_that_ignores_the_image_wins(abn, faces):
    "The landmarks of `faces` vary by a few pixels: the prior's fixed peak lies in every image's region (the trap of aligned data)."
    prior = fit_prior(AttributeRegions(faces), (64, 64))
    records = explanation_records(abn, faces, 'prior', n=6, deletion_images=0, prior=prior)
    assert len(records) > 20 and records.pointing_game.mean() == 1.0
    shifted = {a: np.roll(m, 20, axis=1) for a, m in prior.items()}           # the same maps 20 px to the right miss
    assert explanation_records(abn, faces, 'prior', n=6, deletion_images=0, prior=shifted).pointing_game.mean() < 0.5
    summary = summarize_explanations(pd.concat([explanation_records(abn, faces, 'attention', n=6, deletion_images=0), records]))
    row = summary.set_index(['method', 'attribute']).loc[('attention', 'mean')]
    assert row.pointing_game_vs_prior == pytest.approx(row.pointing_game - 1.0)
    assert row.pointing_game_vs_prior_lo <= row.pointing_game_vs_prior <= row.pointing_game_vs_prior_hi


def test_our_pointing_game_and_energy_share_agree_with_quantus(abn, faces):
    "Quantus' PointingGame (argmax inside the mask) and AttributionLocalisation (mass inside / total) on hand-built and real maps,"
    " where the definitions agree: a unique maximum and no tolerance; maps >= 0 with minimum 0 (min-max = divide by the max)."
    quantus = pytest.importorskip('quantus')
    rng = np.random.default_rng(1)
    hand = rng.random((4, 32, 32)); hand[:, 0, 0] = 0
    images = torch.stack([faces[i][0] for i in range(4)])
    cams, _ = gradcam_saliency(create_model('resnet10'), images, [CELEBA_ATTRIBUTES.index('Smiling')])
    attention, _ = attention_saliency(abn, images, [CELEBA_ATTRIBUTES.index('Big_Nose')])
    real = [scale_maps(m, 'both') for m in np.concatenate([cams[:, 0], attention[:, 0]])]
    real = [m - m.min() for m in real]
    masks, maps = [], []
    for m in [*hand, *real]:
        mask = np.zeros(m.shape, bool)
        y, x = rng.integers(0, m.shape[0] - 10, 2)
        mask[y:y + 10, x:x + 12] = True
        masks.append(mask); maps.append(m.astype(np.float32))
    unique = [int((m == m.max()).sum()) == 1 for m in maps]
    varying = [np.ptp(m) > 0 for m in maps]          # a constant map: ours holds a uniform map's share, Quantus' 0
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))   # Quantus wants one
    def quantus_scores(metric, chosen):
        a = np.stack([maps[i] for i in chosen])[:, None]; s = np.stack([masks[i] for i in chosen])[:, None].astype(np.float32)
        x = np.zeros((len(chosen), 3, *a.shape[-2:]), np.float32)
        return np.asarray(metric(disable_warnings=True)(model=model, x_batch=x, y_batch=np.zeros(len(chosen), int), a_batch=a,
                                                        s_batch=s, device='cpu'), dtype=float)
    for shape in {m.shape for m in maps}:
        chosen = [i for i, m in enumerate(maps) if m.shape == shape]
        points = [i for i in chosen if unique[i]]
        chosen = [i for i in chosen if varying[i]]
        assert len(points) >= 2 and len(chosen) >= 4
        assert quantus_scores(quantus.PointingGame, points).tolist() == [float(pointing_game(maps[i], masks[i], 0)) for i in points]
        ours = [energy_share(maps[i], masks[i]) for i in chosen]
        assert quantus_scores(quantus.AttributionLocalisation, chosen) == pytest.approx(ours, abs=1e-5)


def test_pointing_ceiling_of_a_coarse_grid(abn, faces):
    "ABN maps at 64 px are 4x4: a mask averaged onto that grid always wins where a 1x1 grid never can."
    masks = AttributeRegions(faces).masks(0, (64, 64))
    assert not any(pointing_ceiling(m, (1, 1)) for m in masks.values())              # a constant map has no peak
    assert pointing_ceiling(masks['Smiling'], (64, 64), tolerance=0)                 # full resolution: always


def test_save_attention_grids_writes_one_jpeg_per_image(abn, faces, tmp_path):
    written = save_attention_grids(abn, faces, tmp_path/'grids', n=3, batch_size=2, progress=False)
    assert [p.name for p in written] == ['000001.jpg', '000002.jpg', '000003.jpg']
    assert all(cv2.imread(str(p)) is not None for p in written)


# --- prediction ----------------------------------------------------------------------------------------------

def exif_rotated(image: Image.Image, path):
    "Save `image` stored rotated, with the EXIF orientation tag (6: rotate 90 CW to view) that puts it upright."
    exif = Image.Exif(); exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


@pytest.fixture
def checkpoint(abn, tmp_path):
    return save_model(abn, tmp_path/'abn.pt', config={'transform': 'eval', 'image_size': 32})


def test_predict_reads_odd_image_modes_like_their_rgb_equivalents(checkpoint, tmp_path):
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (83, 61, 3), dtype=np.uint8))
    folder = tmp_path/'in'; folder.mkdir()
    rgb.save(folder/'upright.png'); exif_rotated(rgb, folder/'rotated.png')
    rgb.convert('L').save(folder/'gray.png'); rgb.convert('L').convert('RGB').save(folder/'gray_as_rgb.png')
    rgb.convert('RGBA').save(folder/'rgba.png'); rgb.convert('P').save(folder/'palette.png')
    rgb.convert('P').convert('RGB').save(folder/'palette_as_rgb.png')
    rgb.convert('CMYK').save(folder/'cmyk.jpg')
    table = predict(checkpoint, [folder], tmp_path/'out', align=False).set_index('path')
    probs = {Path(p).name: row.to_numpy() for p, row in table.iterrows()}
    np.testing.assert_allclose(probs['rotated.png'], probs['upright.png'], atol=1e-6)
    np.testing.assert_allclose(probs['gray.png'], probs['gray_as_rgb.png'], atol=1e-6)
    np.testing.assert_allclose(probs['rgba.png'], probs['upright.png'], atol=1e-6)   # opaque alpha changes nothing
    np.testing.assert_allclose(probs['palette.png'], probs['palette_as_rgb.png'], atol=1e-6)
    assert 'cmyk.jpg' in probs
    written = pd.read_csv(tmp_path/'out'/'predictions.csv')
    assert list(written.columns) == ['path', *CELEBA_ATTRIBUTES, *(f'{a}_score' for a in CELEBA_ATTRIBUTES)] and len(written) == 8
    assert sorted(p.name for p in (tmp_path/'out'/'attention').iterdir()) == sorted(f'{Path(n).stem}.jpg' for n in probs)


def test_mtabn_predict_reports_a_corrupt_file_and_does_the_others(console, checkpoint, tmp_path):
    Image.new('RGB', (50, 60), 'white').save(tmp_path/'good.jpg')
    (tmp_path/'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated jpeg')
    result = console('mtabn_predict', '--checkpoint', checkpoint, tmp_path/'corrupt.jpg', tmp_path/'good.jpg',
                 tmp_path/'missing.png', '--out', tmp_path/'out', '--no-align')
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any('corrupt.jpg' in line and 'cannot decode' in line for line in lines)
    assert any('missing.png' in line and 'not found' in line for line in lines)
    assert lines[-1].startswith('mtabn_predict: error: 2 of 3 images could not be read')
    assert 'Traceback' not in result.stderr
    table = pd.read_csv(tmp_path/'out'/'predictions.csv')
    assert table.path.tolist() == [str(tmp_path/'good.jpg')]
    assert (tmp_path/'out'/'attention'/'good.jpg').is_file()


def test_mtabn_predict_with_a_reference_checkpoint(console, tmp_path):
    torch.manual_seed(1)
    model = create_model('abn_v1_resnet18').eval()
    reference = save_seed_checkpoint(model, tmp_path/'seed'/'checkpoint.pt')
    Image.new('RGB', (178, 218), 'gray').save(tmp_path/'face.png')
    result = console('mtabn_predict', '--checkpoint', reference, tmp_path/'face.png', '--out', tmp_path/'out',
                 '--image_size', 64, '--no-align')
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path/'out'/'predictions.csv')
    x = get_transform('fukui2019', 64)(Image.open(tmp_path/'face.png').convert('RGB'))[None]   # the references' transform
    with torch.no_grad(): expected = torch.sigmoid(model(x).perception)[0].numpy()
    np.testing.assert_allclose(table[[f'{a}_score' for a in CELEBA_ATTRIBUTES]].to_numpy()[0], expected, atol=1e-5)
    np.testing.assert_array_equal(table[list(CELEBA_ATTRIBUTES)].to_numpy()[0], (expected >= 0.5).astype(int))
    assert (tmp_path/'out'/'attention'/'face.jpg').is_file()


def test_mtabn_predict_rejects_a_missing_checkpoint(console, tmp_path):
    Image.new('RGB', (50, 60)).save(tmp_path/'a.png')
    result = console('mtabn_predict', '--checkpoint', tmp_path/'nope.pt', tmp_path/'a.png', '--out', tmp_path/'out')
    assert result.returncode == 2 and 'nope.pt' in result.stderr and 'Traceback' not in result.stderr


# --- SynthCelebA ground truth and the run-level entry point ---------------------------------------------------

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from multitask_abn.synth import make_synth_celeba
    return make_synth_celeba(tmp_path_factory.mktemp('synth')/'synth', n=40, seed=0, progress=False)


def test_synth_part_maps_are_the_ground_truth(synth):
    dataset = CelebADataset(synth, 'all', get_transform('eval', 64))
    regions = AttributeRegions(dataset)
    assert regions.kind == 'synth' and regions.excluded == ['Attractive', 'Blurry']
    masks = regions.masks(0, (64, 64))
    rows = {a: np.nonzero(masks[a])[0].mean() for a in ('Arched_Eyebrows', 'Narrow_Eyes', 'Big_Nose', 'Smiling', 'Goatee')}
    assert list(rows.values()) == sorted(rows.values())          # top to bottom: brows, eyes, nose, mouth, chin
    landmarks = AttributeRegions(dataset, 'landmarks')
    assert landmarks.kind == 'landmarks' and len(landmarks.table) == 16


def untrained_run(synth: Path, folder: Path) -> Path:
    "A run folder holding an untrained ABN-v1 ResNet-10 (seed 0) and a config naming `synth` at 64 px."
    torch.manual_seed(0)
    save_model(create_model('abn_v1_resnet10'), folder/'checkpoints'/'best.pt')
    (folder/'config.json').write_text(json.dumps({'data': str(synth), 'transform': 'eval', 'image_size': 64}))
    return folder


def test_explain_run_writes_what_the_report_reads(synth, tmp_path):
    run = untrained_run(synth, tmp_path/'run')
    baseline = save_model(create_model('resnet10'), tmp_path/'baseline.pt', config={'transform': 'eval', 'image_size': 64})
    summary = explain_run(run, split='all', n=3, metrics_images=6, deletion_images=1, steps=4, baseline=baseline, progress=False)
    out = run/'explain'/'all'
    assert len(list((out/'attention_examples').glob('*.jpg'))) == 3
    table = pd.read_csv(out/'explanation_metrics.csv')
    methods = {'attention', *BASELINE_METHODS, 'gradcam_layer4', 'gradcam_layer3', 'gradcampp_layer4'}
    assert set(table.method) == methods and {'mean', 'mean_localised'} <= set(table.attribute)
    ceilings = table.pivot(index='attribute', columns='method', values='pointing_ceiling')
    pd.testing.assert_series_equal(ceilings.attention, ceilings.gradcam_layer3, check_names=False)  # both 4x4 at 64 px
    means = table.set_index(['method', 'attribute'])
    assert means.loc[('attention', 'mean'), 'pointing_game_vs_prior'] == pytest.approx(
        means.loc[('attention', 'mean'), 'pointing_game'] - means.loc[('prior', 'mean'), 'pointing_game'])
    assert means.loc[('uniform', 'mean'), 'energy_share'] == pytest.approx(means.loc[('uniform', 'mean'), 'region_fraction'])
    records = pd.read_csv(out/'explanation_records.csv')
    assert records.query("method == 'attention'").attention_response.notna().any()        # counterfactuals on SynthCelebA
    assert records.query("method == 'prior'").attention_response.isna().all()             # a fixed map cannot respond
    assert records.query("method == 'uniform'").cf_pointing_game.isna().all()              # no peak to point with
    assert records.query("method == 'attention'").cf_pointing_game.notna().mean() > 0.5
    assert any((synth/'.mtabn_cache').glob('prior_synth_train_64x64_*.npz'))
    info = json.loads((out/'explanation_summary.json').read_text())
    assert info['ground_truth'] == 'synth' and info['excluded'] == ['Attractive', 'Blurry'] and info['counterfactual']
    assert set(info['mean']) == methods and info['split'] == 'all'
    assert (out/'explanation_metrics.png').is_file()
    assert len(summary) == len(table)


def test_mtabn_explain_prints_the_means_over_all_and_localised_attributes(synth, tmp_path, console):
    run = untrained_run(synth, tmp_path/'run')
    result = console('mtabn_explain', run, '--split', 'all', '--n', 1, '--metrics-images', 4)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(run/'explain'/'all'/'explanation_metrics.csv').set_index(['method', 'attribute'])
    blocks = result.stdout.strip().split('\n\n')
    assert [b.splitlines()[0] for b in blocks] == [
        'all split, mean over localised attributes (region < 10 % of the image); [95 % bootstrap interval over images]:',
        'all split, mean over all attributes; [95 % bootstrap interval over images]:']
    for block, name in zip(blocks, ('mean_localised', 'mean')):
        lines = {line.split()[0]: line for line in block.splitlines()[2:]}
        assert set(lines) == {'attention', *BASELINE_METHODS}
        for method, line in lines.items():
            row = table.loc[(method, name)]
            expected = f"{row.energy_share:.3f} [{row.energy_share_lo:.3f}, {row.energy_share_hi:.3f}]"
            assert expected in line, (expected, line)
        prior_margin = table.loc[('attention', name), 'pointing_game_vs_prior']
        assert f"{prior_margin:+.3f}" in lines['attention']



def small_part_pointing_ceiling(synth, size: int) -> float:
    "Mean over attributes of the pointing ceiling of ABN's grid (size / 16) at input `size`, on regions under 10 % of the image."
    dataset = CelebADataset(synth, 'all', get_transform('eval', size))
    regions, wins = AttributeRegions(dataset), {}
    for i in range(len(dataset)):
        for attribute, mask in regions.masks(i, (size, size)).items():
            if mask.mean() < 0.1: wins.setdefault(attribute, []).append(pointing_ceiling(mask, (size // 16, size // 16)))
    return float(np.mean([np.mean(v) for v in wins.values()]))


def test_demo_recipe_maps_are_fine_enough_to_point_at_small_parts(synth):
    "At the demo recipe's input size the best possible attention map wins the pointing game on small parts, more often than at 64 px."
    from multitask_abn.train import RECIPES
    ceiling = small_part_pointing_ceiling(synth, RECIPES['demo']['image_size'])
    assert ceiling >= 0.85
    assert small_part_pointing_ceiling(synth, 64) < ceiling


LOCAL_ATTRIBUTES = ('Arched_Eyebrows', 'Bags_Under_Eyes', 'Bangs', 'Big_Lips', 'Bushy_Eyebrows', 'Eyeglasses', 'Goatee', 'Mustache',
                    'Narrow_Eyes', 'Pointy_Nose', 'Wearing_Earrings', 'Wearing_Lipstick', 'Wearing_Necklace', 'Wearing_Necktie')


@pytest.fixture(scope='module')
def wild(tmp_path_factory):
    from multitask_abn.synth import make_synth_celeba
    return make_synth_celeba(tmp_path_factory.mktemp('wild')/'wild', n=40, seed=1, layout='wild', progress=False)


def test_switching_an_attribute_off_changes_only_its_own_parts(wild):
    "A counterfactual pair differs only on the attribute's parts (either image's; 2 px of anti-aliasing) for attributes drawn on"
    " their own parts (>= 98 %), and mostly there for the rest (hair colours also recolour the brows, Male changes hair and jaw, ...)."
    from multitask_abn.explain import dilate
    from multitask_abn.synth import ATTRIBUTE_PARTS, PART_IDS
    pairs, labels = Counterfactuals(wild, get_transform('eval', 64)), CelebADataset(wild, 'all').celeba.attributes
    inside, checked = {}, 0
    for number in range(1, 41):
        name = f'{number:06d}.jpg'
        for attribute in [a for a in CELEBA_ATTRIBUTES if ATTRIBUTE_PARTS[a] and labels.loc[name, a]]:
            pair = pairs.pair(name, attribute)
            if pair is None: continue
            ids = [PART_IDS[p] for p in ATTRIBUTE_PARTS[attribute]]
            own = np.isin(pairs.draw(number, camera=False)[1], ids) | np.isin(pairs.draw(number, attribute, camera=False)[1], ids)
            inside.setdefault(attribute, []).append((pair[1] & dilate(own, 2)).sum() / pair[1].sum())
            checked += attribute in LOCAL_ATTRIBUTES
    assert checked >= 20
    for attribute, shares in inside.items():
        assert min(shares) >= (0.98 if attribute in LOCAL_ATTRIBUTES else 0.3), (attribute, min(shares))   # 0.98: eyeliner arcs
    assert np.mean([np.mean(s) for s in inside.values()]) > 0.85
    assert pairs.pair('000001.jpg', 'No_Beard') is None                       # drawn only through the beards


def test_the_prior_points_far_worse_on_wild_faces(synth, wild):
    "On aligned faces the train-split prior points at nearly every localised region; on wild ones it must not (<= 40 %)."
    def prior_pointing(root):
        test = CelebADataset(root, 'all', get_transform('eval', 64))
        model = create_model('abn_v1_resnet10')
        records = explanation_records(model, test, 'prior', n=40, deletion_images=0, prior=attribute_prior(root, size=(64, 64)))
        summary = summarize_explanations(records).set_index('attribute')
        return summary.loc['mean_localised', 'pointing_game']
    aligned, moved = prior_pointing(synth), prior_pointing(wild)
    assert aligned > 0.9 and moved <= 0.4, (aligned, moved)


# --- CelebAMask-HQ masks as the ground truth ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def celebamask_hq(synth, tmp_path_factory):
    "The 40 SynthCelebA faces converted into CelebAMask-HQ's exact layout (96 px images, 64 px masks)."
    from multitask_abn.synth import write_celebamask_hq
    return write_celebamask_hq(synth, tmp_path_factory.mktemp('hq')/'CelebAMask-HQ', image_size=96, mask_size=64)


def test_celebamask_hq_masks_are_the_ground_truth(synth, celebamask_hq):
    from multitask_abn.explain import MASK_ATTRIBUTE_PARTS
    hq = AttributeRegions(CelebADataset(celebamask_hq, 'all', get_transform('eval', 64)))
    parts = AttributeRegions(CelebADataset(synth, 'all', get_transform('eval', 64)))
    assert hq.kind == 'celebamask_hq' and hq.excluded == ['Attractive', 'Blurry'] and set(hq.table) == set(MASK_ATTRIBUTE_PARTS)
    overlaps = []
    for i in range(len(hq.dataset)):        # the nose is one class in both: the same region, through two resizings
        a, b = hq.masks(i, (64, 64)).get('Big_Nose'), parts.masks(i, (64, 64)).get('Big_Nose')
        if a is not None and b is not None: overlaps.append((a & b).sum() / (a | b).sum())
    assert len(overlaps) > 5 and np.mean(overlaps) > 0.7, overlaps
    with pytest.raises(MtabnError, match='is not a CelebAMask-HQ folder'):
        AttributeRegions(CelebADataset(synth, 'all', get_transform('eval', 64)), 'celebamask_hq')


def test_explain_run_measures_on_a_celebamask_hq_folder(synth, celebamask_hq, tmp_path):
    run = untrained_run(synth, tmp_path/'run')
    explain_run(run, celebamask_hq, split='all', n=1, metrics_images=4, deletion_images=0, road_images=0, progress=False)
    info = json.loads((run/'explain'/'all'/'explanation_summary.json').read_text())
    assert info['ground_truth'] == 'celebamask_hq' and not info['counterfactual'] and info['images'] == 4
    assert set(info['mean']) == {'attention', *BASELINE_METHODS}
    assert any((celebamask_hq/'.mtabn_cache').glob('prior_celebamask_hq_train_64x64_*.npz'))   # fitted on its train split
    records = pd.read_csv(run/'explain'/'all'/'explanation_records.csv')
    assert set(records.image) <= {f"{i}.jpg" for i in range(4)} and records.energy_share.notna().all()
    assert set(records.query("method == 'prior'").attribute) == set(records.query("method == 'attention'").attribute)


def test_mtabn_explain_names_a_broken_celebamask_hq_mask(synth, celebamask_hq, tmp_path, console):
    run = untrained_run(synth, tmp_path/'run')
    mask = celebamask_hq/'CelebAMask-HQ-mask-anno'/'0'/'00001_skin.png'
    original = mask.read_bytes()
    mask.write_bytes(b'not a png')
    try: result = console('mtabn_explain', run, '--data', celebamask_hq, '--split', 'all', '--n', 1, '--metrics-images', 2)
    finally: mask.write_bytes(original)
    error = result.stderr.strip().splitlines()[-1]          # after the progress bars
    assert result.returncode == 2 and error.startswith('mtabn_explain: error: cannot decode mask') and '00001_skin.png' in error
    assert 'Traceback' not in result.stderr, result.stderr
