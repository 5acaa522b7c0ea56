"Helpers shared by the tests and the notebooks' examples: test data and independent computations, not package API."
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multitask_abn.analysis import ATTRIBUTE_METRICS
from multitask_abn.data import CELEBA_ATTRIBUTES, NUM_ATTRIBUTES


def numpy_calibration_error(probabilities, labels, bins: int = 15) -> np.ndarray:
    """Expected calibration error per column, written out: bin b holds the probabilities in [b/bins, (b+1)/bins) (1.0 in
    a bin of its own, as torchmetrics does), and each bin adds |share of positives - mean probability| x its share of images."""
    errors = []
    for p, y in zip(np.asarray(probabilities, float).T, np.asarray(labels, float).T):
        which = np.floor(p * bins).astype(int)
        errors.append(sum(abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean() for b in np.unique(which)))
    return np.array(errors)


def fake_seed_state_dict(shapes: dict, seed: int = 0) -> dict:
    "A random state_dict with the given key -> shape list (positive variances, integer batch counters)."
    g = torch.Generator().manual_seed(seed)
    def tensor(key, shape):
        if key.endswith('num_batches_tracked'): return torch.tensor(int(torch.randint(1, 1000, (), generator=g)))
        value = torch.randn(shape, generator=g)
        return value.abs() + 0.5 if key.endswith('running_var') else value
    return {k: tensor(k, v) for k, v in shapes.items()}


def _rates_to_metrics(tpr, tnr, p):
    "Per-attribute metrics of a classifier with true-positive rate `tpr`, true-negative rate `tnr` at positive frequency `p`."
    predicted_positive = p * tpr + (1 - p) * (1 - tnr)
    precision = np.divide(p * tpr, predicted_positive, out=np.zeros_like(p), where=predicted_positive > 0)
    f1 = np.divide(2 * precision * tpr, precision + tpr, out=np.zeros_like(p), where=(precision + tpr) > 0)
    return dict(accuracy=p * tpr + (1 - p) * tnr, balanced_accuracy=(tpr + tnr) / 2,
                precision=precision, recall=tpr, f1=f1)


def write_fake_run(run_dir, *, model='abn_v1_resnet18', recipe='v1', data='/nonexistent/SynthCelebA', seed=0,
                   epochs=3, splits=('valid', 'test'), attention=True, skill=0.7, num_images=500) -> Path:
    "Write a well-formed run folder with made-up, self-consistent numbers (test data for the analysis tests and notebook)."
    run, rng = Path(run_dir), np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    config = dict(recipe=recipe, model=model, data=str(data), image_size=64, epochs=epochs, batch_size=8,
                  lr=0.01, milestones=[4, 8], seed=seed)
    (run / 'config.json').write_text(json.dumps(config, indent=2))
    with open(run / 'metrics.jsonl', 'w') as f:
        for epoch in range(1, epochs + 1):
            loss = 0.25 + 0.5 * math.exp(-epoch / (1 + 2 * skill)) + rng.normal(0, 0.01)
            f.write(json.dumps(dict(
                epoch=epoch, step=epoch * 100, lr=0.01 * 0.1 ** ((epoch - 1) // 4), train_loss=loss,
                train_perception_loss=loss / 2, train_attention_loss=loss / 2, valid_loss=loss + 0.05,
                valid_mean_accuracy=0.75 + 0.2 * skill - 0.1 / epoch, valid_mean_balanced_accuracy=0.5 + 0.3 * skill - 0.2 / epoch,
                valid_attention_mean_accuracy=0.73 + 0.2 * skill - 0.1 / epoch if attention else None, epoch_time_s=60.0)) + '\n')
    # Attribute frequencies are a property of the data, so every fake run shares them.
    support = np.round(np.random.default_rng(1701).uniform(0.03, 0.85, NUM_ATTRIBUTES) * num_images)
    p = support / num_images
    for split in splits:
        rows = []
        for branch in ('perception', 'attention') if attention else ('perception',):
            branch_skill = skill if branch == 'perception' else 0.9 * skill
            tpr = np.clip(branch_skill * (0.5 + p) + rng.normal(0, 0.05, NUM_ATTRIBUTES), 0.01, 0.99)
            tnr = np.clip(branch_skill * (1.5 - p) + rng.normal(0, 0.05, NUM_ATTRIBUTES), 0.01, 0.99)
            rows.append(pd.DataFrame(dict(attribute=CELEBA_ATTRIBUTES, branch=branch, **_rates_to_metrics(tpr, tnr, p),
                                          support=support.astype(int), num_images=num_images, positive_frequency=p,
                                          majority_baseline_accuracy=np.maximum(p, 1 - p))))
        table = pd.concat(rows, ignore_index=True)
        (run / 'eval' / split).mkdir(parents=True, exist_ok=True)
        table.to_csv(run / 'eval' / split / 'per_attribute.csv', index=False)
        means = table.groupby('branch')[['accuracy', 'balanced_accuracy']].mean()
        perception = table[table.branch == 'perception'].set_index('attribute')
        summary = dict(split=split, num_images=num_images, model=model, checkpoint='checkpoints/best.pt',
                       mean_accuracy=means.loc['perception', 'accuracy'],
                       mean_balanced_accuracy=means.loc['perception', 'balanced_accuracy'],
                       majority_baseline_mean_accuracy=perception.majority_baseline_accuracy.mean(),
                       attention_mean_accuracy=means.loc['attention', 'accuracy'] if attention else None,
                       attention_mean_balanced_accuracy=means.loc['attention', 'balanced_accuracy'] if attention else None,
                       per_attribute=perception[list(ATTRIBUTE_METRICS)].to_dict('index'))
        (run / 'eval' / split / 'summary.json').write_text(json.dumps(summary, indent=1))
    return run
