"Losses against hand-written formulas and metrics against brute-force counts, on random data."
import json
import math
import numpy as np
import pandas as pd
import pytest
import torch
from multitask_abn.data import CELEBA_TRAIN_FREQUENCIES
from multitask_abn.losses import (AttributeLoss, bce_loss, focal_loss, focal_weights, make_loss, softmax2_loss)
from multitask_abn.metrics import AttributeMetrics, METRIC_COLUMNS, summarize, write_results
from multitask_abn.models import ABNOutput, PRESETS, create_model
from helpers import numpy_calibration_error


def sigmoid(x): return 1 / (1 + math.exp(-x))


def by_hand_bce(logits, targets, pos_weight=None):
    total = 0.
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            p, y = sigmoid(logits[i, t].item()), targets[i, t].item()
            w = 1. if pos_weight is None else pos_weight[t].item()
            total += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / logits.numel()


def by_hand_focal(logits, targets, gamma, alpha=None, weight=None):
    total = 0.
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            p, y = sigmoid(logits[i, t].item()), targets[i, t].item()
            p_t = p if y else 1 - p
            a = 1. if alpha is None else (alpha if y else 1 - alpha)
            w = 1. if weight is None else weight[t]
            total += w * a * -math.log(p_t) * (1 - p_t) ** gamma
    return total / logits.numel()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 6, generator=g) * 2, torch.randint(0, 2, (5, 6), generator=g).float()


def test_bce_by_hand(batch):
    logits, targets = batch
    pos_weight = torch.linspace(0.5, 3, 6)
    assert bce_loss(logits, targets).item() == pytest.approx(by_hand_bce(logits, targets), rel=1e-5)
    assert bce_loss(logits, targets, pos_weight).item() == pytest.approx(by_hand_bce(logits, targets, pos_weight), rel=1e-5)


def test_softmax2_by_hand(batch):
    logits, targets = batch
    two_way = torch.stack([-logits / 3, logits / 2], -1)
    total = 0.
    for i in range(5):
        for t in range(6):
            z0, z1 = two_way[i, t].tolist()
            z = z1 if targets[i, t] else z0
            total += -(z - math.log(math.exp(z0) + math.exp(z1)))
    assert softmax2_loss(two_way, targets).item() == pytest.approx(total / 30, rel=1e-5)


@pytest.mark.parametrize('gamma, alpha', [(2., None), (2., 0.25), (0.5, 0.75)])
def test_focal_by_hand(batch, gamma, alpha):
    logits, targets = batch
    assert focal_loss(logits, targets, gamma, alpha).item() == pytest.approx(by_hand_focal(logits, targets, gamma, alpha), rel=1e-5)


def test_weighted_focal_by_hand(batch):
    logits, targets = batch
    counts = [10, 200, 35, 0, 4, 51]            # raw positive counts of 6 attributes
    f = [c / sum(counts) for c in counts]
    e = [math.exp(-x) for x in f]
    w = [6 * x / sum(e) for x in e]
    loss = AttributeLoss('weighted_focal', frequencies=counts)
    assert loss(logits, targets).item() == pytest.approx(by_hand_focal(logits, targets, 2., weight=w), rel=1e-5)


def test_celeba_focal_weights():
    w = focal_weights(CELEBA_TRAIN_FREQUENCIES)
    assert w.sum().item() == pytest.approx(40, rel=1e-6)
    order = np.argsort(CELEBA_TRAIN_FREQUENCIES)   # rarer attribute, larger weight
    assert (np.diff(w.numpy()[order]) <= 0).all()


@pytest.mark.parametrize('preset', list(PRESETS) + ['baseline'])
def test_abn_loss_of_every_preset(preset):
    "Each preset's model trains with its loss: perception softmax CE for 2-way heads, BCE otherwise, + attention BCE."
    torch.manual_seed(0)
    model = create_model('resnet10' if preset == 'baseline' else f'abn_{preset}_resnet10')
    targets = torch.randint(0, 2, (2, 40)).float()
    out = model(torch.randn(2, 3, 32, 32))
    total, parts = make_loss('bce', model.preset)(out, targets)
    two_way = model.preset.perception_head == 'softmax2'
    expected = softmax2_loss(out.perception, targets) if two_way else bce_loss(out.perception, targets)
    assert parts['perception'].item() == pytest.approx(expected.item(), rel=1e-5)
    expected_attention = 0. if out.attention is None else bce_loss(out.attention, targets).item()
    assert parts['attention'].item() == pytest.approx(expected_attention, rel=1e-5, abs=1e-7)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def brute_force(decision_logits, targets, train_freq):
    rows = []
    calibration = numpy_calibration_error(torch.sigmoid(decision_logits.double()).numpy(), targets.numpy())
    pred, y = decision_logits.numpy() >= 0, targets.numpy().astype(bool)
    n = len(y)
    for t in range(y.shape[1]):
        tp = int(np.sum(pred[:, t] & y[:, t])); tn = int(np.sum(~pred[:, t] & ~y[:, t]))
        fp = int(np.sum(pred[:, t] & ~y[:, t])); fn = int(np.sum(~pred[:, t] & y[:, t]))
        precision = tp / (tp + fp) if tp + fp else 0.
        recall = tp / (tp + fn) if tp + fn else 0.
        majority = (tp + fn) / n if train_freq[t] >= 0.5 else (tn + fp) / n
        rows.append(dict(accuracy=(tp + tn) / n, balanced_accuracy=(recall + tn / (tn + fp)) / 2 if tp + fn and tn + fp else np.nan, precision=precision,
                         recall=recall, f1=2 * precision * recall / (precision + recall) if precision + recall else 0.,
                         support=tp + fn, num_images=n, positive_frequency=(tp + fn) / n,
                         majority_baseline_accuracy=majority, calibration_error=calibration[t],
                         prior_calibration_error=abs(train_freq[t] - (tp + fn) / n)))
    return pd.DataFrame(rows)


@pytest.mark.parametrize('seed, two_way, baseline', [(0, False, False), (1, True, False), (2, False, True), (3, True, True)])
def test_metrics_against_brute_force(seed, two_way, baseline):
    g = torch.Generator().manual_seed(seed)
    n, T = 53, 7
    targets = (torch.rand(n, T, generator=g) < torch.linspace(0.02, 0.9, T)).float()
    targets[:, 0] = 0                                     # no positives at all
    perception = torch.randn(n, T, 2, generator=g) if two_way else torch.randn(n, T, generator=g)
    perception[:5, 1] = 0                                 # decision logit exactly 0 counts as positive
    attention = None if baseline else torch.randn(n, T, generator=g).round()   # many exact zeros
    train_freq = torch.rand(T, generator=g).tolist()
    metrics = AttributeMetrics([f'a{t}' for t in range(T)], train_positive_frequency=train_freq)
    for start in range(0, n, 10):                          # uneven batches
        sl = slice(start, start + 10)
        metrics.update(ABNOutput(perception[sl], None if baseline else attention[sl], None), targets[sl])
    df = metrics.compute()
    assert list(df.columns) == list(METRIC_COLUMNS)
    decisions = {'perception': perception[..., 1] - perception[..., 0] if two_way else perception}
    if not baseline: decisions['attention'] = attention
    assert sorted(set(df.branch)) == sorted(decisions)
    for branch, logits in decisions.items():
        got = df[df.branch == branch].drop(columns=['attribute', 'branch']).reset_index(drop=True)
        want = brute_force(logits, targets, train_freq)[got.columns]
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-6, atol=1e-7)   # ECE: float32 scores
    summary = summarize(df)
    per = df[df.branch == 'perception']
    assert summary['mean_accuracy'] == pytest.approx(per.accuracy.mean())
    assert summary['undefined_balanced_accuracy'] == 1                    # attribute 0: no positives
    assert summary['mean_balanced_accuracy'] == pytest.approx(per.balanced_accuracy.iloc[1:].mean())
    assert summary['majority_baseline_mean_accuracy'] == pytest.approx(per.majority_baseline_accuracy.mean())
    assert (summary['attention_mean_accuracy'] is None) == baseline


def test_results_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    metrics = AttributeMetrics(['x', 'y'])
    targets = torch.randint(0, 2, (9, 2), generator=g).float()
    metrics.update(ABNOutput(torch.randn(9, 2, generator=g), torch.randn(9, 2, generator=g), None), targets)
    df = metrics.compute()
    summary = write_results(df, tmp_path / 'eval' / 'test', split='test', model='m')
    back = json.loads((tmp_path / 'eval' / 'test' / 'summary.json').read_text())
    assert back == json.loads(json.dumps(summary))
    assert back['per_attribute']['y']['accuracy'] == pytest.approx(df.accuracy[1])
    assert back['per_attribute']['x']['attention_f1'] == pytest.approx(df.f1[2])
    csv = pd.read_csv(tmp_path / 'eval' / 'test' / 'per_attribute.csv')
    pd.testing.assert_frame_equal(csv, df, check_dtype=False)


def test_results_come_to_the_host_once(monkeypatch):
    "A GPU's counts must be copied to the host before pandas sees them (evaluation on CUDA crashed without it)."
    from device_stand_in import DeviceOnlyTensor, on_stand_in_device
    from torchmetrics.classification import MultilabelStatScores
    real_compute = MultilabelStatScores.compute
    monkeypatch.setattr(MultilabelStatScores, 'compute', lambda self: on_stand_in_device(real_compute(self)))
    with pytest.raises(TypeError): np.asarray(on_stand_in_device(torch.ones(3)))          # the stand-in stands in
    with pytest.raises(RuntimeError): torch.where(on_stand_in_device(torch.ones(3)) > 0, torch.ones(3), 0)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 2, (20, 4), generator=g)
    logits = torch.randn(20, 4, generator=g)
    metrics = AttributeMetrics(list('abcd'), train_positive_frequency=[0.1, 0.5, 0.7, 0.3])
    metrics.update(ABNOutput(logits, logits, None), targets)
    df = metrics.compute()
    assert not any(isinstance(v, DeviceOnlyTensor) for v in df.to_numpy().ravel())
    decisions = (logits >= 0).long()
    accuracy = (decisions == targets).double().mean(0).numpy()
    np.testing.assert_allclose(df[df.branch == 'perception'].accuracy, accuracy)
