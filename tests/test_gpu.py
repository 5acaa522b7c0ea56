"""The CUDA path end to end on SynthCelebA: training (bf16 by default, exact resume under deterministic settings), evaluation,
explanations and prediction on the GPU, each checked against the CPU. Marked `gpu`: skipped without CUDA; run with
`make gpu-check` (which adds the benchmark's JSON line)."""
import json
from dataclasses import replace
from pathlib import Path
import pytest
import torch
from multitask_abn.explain import explain_run, predict
from multitask_abn.models import load_checkpoint, load_model
from multitask_abn.synth import make_synth_celeba
from multitask_abn.data import normalize_images
from multitask_abn.train import Learner, evaluate, evaluate_run, load_config, make_config, make_dataset, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU here (run on a GPU machine: make gpu-check)')]
GPU = dict(image_size=64, batch_size=32, epochs=2, eval_batch_size=128, progress=False, device='cuda', workers=2)


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth') / 'celeba'
    make_synth_celeba(root, n=400, seed=0, num_workers=4)
    return root


@pytest.fixture(scope='module')
def gpu_run(synth, tmp_path_factory):
    return train(make_config('demo', data=str(synth), **GPU), tmp_path_factory.mktemp('gpu') / 'run')


def final_weights(run): return load_checkpoint(Path(run) / 'checkpoints' / 'final.pt')['model_state_dict']


def test_training_on_the_gpu_learns_in_bf16(gpu_run):
    config = load_config(gpu_run)
    assert config.precision == 'bf16' and config.precision_probe['chosen'] == 'bf16', config.precision_probe
    records = [json.loads(line) for line in (gpu_run / 'metrics.jsonl').read_text().splitlines()]
    assert records[-1]['train_loss'] < records[0]['train_loss']
    assert all(torch.isfinite(v).all() for v in final_weights(gpu_run).values() if v.is_floating_point())


def test_uint8_batches_are_normalised_on_the_gpu_as_on_the_host(synth):
    learner = Learner(make_config('demo', data=str(synth), **GPU))      # device_normalize=None: on, since the device is a GPU
    images, _ = next(iter(learner.loader))
    assert images.dtype == torch.uint8 and images.is_pinned()
    pixels = learner.train_ds[0][0]
    on_host = make_dataset(learner.config, 'train')[0][0]              # the float32 transform, normalised on the CPU
    assert torch.allclose(normalize_images(pixels[None].cuda(), 'eval')[0].cpu(), on_host, atol=1e-6)


def test_evaluation_on_the_gpu_equals_the_cpu(gpu_run, tmp_path):
    gpu = evaluate_run(gpu_run, split='valid', device='cuda', out=tmp_path / 'gpu', progress=False)
    cpu = evaluate_run(gpu_run, split='valid', device='cpu', out=tmp_path / 'cpu', progress=False)
    assert gpu['num_images'] == cpu['num_images']
    assert gpu['mean_accuracy'] == pytest.approx(cpu['mean_accuracy'], abs=2 / gpu['num_images'])   # TF32/cuDNN rounding


def test_deterministic_gpu_resume_is_exact(synth, tmp_path):
    config = make_config('demo', data=str(synth), **GPU, deterministic=True, checkpoint_every=3, max_train_images=128)
    straight = train(config, tmp_path / 'straight')
    train(replace(config, epochs=1), tmp_path / 'resumed')
    resumed = train(None, tmp_path / 'resumed', resume=True, epochs=2)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explain_and_predict_on_the_gpu(gpu_run, synth, tmp_path):
    summary = explain_run(gpu_run, split='valid', n=4, metrics_images=16, road_images=1, device='cuda', progress=False)
    assert (gpu_run / 'explain' / 'valid' / 'explanation_table.csv').is_file() and summary is not None
    images = sorted((synth / 'img_align_celeba').glob('*.jpg'))[:4]
    table = predict(gpu_run, images, tmp_path / 'pred', align=False, device='cuda')
    cpu = predict(gpu_run, images, tmp_path / 'pred_cpu', align=False, device='cpu')
    scores = [c for c in table.columns if c.endswith('_score')]
    assert len(scores) == 40 and (table[scores] - cpu[scores]).abs().to_numpy().max() < 0.02


def test_ddp_style_evaluation_moves_counts_to_the_host(gpu_run):
    learner = Learner(load_config(gpu_run))
    learner.model.load_state_dict(final_weights(gpu_run))
    df, loss = evaluate(learner.model, learner.valid_ds, device=learner.device, loss_fn=learner.loss_fn,
                        train_frequency=learner.train_frequency)
    assert df.accuracy.dtype.kind == 'f' and loss > 0


def test_compiled_training_step_on_the_gpu(synth, tmp_path):
    config = make_config('demo', data=str(synth), **{**GPU, 'epochs': 1}, max_train_images=128, precision='bf16')
    plain, compiled = train(config, tmp_path / 'plain'), train(replace(config, compile=True), tmp_path / 'compiled')
    a, b = final_weights(plain), final_weights(compiled)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=0.05, atol=0.05) for k in a if a[k].is_floating_point())
