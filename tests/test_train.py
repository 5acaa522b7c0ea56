"""End-to-end checks of training and evaluation: command-line errors, exact resumption after SIGKILL,
determinism, the NaN stop, DDP under torchrun, the papermill notebook, reference checkpoints, the demo."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from helpers import fake_seed_state_dict, numpy_calibration_error
from multitask_abn.analysis import write_report
from multitask_abn.cli import mtabn_eval, mtabn_predict, mtabn_train
from multitask_abn.data import CELEBA_ATTRIBUTES, CelebADataset, MtabnError, get_transform, load_image
from multitask_abn.explain import predict
from multitask_abn.models import create_model, load_checkpoint, load_model, save_model
from multitask_abn.synth import make_synth_celeba
from multitask_abn.train import Learner, NonFiniteLoss, evaluate, evaluate_run, load_config, make_config, train

PROJECT = Path(__file__).resolve().parents[1]
# precision fixed: precision='auto' (the demo's) probes the machine, and two runs compared bit for bit must not choose apart
TINY = dict(image_size=32, batch_size=8, epochs=2, eval_batch_size=32, progress=False, precision='bf16')
TINY_FLAGS = ['--recipe', 'demo', '--image-size', '32', '--batch-size', '8', '--epochs', '2', '--quiet', '--precision', 'bf16']


@pytest.fixture(scope='session')
def synth(tmp_path_factory):
    "A small SynthCelebA (shared by the tests of this module; never written to)."
    root = tmp_path_factory.mktemp('synth') / 'celeba'
    make_synth_celeba(root, n=64, seed=0)
    return root


@pytest.fixture(scope='session')
def straight_run(tmp_path_factory, synth):
    "An uninterrupted tiny demo-recipe run, the reference of the determinism and resumption tests."
    return train(make_config('demo', data=str(synth), **TINY), tmp_path_factory.mktemp('straight') / 'run')


def final_weights(run):
    return load_checkpoint(Path(run) / 'checkpoints' / 'final.pt')['model_state_dict']


def epoch_metrics(run):
    "metrics.jsonl without the wall-clock times."
    return [{k: v for k, v in json.loads(line).items() if k != 'epoch_time_s'}
            for line in (Path(run) / 'metrics.jsonl').read_text().splitlines()]


def user_error(capsys, fn, **kwargs) -> str:
    "Call a console-script function in-process; it must exit 2 with exactly one stderr line; return it."
    with pytest.raises(SystemExit) as exit_info: fn(**kwargs)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize('overrides, message', [
    (dict(model='abn_v9_resnet18'), "model='abn_v9_resnet18' (--model)"),
    (dict(epochs=-3), 'epochs=-3 (--epochs): must be a positive integer'),
    (dict(batch_size=0), 'batch_size=0 (--batch-size)'),
    (dict(precision='fp8'), "precision='fp8' (--precision)"),
    (dict(recipe='paper'), "unknown recipe 'paper'"),
    (dict(recipe=None), 'no recipe given'),
    (dict(data='MISSING'), 'CelebA folder not found'),
    (dict(resume=True, recipe=None), 'nothing to resume'),   # with a recipe, --resume would start the run
])
def test_train_user_errors(capsys, tmp_path, synth, overrides, message):
    args = dict(recipe='demo', data=str(synth), out=str(tmp_path / 'run'), image_size=32, quiet=True)
    args.update(overrides)
    if args['data'] == 'MISSING': args['data'] = str(tmp_path / 'missing')
    err = user_error(capsys, mtabn_train, **args)
    assert err.startswith('mtabn_train: error: ') and message in err, err
    assert not (tmp_path / 'run').exists(), 'a failed start must not leave a run folder'


def test_eval_user_errors(capsys, tmp_path, synth):
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint at all')
    three = save_model(create_model('abn_v1_resnet10', num_attributes=3), tmp_path / 'three.pt')
    forty = save_model(create_model('abn_v1_resnet10'), tmp_path / 'forty.pt')
    cases = [(dict(path=str(tmp_path / 'nowhere'), data=str(synth)), 'not found'),
             (dict(path=str(garbage), data=str(synth)), 'garbage.pt'),
             (dict(path=str(three), data=str(synth)), 'predicts 3 attributes'),
             (dict(path=str(forty)), 'pass the data folder (--data DIR)'),
             (dict(path=str(forty), data=str(synth), split='holdout'), "unknown split 'holdout'")]
    for kwargs, message in cases:
        err = user_error(capsys, mtabn_eval, image_size=32, **kwargs)
        assert err.startswith('mtabn_eval: error: ') and message in err, err


def test_errors_from_the_command_line(console, tmp_path, synth):
    "The real process: exit status 2, one line on stderr, no traceback (flags spelled with underscores also work)."
    result = console('mtabn_train', '--recipe', 'demo', '--image_size', 32, '--batch_size', 8,
                     '--data', synth, '--out', tmp_path / 'r', '--model', 'resnet999')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and 'Traceback' not in result.stderr
    assert result.stderr.startswith("mtabn_train: error: model='resnet999' (--model)")


def test_flags_are_hyphenated_and_underscores_still_work(console, tmp_path, synth):
    """Every multi-word flag of every console script is shown with hyphens in --help; both spellings parse to
    the same arguments, and `mtabn_train` with hyphenated flags trains the configuration they name (the
    underscore spelling through a real process: `test_errors_from_the_command_line`)."""
    from configparser import ConfigParser
    import multitask_abn.cli as cli
    settings = ConfigParser(); settings.read(PROJECT / 'settings.ini')
    names = [line.split('=')[0].strip() for line in settings['DEFAULT']['console_scripts'].split()]
    assert 'mtabn_train' in names and 'mtabn_eval' in names
    for name in names:
        usage = cli.command_parser(getattr(cli, name).__wrapped__, prog=name).format_usage()
        assert not re.search(r'--\w*_', usage), usage
    shown = console('mtabn_train', '--help').stdout
    assert '--batch-size' in shown and '--image-size' in shown and '--checkpoint-every' in shown and '--batch_size' not in shown
    hyphens = ['--recipe', 'demo', '--epochs', '1', '--quiet', '--data', str(synth), '--out', str(tmp_path / 'run'),
               '--batch-size', '8', '--image-size', '32', '--checkpoint-every', '3', '--precision', 'fp32']
    underscores = [flag.replace('-', '_').replace('__', '--', 1) if flag.startswith('--') else flag for flag in hyphens]
    assert '--checkpoint_every' in underscores
    parser = cli.command_parser(mtabn_train.__wrapped__)
    assert vars(parser.parse_args(hyphens)) == vars(parser.parse_args(underscores))
    result = console('mtabn_train', *hyphens)
    assert result.returncode == 0, result.stderr
    assert load_config(tmp_path / 'run') == make_config('demo', data=str(synth), epochs=1, batch_size=8, image_size=32,
                                                        checkpoint_every=3, progress=False, precision='fp32')


def test_run_folder_is_never_silently_replaced(tmp_path, synth):
    config = make_config('demo', data=str(synth), **{**TINY, 'epochs': 1}, max_train_images=16)
    run = train(config, tmp_path / 'run')
    with pytest.raises(MtabnError, match='--overwrite'): train(config, run)
    (run / 'notes.txt').write_text('a file of the old run')
    train(config, run, overwrite=True)
    assert not (run / 'notes.txt').exists() and (run / 'checkpoints' / 'final.pt').is_file()


def test_same_seed_same_metrics(tmp_path, synth, straight_run):
    again = train(load_config(straight_run), tmp_path / 'again')
    assert epoch_metrics(again) == epoch_metrics(straight_run)
    a, b = final_weights(straight_run), final_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_uint8_batches_normalised_on_the_device_train_the_same(tmp_path, synth, straight_run):
    "device_normalize (the GPU default): uint8 pixels cross to the device and are normalised there; on the CPU the run is the same bit for bit."
    config = replace(load_config(straight_run), device_normalize=True)
    assert Learner(config).train_ds[0][0].dtype == torch.uint8
    again = train(config, tmp_path / 'uint8')
    assert epoch_metrics(again) == epoch_metrics(straight_run)        # validation included
    a, b = final_weights(straight_run), final_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synth):
    config = make_config('demo', data=str(synth), **{**TINY, 'epochs': 3}, lr=1e12, checkpoint_every=1, max_train_images=24)
    with pytest.raises(NonFiniteLoss, match=r'training stopped: the loss \(.*\) or a gradient is not finite.*latest\.pt \(step (\d+)\)') as info:
        train(config, tmp_path / 'run')
    latest = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'latest.pt')
    assert f"(step {latest['step']})" in str(info.value)
    assert all(torch.isfinite(v).all() for v in latest['model_state_dict'].values() if v.is_floating_point())
    assert not (tmp_path / 'run' / 'checkpoints' / 'final.pt').exists()


def test_non_finite_gradient_of_a_finite_loss_changes_no_weight(tmp_path, synth):
    "bf16 has no GradScaler: an inf gradient with a finite loss must neither reach the weights nor a checkpoint."
    config = make_config('demo', data=str(synth), **{**TINY, 'epochs': 1}, checkpoint_every=1, max_train_images=24)
    learner = Learner(config, tmp_path / 'run')
    (tmp_path / 'run').mkdir()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    steps = []
    def poison(grad):                       # the second step's gradient of one weight overflows
        steps.append(1)
        return grad * float('inf') if len(steps) == 2 else grad
    learner.model.att_conv.weight.register_hook(poison)
    with pytest.raises(NonFiniteLoss, match=r'the loss \(\d\.\d+.*\) or a gradient is not finite at epoch 1, step 2; that step did not change'):
        learner.fit()
    latest = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'latest.pt')
    assert latest['step'] == 1
    weights = learner.model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert all(torch.equal(weights[k], v) for k, v in latest['model_state_dict'].items() if k.endswith('weight'))
    assert not all(torch.equal(weights[k], before[k]) for k in before)    # the first step did train
    learner.model.att_conv.weight.data[0, 0] = float('nan')
    with pytest.raises(NonFiniteLoss, match="refusing to write .*latest.pt: the model's weights are not finite"):
        learner.save_latest()


def test_precision_auto_is_measured_recorded_and_kept_on_resume(tmp_path, synth):
    config = make_config('demo', data=str(synth), **{**TINY, 'epochs': 1, 'precision': 'auto'}, max_train_images=16)
    run = train(config, tmp_path / 'run')
    saved = load_config(run)
    assert saved.precision in ('fp32', 'bf16') and saved.precision_probe['chosen'] == saved.precision
    assert set(saved.precision_probe['seconds_per_step']) == {'fp32', 'bf16'}
    train(config, run, resume=True, epochs=2)               # 'auto' again: the recorded choice, not a new probe
    assert load_config(run).precision_probe == saved.precision_probe


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(console, tmp_path, synth, straight_run):
    """Kill a training process (SIGKILL) after its first mid-epoch checkpoint, resume it from the command
    line, and compare with an uninterrupted run: same final weights bit for bit, same metrics."""
    run = tmp_path / 'killed'
    latest = run / 'checkpoints' / 'latest.pt'
    process = subprocess.Popen(console.command('mtabn_train', *TINY_FLAGS, '--data', synth, '--out', run,
                                               '--checkpoint-every', 2), stderr=subprocess.PIPE, text=True)
    versions = set()                           # each atomic save is a new file (inode): step 0, then step 2
    while len(versions) < 2 and process.poll() is None:
        try: versions.add(os.stat(latest).st_ino)
        except FileNotFoundError: pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    assert not (run / 'checkpoints' / 'final.pt').exists()
    killed_at = load_checkpoint(latest)
    assert killed_at['batch_in_epoch'] > 0, 'the kill should land mid-epoch'
    resumed = console('mtabn_train', '--out', run, '--resume', '--quiet')
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(straight_run), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert epoch_metrics(straight_run) == epoch_metrics(run)


def test_reference_checkpoint_evaluation(tmp_path, synth):
    """A checkpoint as the reference's training script leaves it (its key/shape list filled with random weights,
    module.* keys, its args.json beside it) is evaluated like the reference would feed it (fukui2019 transform),
    checked against an evaluation written out here: the weights loaded by hand, logit >= 0 counted with numpy, the
    majority baseline from the train split's labels."""
    keys = json.loads((PROJECT / 'tests' / 'data' / 'seed_state_dict_keys' / 'mtabn_v1_resnet18.json').read_text())
    state = fake_seed_state_dict(keys, seed=3)
    (tmp_path / 'reference').mkdir()
    torch.save({'epoch': 5, 'iteration': 10, 'best_score': 0.5, 'model_state_dict': state, 'optimizer_state_dict': {},
                'scheduler_state_dict': {}}, tmp_path / 'reference' / 'checkpoint-best.pt')
    (tmp_path / 'reference' / 'args.json').write_text((PROJECT / 'tests' / 'data' / 'reference_args.json').read_text())
    summary = evaluate_run(tmp_path / 'reference' / 'checkpoint-best.pt', data=synth, split='test', image_size=32, progress=False)
    model = create_model('abn_v1_resnet18')
    model.load_state_dict({k.removeprefix('module.').replace('conv_att.', 'att_conv.'): v for k, v in state.items()})
    dataset = CelebADataset(synth, 'test', transform=get_transform('fukui2019', 32))
    with torch.no_grad():
        logits = torch.cat([model.eval()(x).perception for x, _ in torch.utils.data.DataLoader(dataset, 16)]).numpy()
    labels = dataset.labels.numpy().astype(bool)
    accuracy = ((logits >= 0) == labels).mean(0)
    train_labels = CelebADataset(synth, 'train').labels.numpy()
    majority = np.where(train_labels.mean(0) >= 0.5, labels.mean(0), 1 - labels.mean(0))
    assert summary['model'] == 'abn_v1_resnet18' and summary['transform'] == 'fukui2019' and summary['num_images'] == len(dataset)
    assert [summary['per_attribute'][a]['accuracy'] for a in CELEBA_ATTRIBUTES] == pytest.approx(accuracy, abs=1e-12)
    assert summary['mean_accuracy'] == pytest.approx(accuracy.mean(), abs=1e-12)
    assert summary['majority_baseline_mean_accuracy'] == pytest.approx(majority.mean(), abs=1e-12)


def test_tuned_thresholds_and_calibration_end_to_end(console, capsys, tmp_path, synth, straight_run):
    """`--thresholds accuracy` tunes the run's thresholds on valid (RUN/thresholds.json) and uses them in mtabn_eval,
    mtabn_predict and mtabn_report; the default evaluation and report stay logit >= 0; the calibration error in the
    summary equals one written out with numpy."""
    run = Path(shutil.copytree(straight_run, tmp_path / 'run'))
    result = console('mtabn_eval', run, '--split', 'test', '--thresholds', 'accuracy', '--quiet')
    assert result.returncode == 0, result.stderr
    assert 'tuning decision thresholds on the valid split' in result.stdout and 'thresholds tuned for accuracy' in result.stdout
    saved = json.loads((run / 'thresholds.json').read_text())
    chosen = np.array([saved['criteria']['accuracy']['thresholds'][a] for a in CELEBA_ATTRIBUTES])
    tuned = json.loads((run / 'eval' / 'test' / 'thresholds_accuracy' / 'summary.json').read_text())
    default = evaluate_run(run, split='test', progress=False)
    model, config = load_model(run), load_config(run)
    dataset = CelebADataset(synth, 'test', transform=get_transform(config.transform, config.image_size))
    with torch.no_grad():
        logits = torch.cat([model(x).perception for x, _ in torch.utils.data.DataLoader(dataset, 16)]).double().numpy()
    labels = dataset.labels.numpy().astype(bool)
    for summary, cut in ((tuned, chosen), (default, 0)):
        assert [summary['per_attribute'][a]['accuracy'] for a in CELEBA_ATTRIBUTES] == pytest.approx(((logits >= cut) == labels).mean(0), abs=1e-12)
    assert (tuned['thresholds'], default['thresholds']) == ('accuracy', 'default')
    # the probabilities as the metric gets them, a float32 sigmoid (one that rounds to 1.0 falls in the last bin of its own)
    expected = numpy_calibration_error(torch.sigmoid(torch.from_numpy(logits).float()).numpy(), labels)
    assert [default['per_attribute'][a]['calibration_error'] for a in CELEBA_ATTRIBUTES] == pytest.approx(expected, abs=1e-6)
    assert default['mean_calibration_error'] == pytest.approx(expected.mean(), abs=1e-6) == tuned['mean_calibration_error']
    # predict: the same thresholds decide; the scores are the sigmoid of the logits
    image = CelebADataset(synth, 'test').celeba.root / 'img_align_celeba' / CelebADataset(synth, 'test').filenames[0]
    table = predict(run, [image], tmp_path / 'predicted', grids=False, thresholds='accuracy', align=False)
    scores = table[[f'{a}_score' for a in CELEBA_ATTRIBUTES]].to_numpy()[0]
    assert scores == pytest.approx(1 / (1 + np.exp(-logits[0])), abs=1e-4)   # one image per batch here, 16 above
    with torch.no_grad(): own = model(get_transform(config.transform, config.image_size)(load_image(image))[None]).perception[0]
    assert table[list(CELEBA_ATTRIBUTES)].to_numpy()[0].tolist() == (own.double().numpy() >= chosen).astype(int).tolist()
    messages = []
    predict(run, [image], tmp_path / 'noted', grids=False, align=False, report=messages.append)
    assert any('trained with pos_weight' in m for m in messages), messages
    for thresholds, decisions in (('accuracy', 'Decisions: per-attribute thresholds tuned for accuracy on the valid split'),
                                  ('default', 'Decisions: `logit >= 0`')):
        text = write_report([run], tmp_path / thresholds, thresholds=thresholds).with_suffix('.md').read_text()
        assert decisions in text and 'prior calibration error' in text
    capsys.readouterr()
    err = user_error(capsys, mtabn_predict, paths=[str(image)], checkpoint=str(run), out=str(tmp_path / 'f1'), thresholds='f1')
    assert 'choose one of default, accuracy, balanced_accuracy' in err


def test_eval_save_attention(console, capsys, tmp_path, synth, straight_run):
    "`mtabn_eval --save-attention` writes one attention grid per evaluated image; a baseline is a one-line error."
    result = console('mtabn_eval', straight_run, '--split', 'valid', '--max-images', 3,
                     '--save-attention', '--out', tmp_path / 'eval', '--quiet')
    assert result.returncode == 0, result.stderr
    expected = [f"{Path(name).stem}.jpg" for name in CelebADataset(synth, 'valid').filenames[:3]]
    grids = sorted((tmp_path / 'eval' / 'valid' / 'attention').iterdir())
    assert [g.name for g in grids] == sorted(expected)
    for grid in grids:
        with Image.open(grid) as image: assert image.format == 'JPEG' and min(image.size) >= 32
    assert json.loads((tmp_path / 'eval' / 'valid' / 'summary.json').read_text())['num_images'] == 3
    baseline = save_model(create_model('resnet10'), tmp_path / 'baseline.pt')
    err = user_error(capsys, mtabn_eval, path=str(baseline), data=str(synth), image_size=32, save_attention=True)
    assert err.startswith('mtabn_eval: error: ') and 'baseline model without attention maps' in err, err
    assert not (tmp_path / 'baseline_eval').exists(), 'the error comes before any evaluation output'


def test_ddp_two_processes(tmp_path, synth, console):
    """torchrun --nproc_per_node 2 on CPU (gloo), in float32 (the demo recipe's bf16 rounds differently per batch
    shape): rank 0 writes one run folder. Both processes validate with
    the same weights and rank 0's BatchNorm running statistics (each rank updates its own in the last step),
    so what rank 0 records equals a single-process evaluation of the saved checkpoints: the metrics exactly,
    the validation loss to float tolerance (without the broadcast the loss differs by ~1 %)."""
    run = tmp_path / 'ddp'
    result = subprocess.run([Path(sys.executable).parent / 'torchrun', '--standalone', '--nproc_per_node', '2', '--no-python',
                             console.folder / 'mtabn_train', *TINY_FLAGS, '--precision', 'fp32', '--data', synth, '--out', run],
                            capture_output=True, text=True, env={**os.environ, 'TMPDIR': str(tmp_path)})   # torchrun's temp folder too
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    best = load_checkpoint(run / 'checkpoints' / 'best.pt')
    for name, record in (('final.pt', records[-1]), ('best.pt', records[best['epoch'] - 1])):
        single = evaluate_run(run / 'checkpoints' / name, split='valid', out=tmp_path / name, progress=False)
        for key in ('mean_accuracy', 'mean_balanced_accuracy', 'attention_mean_accuracy'):
            assert single[key] == pytest.approx(record[f'valid_{key}'], abs=1e-12), (name, key)
    learner = Learner(load_config(run))
    learner.model.load_state_dict(final_weights(run))
    _, loss = evaluate(learner.model, learner.valid_ds, loss_fn=learner.loss_fn, train_frequency=learner.train_frequency)
    assert loss == pytest.approx(records[-1]['valid_loss'], rel=1e-6)
    assert len(list((run / 'tb').iterdir())) == 1


def test_ddp_equals_one_process_on_the_same_global_batch(tmp_path, synth, console):
    """2 gloo processes with synchronised BatchNorm train what one process trains on the same global batches (to float
    tolerance: sums run in another order), and validation on fewer images than processes (rank 1's shard is empty)
    finishes instead of waiting forever for that rank's metric synchronisation."""
    flags = [*TINY_FLAGS, '--epochs', '1', '--precision', 'fp32', '--set', 'max_train_images=16', '--set', 'max_eval_images=1',
             '--data', synth]
    env = {**os.environ, 'TMPDIR': str(tmp_path), 'OMP_NUM_THREADS': '1'}   # as torchrun's processes: the same summation order
    result = subprocess.run([Path(sys.executable).parent / 'torchrun', '--standalone', '--nproc_per_node', '2', '--no-python',
                             console.folder / 'mtabn_train', *flags, '--out', tmp_path / 'ddp'],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'Grad strides do not match' not in result.stderr
    single = subprocess.run(console.command('mtabn_train', *flags, '--out', tmp_path / 'single'), capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp, one = final_weights(tmp_path / 'ddp'), final_weights(tmp_path / 'single')
    for name in one:   # unsynchronised BatchNorm: 127 of 156 tensors differ, by up to 137
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-3, atol=1e-3, msg=lambda message, name=name: f'{name}: {message}')
    (ddp_record,), (one_record,) = epoch_metrics(tmp_path / 'ddp'), epoch_metrics(tmp_path / 'single')
    assert ddp_record['train_loss'] == pytest.approx(one_record['train_loss'], rel=1e-5)
    assert ddp_record['valid_mean_accuracy'] == one_record['valid_mean_accuracy']


@pytest.mark.slow
def test_papermill_train_run(tmp_path, synth):
    run = tmp_path / 'run'
    result = subprocess.run([Path(sys.executable).parent / 'papermill', 'nbs/train_run.ipynb', str(tmp_path / 'out.ipynb'),
                             '-p', 'data', str(synth), '-p', 'out', str(run), '-p', 'epochs', '2', '-p', 'seed', '3',
                             '--cwd', 'nbs'], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / 'config.json').read_text())['seed'] == 3
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 2
    assert 'majority_baseline_mean_accuracy' in json.loads((run / 'eval' / 'test' / 'summary.json').read_text())


@pytest.mark.slow
def test_demo_learns(tmp_path, console):
    "The demo on a fresh machine: generate, train, evaluate. It must learn well beyond the majority baseline."
    start = time.perf_counter()
    result = console('mtabn_demo', '--data', tmp_path / 'synth', '--out', tmp_path / 'demo')
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / 'demo' / 'eval' / 'test' / 'summary.json').read_text())
    good = sum(v['accuracy'] >= 0.9 for v in summary['per_attribute'].values())
    print(f"\ndemo: {seconds:.0f} s, mean test accuracy {summary['mean_accuracy']:.4f}, majority baseline "
          f"{summary['majority_baseline_mean_accuracy']:.4f}, {good} attributes >= 90 %")
    assert summary['mean_accuracy'] >= summary['majority_baseline_mean_accuracy'] + 0.08
    assert good >= 10
    assert re.search(r'mtabn_demo: \d+ s in all .* on .+, \d+ cores', result.stdout.splitlines()[-1]), result.stdout[-500:]
