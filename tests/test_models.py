"Registry sweep, exact execution modes, reference-checkpoint import/export and loading rules of `multitask_abn.models`."
import argparse, dataclasses, json, os
from pathlib import Path

import pytest
import torch

from multitask_abn.data import MtabnError
from helpers import fake_seed_state_dict
from multitask_abn.models import (PRESETS, ABNOutput, attribute_logits, create_model, execution_differences,
                                  fold_batchnorm, list_models, load_model,
                                  load_seed_checkpoint, optimize_for_inference, save_model, save_seed_checkpoint)

SEED_KEYS = Path(__file__).parent / 'data' / 'seed_state_dict_keys'
REFERENCE_ARGS = json.loads((Path(__file__).parent / 'data' / 'reference_args.json').read_text())   # see data/README.md
SEED_MODELS = {'mtabn_v1_resnet18': 'abn_v1_resnet18', 'mtabn_v1_resnet50': 'abn_v1_resnet50',
               'mtabn_v1_resnet101': 'abn_v1_resnet101', 'mtabn_v2_resnet18': 'abn_v2_resnet18',
               'mtabn_v2_resnet101': 'abn_v2_resnet101', 'resnet18': 'resnet18', 'resnet101': 'resnet101'}


def forward_backward(name, batch, size):
    model = create_model(name).train()
    out = model(torch.randn(batch, 3, size, size))
    assert isinstance(out, ABNOutput)
    head = (2,) if model.preset.perception_head == 'softmax2' else ()
    assert out.perception.shape == (batch, 40, *head)
    if model.preset.attention_branch:
        assert out.attention.shape == (batch, 40)
        assert out.maps.shape == (batch, 40, size // 16, size // 16)
    else: assert out.attention is None and out.maps is None
    loss = sum(o.float().square().mean() for o in out if o is not None)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', [f'abn_{p}_resnet18' for p in PRESETS] + ['resnet18'])
@pytest.mark.parametrize('batch', [1, 2])
def test_resnet18_family_forward_backward_64px(name, batch):
    forward_backward(name, batch, 64)


@pytest.mark.slow
@pytest.mark.parametrize('name', list_models())
def test_every_registry_model_forward_backward(name):
    for size in (64, 224):
        for batch in (1, 2): forward_backward(name, batch, size)


def test_registry_names_and_spec_round_trip():
    names = list_models()
    assert 'abn_v1_resnet101' in names and 'abn_fukui2019_resnet152' in names and 'resnet50' in names
    for name in ('abn_mitsuhara2020_resnet10', 'resnet10'):
        model = create_model(name, num_attributes=3, perception_head='softmax2')
        rebuilt = create_model(**json.loads(json.dumps(model.spec)))
        assert rebuilt.spec == model.spec and rebuilt.preset == model.preset
    with pytest.raises(MtabnError, match='unknown model'): create_model('abn_v3_resnet101')
    with pytest.raises(MtabnError, match='unknown option'): create_model('abn_v1_resnet18', residual=True)


def test_attribute_decisions_agree_between_head_types():
    two_way = torch.randn(4, 40, 2)
    assert torch.equal(attribute_logits(two_way) >= 0, two_way.argmax(-1) == 1)


def assert_exact(diffs):
    assert diffs['same_gradients'], diffs
    assert max(diffs['outputs'], diffs['gradients'], diffs['buffers']) < 1e-8, diffs


EQUIVALENCE_CASES = [  # name, num_attributes, preset overrides, execution options
    ('abn_v1_resnet10', 7, {}, dict(attributes_per_pass=3)),
    ('abn_fukui2019_resnet10', 5, {}, dict(attributes_per_pass=40)),
    ('abn_v2_resnet50', 3, dict(residual_attention=True), dict(attributes_per_pass=2, linear_shortcut=True)),
    ('abn_v1_resnet10', 5, {}, dict(attributes_per_pass=2, channels_last=True)),   # stacked BatchNorm in channels-last order
    pytest.param('abn_v1_resnet18', 7, dict(residual_attention=True), dict(attributes_per_pass=4), marks=pytest.mark.slow),
    pytest.param('abn_mitsuhara2020_resnet50', 7, {}, dict(attributes_per_pass=4, linear_shortcut=True), marks=pytest.mark.slow),
    pytest.param('abn_fukui2019_resnext50_32x4d', 5, {}, dict(attributes_per_pass=3, linear_shortcut=True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize('name,num_attributes,preset,options', EQUIVALENCE_CASES)
@pytest.mark.parametrize('train', [False, True])
def test_chunked_execution_equals_loop_in_float64(name, num_attributes, preset, options, train):
    torch.manual_seed(0)
    model = create_model(name, num_attributes=num_attributes, **preset).double()
    x = torch.randn(2 if num_attributes < 7 else 3, 3, 48, 48, dtype=torch.float64)
    assert_exact(execution_differences(model, x, train=train, perception='chunked', **options))


def test_chunked_training_updates_running_stats_like_the_loop():
    torch.manual_seed(0)
    model = create_model('abn_v1_resnet10', num_attributes=5).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    counters = []
    for perception in ('loop', 'chunked'):
        copy = create_model(**{**model.spec, 'perception': perception}).double()
        copy.load_state_dict(model.state_dict())
        copy.set_execution(attributes_per_pass=2).train()
        copy(x)
        counters.append(int(copy.layer4[0].bn1.num_batches_tracked))
    assert counters == [5, 5]


def test_inference_switches_keep_float32_results():
    torch.manual_seed(0)
    model = create_model('abn_v2_resnet50', num_attributes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        for options in (dict(), dict(channels_last=False), dict(fold_bn=False, attributes_per_pass=3)):
            got = optimize_for_inference(model, **options)(x)
            for a, b in zip(expected, got):
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        bf16 = optimize_for_inference(model, bf16=True)(x)
        assert bf16.perception.dtype == torch.float32 and torch.isfinite(bf16.perception).all()


def test_bf16_training_step_runs():
    model = create_model('abn_v1_resnet10', num_attributes=4).set_execution(bf16=True).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(o.square().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def reference_checkpoint(path: Path, seed_name: str, seed: int = 0, args_json: dict | None = None, **extra) -> dict:
    "A checkpoint as the reference's training script leaves it: the file, and its args.json beside it (`args_json`: changes)."
    shapes = json.loads((SEED_KEYS / f'{seed_name}.json').read_text())
    state = fake_seed_state_dict(shapes, seed=seed)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), [4, 8])
    torch.save({'epoch': 7, 'iteration': 123, 'best_score': 0.91, 'model_state_dict': state,
                'optimizer_state_dict': {'state': {}, 'param_groups': []},
                'scheduler_state_dict': scheduler.state_dict(), **extra}, path)
    (path.parent / 'args.json').write_text(json.dumps({**REFERENCE_ARGS, 'model': seed_name, **(args_json or {})}, indent=4))
    return state


@pytest.mark.parametrize('seed_name', sorted(SEED_MODELS))
def test_reference_checkpoint_round_trip_is_exact(tmp_path, seed_name):
    state = reference_checkpoint(tmp_path / 'checkpoint-best.pt', seed_name)
    model = load_seed_checkpoint(tmp_path / 'checkpoint-best.pt')
    assert model.spec['name'] == SEED_MODELS[seed_name]
    assert model.perception == 'loop' and not model.training
    assert model.checkpoint_info == {'epoch': 7, 'iteration': 123, 'best_score': 0.91}
    save_seed_checkpoint(model, tmp_path / 'out' / 'exported.pt', epoch=7)
    exported = torch.load(tmp_path / 'out' / 'exported.pt', weights_only=True)
    assert list(exported['model_state_dict']) == list(state)
    for key, value in state.items():
        assert exported['model_state_dict'][key].dtype == value.dtype
        assert torch.equal(exported['model_state_dict'][key], value), key
    args = json.loads((tmp_path / 'out' / 'args.json').read_text())
    assert args['model'] == seed_name
    again = load_model(tmp_path / 'out' / 'exported.pt')
    assert again.spec == model.spec


def test_reference_options_from_args_json(tmp_path):
    reference_checkpoint(tmp_path / 'checkpoint-latest.pt', 'mtabn_v2_resnet18', args_json=dict(residual_attention=True))
    model = load_seed_checkpoint(tmp_path / 'checkpoint-latest.pt')
    assert model.preset.residual_attention and model.preset.perception_head == 'softmax2'
    assert not load_seed_checkpoint(tmp_path / 'checkpoint-latest.pt', residual_attention=False).preset.residual_attention
    # a round trip keeps every preset option, including ones the weights cannot show
    custom = create_model('abn_v1_resnet10', num_attributes=3, attention_pooling='max', attention_activation='sigmoid')
    save_seed_checkpoint(custom, tmp_path / 'custom' / 'checkpoint.pt')
    assert load_seed_checkpoint(tmp_path / 'custom' / 'checkpoint.pt').preset == custom.preset


def test_weights_without_args_json_do_not_choose_the_model(tmp_path):
    "The weights show neither attention pooling, activation nor residual attention: without args.json, one line says so."
    depthwise = create_model('abn_v1_resnet10', num_attributes=3, attention_depthwise=True)   # avg pooling, no sigmoid
    save_seed_checkpoint(depthwise, tmp_path / 'checkpoint-best.pt')
    (tmp_path / 'args.json').unlink()
    for load in (load_seed_checkpoint, load_model):
        with pytest.raises(MtabnError, match=r"checkpoint-best.pt: the weights show a depthwise attention conv, 1 logit per "
                                             r"attribute but not attention_activation, attention_pooling, residual_attention"):
            load(tmp_path / 'checkpoint-best.pt')
    named = load_seed_checkpoint(tmp_path / 'checkpoint-best.pt', name='abn_v1_resnet10', attention_depthwise=True)
    assert named.preset == depthwise.preset
    (tmp_path / 'args.json').write_text(json.dumps({'model': 'abn_mitsuhara2020_resnet10'}))    # a registry name settles it
    assert load_model(tmp_path / 'checkpoint-best.pt').preset == PRESETS['mitsuhara2020']
    # the reference's own args.json: its model name, and residual_attention, which it always writes
    (tmp_path / 'v1').mkdir()
    reference_checkpoint(tmp_path / 'v1' / 'checkpoint-best.pt', 'mtabn_v1_resnet18', args_json=dict(residual_attention=True))
    assert load_model(tmp_path / 'v1' / 'checkpoint-best.pt').preset == dataclasses.replace(PRESETS['v1'], residual_attention=True)
    (tmp_path / 'v1' / 'args.json').write_text(json.dumps({'model': 'mtabn_v1_resnet18'}))
    with pytest.raises(MtabnError, match='names mtabn_v1_resnet18 but not residual_attention'): load_model(tmp_path / 'v1' / 'checkpoint-best.pt')
    (tmp_path / 'v1' / 'args.json').write_text(json.dumps({**REFERENCE_ARGS, 'model': 'mtabn_v3_resnet18'}))
    with pytest.raises(MtabnError, match="names model 'mtabn_v3_resnet18', which is neither"): load_model(tmp_path / 'v1' / 'checkpoint-best.pt')


def test_pickled_objects_are_refused(tmp_path):
    reference_checkpoint(tmp_path / 'evil.pt', 'mtabn_v1_resnet18', args=argparse.Namespace(lr=0.1))
    for load in (load_seed_checkpoint, load_model):
        with pytest.raises(MtabnError, match='pickled Python objects'): load(tmp_path / 'evil.pt')


def test_wrong_architecture_lists_the_mismatch(tmp_path):
    reference_checkpoint(tmp_path / 'r18.pt', 'mtabn_v1_resnet18')
    with pytest.raises(MtabnError, match=r'missing.*layer'): load_seed_checkpoint(tmp_path / 'r18.pt', name='abn_v1_resnet34')
    with pytest.raises(MtabnError, match='other shape'): load_seed_checkpoint(tmp_path / 'r18.pt', name='abn_v2_resnet18')
    truncated = json.loads((SEED_KEYS / 'mtabn_v1_resnet18.json').read_text())
    truncated.pop('module.layer4_att.1.conv2.weight')
    torch.save({'model_state_dict': fake_seed_state_dict(truncated)}, tmp_path / 'truncated.pt')   # beside r18.pt's args.json
    with pytest.raises(MtabnError, match='layer4_att.1.conv2.weight'): load_seed_checkpoint(tmp_path / 'truncated.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(MtabnError, match='not a readable'): load_model(tmp_path / 'junk.pt')


def test_imagenet_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with pytest.raises(MtabnError) as error: create_model('abn_v1_resnet50', pretrained='imagenet')
    assert 'resnet50-0676ba61.pth' in str(error.value) and str(tmp_path / 'hub' / 'checkpoints') in str(error.value)
    with pytest.raises(MtabnError, match='no ImageNet weights'): create_model('abn_v1_resnet10', pretrained='imagenet')


def test_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    reference = torchvision.models.resnet18()
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth')
    for attention_init, copied in (('layer4', True), ('random', False)):
        model = create_model('abn_v2_resnet18', pretrained='imagenet', attention_init=attention_init)
        assert torch.equal(model.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
        assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
        assert torch.equal(model.layer4_att[1].conv1.weight, reference.layer4[1].conv1.weight) == copied
    baseline = create_model('resnet18', pretrained='imagenet')
    assert baseline.fc.weight.shape == (40, 512)


def test_our_checkpoints(tmp_path):
    model = create_model('abn_v2_resnet10', num_attributes=4, residual_attention=True)
    save_model(model, tmp_path / 'run' / 'checkpoints' / 'best.pt', epoch=2, optimizer_state_dict={'lr': 0.1})
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['best.pt']
    loaded = load_model(tmp_path / 'run')
    assert loaded.spec == model.spec and not loaded.training
    for key, value in model.state_dict().items(): assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(MtabnError, match='without checkpoints'): load_model(tmp_path)


def test_decisions_equal_counts_agreeing_decisions():
    "Known answers: a model against itself agrees everywhere; flipping one attribute's logit sign of four disagrees on a quarter."
    from multitask_abn.bench import decisions_equal
    logits = torch.tensor([[1., -2., 3., -4.], [-1., 2., -3., 4.]])
    same = lambda x: ABNOutput(x, None, None)
    flipped = lambda x: ABNOutput(x * torch.tensor([1., 1., 1., -1.]), None, None)
    assert decisions_equal(same, same, [logits, logits]) == 1.0
    assert decisions_equal(same, flipped, [logits, logits]) == 0.75


@pytest.mark.slow
def test_bench_decision_check_on_a_run_folder(tmp_path, capsys):
    from multitask_abn.bench import decisions_equal, eval_modes, main, test_batches
    from multitask_abn.synth import make_synth_celeba
    data = make_synth_celeba(tmp_path / 'synth', n=30, seed=1)
    model = create_model('abn_v1_resnet10', num_attributes=4)
    save_model(model, tmp_path / 'run' / 'checkpoints' / 'best.pt')
    (tmp_path / 'run' / 'config.json').write_text(json.dumps({'transform': 'eval', 'image_size': 32}))
    summary = main(['models', '--checkpoint', str(tmp_path / 'run'), '--data', str(data), '--batch', '2',
                    '--iters', '1', '--no-compile', '--no-memory', '--max-images', '4'])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == summary
    from multitask_abn.data import CelebADataset
    test_images = len(CelebADataset(data, split='test'))
    assert summary['size'] == 32 and summary['decision_images'] == min(4, test_images - test_images % 2)
    # the fastest mode is fastest among modes that include the reference (speedup 1), and its decisions are counted
    for kind in ('eval', 'train'):
        assert summary[f'{kind}_speedup'] >= 1 and (summary[f'{kind}_speedup'] == 1) == (summary[f'fastest_{kind}_mode'] == 'loop fp32')
    options = eval_modes('auto')
    images = list(test_batches(data, 32, 2, 4))
    recount = decisions_equal(optimize_for_inference(load_model(tmp_path / 'run'), images[0], **options['loop fp32']),
                              optimize_for_inference(load_model(tmp_path / 'run'), images[0], **options[summary['decision_mode']]), images)
    assert summary['decisions_equal'] == recount
    assert summary['train_peak_memory_ratio'] is None   # --no-memory
    combined = main(['models', '--model', 'abn_v2_resnet10', '--num-attributes', '3', '--size', '48', '--checkpoint',
                     str(tmp_path / 'run'), '--data', str(data), '--batch', '2', '--iters', '1', '--kind', 'eval',
                     '--no-compile', '--no-memory', '--max-images', '4'])
    assert combined['model'] == 'abn_v2_resnet10' and combined['size'] == 48
    assert combined['decision_model'] == 'abn_v1_resnet10' and combined['decision_size'] == 32
    assert combined['decisions_equal'] == decisions_equal(
        optimize_for_inference(load_model(tmp_path / 'run'), images[0], **options['loop fp32']),
        optimize_for_inference(load_model(tmp_path / 'run'), images[0], **options[combined['decision_mode']]), images)
    capsys.readouterr()
    with pytest.raises(SystemExit): main(['models', '--model', 'abn_v2_resnet10', '--data', str(data)])
    assert 'pass --checkpoint too' in capsys.readouterr().err


@pytest.mark.slow
def test_bench_command_line(tmp_path):
    import subprocess, sys
    result = subprocess.run([sys.executable, '-m', 'multitask_abn.bench', 'models', '--model', 'abn_v2_resnet10',
                             '--num-attributes', '3', '--batch', '2', '--size', '32', '--iters', '1'],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary['model'] == 'abn_v2_resnet10' and summary['eval_speedup'] > 0
    assert summary['train_peak_memory_ratio'] is None or summary['train_peak_memory_ratio'] > 0
    assert '+compile' in result.stdout and 'peak_mb' in result.stdout
    error = subprocess.run([sys.executable, '-m', 'multitask_abn.bench', 'models', '--checkpoint', str(tmp_path / 'no.pt')],
                           capture_output=True, text=True)
    assert error.returncode == 2 and 'not found' in error.stderr and 'Traceback' not in error.stderr
