"""refine.py and distill.py end to end on tiny networks (in-process CLI)."""

import glob
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import distill
import generate
import refine
from pipelines.generators import StyleGAN2Adapter
from pipelines import cli
from stylegan2 import networks as sg
from stylegan2.pickles import load_network_pkl, save_network_pkl
import teachers  # noqa: E402
from teachers import networks as tn

FAST = ['--batch', '4', '--tick', '0.008', '--snap', '1', '--grid', '4', '--no-progress', '--device', 'cpu',
        '--glr', '1e-3', '--lr', '1e-3']
REFINE_FAST = FAST + ['--recipe', 'official']  # The mechanics, without the default recipe's warm-up and critic.


def tiny_teacher(resolution=8, label_dim=0, channels=1, seed=0):
    torch.manual_seed(seed)
    return tn.EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
                         model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_G(resolution=16, c_dim=0, channels=1, seed=0):
    torch.manual_seed(seed)
    return sg.Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=resolution, img_channels=channels,
                        mapping_kwargs=dict(num_layers=1), synthesis_kwargs=dict(channel_base=64, channel_max=8))


def write_teacher(path, **kwargs):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tiny_teacher(**kwargs).eval(), loss_fn=None, augment_pipe=None, dataset_kwargs=None), f)
    return str(path)


def write_generator(path, resolution=16, c_dim=0, channels=1):
    G = tiny_G(resolution, c_dim, channels)
    D = sg.Discriminator(c_dim=c_dim, img_resolution=resolution, img_channels=channels, channel_base=64, channel_max=8)
    save_network_pkl(str(path), G=G, D=D, G_ema=G)
    return str(path)


def invoke(command, args):
    result = CliRunner().invoke(command, args)
    return result


def only_run_dir(outdir):
    runs = sorted(glob.glob(os.path.join(outdir, '0*')))
    assert len(runs) == 1, runs
    return runs[0]


def last_snapshot(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('nets')
    return dict(teacher8=write_teacher(d / 't8.pkl'), teacher8_cond=write_teacher(d / 't8c.pkl', label_dim=3),
                teacher8_rgb=write_teacher(d / 't8rgb.pkl', channels=3),
                g16=write_generator(d / 'g16.pkl'), g16_cond=write_generator(d / 'g16c.pkl', c_dim=3),
                g16_cond5=write_generator(d / 'g16c5.pkl', c_dim=5))


def test_refine_end_to_end_bridges_resolution_and_writes_upstream_layout(tmp_path, files):
    outdir = str(tmp_path / 'runs')
    result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'], '--outdir', outdir,
                                  '--kimg', '0.016'] + REFINE_FAST)
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(outdir)
    assert f'Done at 0.016 kimg: {run_dir}' in result.output and 'fakes000000.016.png (end)' in result.output
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['network'] == files['g16'] and options['kimg'] == 0.016
    for name in ('log.txt', 'stats.jsonl', 'fakes_init.png'):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert glob.glob(os.path.join(run_dir, 'training-state-*.pt'))

    data = load_network_pkl(last_snapshot(run_dir))
    assert set(data) >= {'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}
    original = load_network_pkl(files['g16'])
    # The refined G_ema is a 16 px generator that moved; D is the original one.
    assert data['G_ema'].img_resolution == 16
    moved = [float((a - b).abs().max()) for a, b in zip(data['G_ema'].parameters(), original['G_ema'].parameters())]
    assert max(moved) > 0
    for a, b in zip(data['D'].parameters(), original['D'].parameters()):
        assert torch.equal(a, b)
    z = torch.randn(2, 8)
    assert data['G_ema'](z, None, noise_mode='const').shape == (2, 1, 16, 16)


@pytest.mark.parametrize('trainable, noise, expect', [
    ('all', False, lambda n: not n.endswith('noise_strength')), ('all', True, lambda n: True),
    ('synthesis', False, lambda n: n.startswith('synthesis.') and not n.endswith('noise_strength')),
    ('mapping', False, lambda n: n.startswith('mapping.')), ('none', True, lambda n: False)])
def test_stylegan2_adapter_trains_the_chosen_parameters(trainable, noise, expect):
    G = tiny_G()
    adapter = StyleGAN2Adapter(G, trainable=trainable, train_noise_strength=noise)
    names = [n for n, _ in G.named_parameters()]
    assert any(n.endswith('noise_strength') for n in names)
    assert {n for n, p in G.named_parameters() if p.requires_grad} == {n for n in names if expect(n)}
    assert {id(p) for p in adapter.parameters() if p.requires_grad} == {id(p) for n, p in G.named_parameters() if expect(n)}


def test_summary_compares_first_and_last_metric_records(tmp_path):
    records = [dict(metric='fd_x1k', results=dict(fd_x1k=11.0), snapshot_pkl=None),
               dict(metric='fd_x1k', results=dict(fd_x1k=9.5), snapshot_pkl='a/network-snapshot-000002.pkl'),
               dict(metric='fd_x1k', results=dict(fd_x1k=7.25), snapshot_pkl='a/network-snapshot-000004.pkl')]
    (tmp_path / 'metric-fd_x1k.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    (tmp_path / 'metric-kd_x1k.jsonl').write_text(json.dumps(dict(results=dict(kd_x1k=1.0), snapshot_pkl=None)) + '\n')
    text = cli.summary(str(tmp_path), 4000)
    assert text.splitlines() == [f'Done at 4 kimg: {tmp_path}', '  grids: fakes_init.png (start), fakes000004.png (end)',
                                 '  fd_x1k: 11 at start -> 7.25 at the end']


def test_refine_resume_continues_exactly(tmp_path, files):
    args = ['--network', files['g16'], '--teacher', files['teacher8'], '--seed', '3'] + REFINE_FAST
    # Uninterrupted: 4 iterations.
    assert invoke(refine.main, args + ['--outdir', str(tmp_path / 'a'), '--kimg', '0.016']).exit_code == 0
    # Interrupted after 2 iterations, then resumed to 4 with the run's own options.
    assert invoke(refine.main, args + ['--outdir', str(tmp_path / 'b'), '--kimg', '0.008']).exit_code == 0
    run_b = only_run_dir(str(tmp_path / 'b'))
    options_path = os.path.join(run_b, 'training_options.json')
    options = json.load(open(options_path))
    options['kimg'] = 0.016
    json.dump(options, open(options_path, 'w'))
    result = invoke(refine.main, ['--resume', run_b])
    assert result.exit_code == 0, result.output
    a = load_network_pkl(last_snapshot(only_run_dir(str(tmp_path / 'a'))))
    b = load_network_pkl(last_snapshot(run_b))
    for key in ('G', 'G_ema'):
        for pa, pb in zip(a[key].parameters(), b[key].parameters()):
            assert torch.equal(pa, pb), key


def test_resume_from_a_chosen_training_state_file(tmp_path, files):
    """--resume=<run>/training-state-X.pt continues from that state: replaying the second half of a run from its
    midway state rewrites the same final networks bit for bit."""
    args = ['--network', files['g16'], '--teacher', files['teacher8'], '--seed', '5', '--outdir', str(tmp_path),
            '--kimg', '0.016'] + REFINE_FAST
    assert invoke(refine.main, args).exit_code == 0
    run_dir = only_run_dir(str(tmp_path))
    final = last_snapshot(run_dir)
    first = load_network_pkl(final)
    os.remove(final)
    result = invoke(refine.main, ['--resume', os.path.join(run_dir, 'training-state-000000.008.pt')])
    assert result.exit_code == 0, result.output
    again = load_network_pkl(final)
    for key in ('G', 'G_ema'):
        for pa, pb in zip(first[key].parameters(), again[key].parameters()):
            assert torch.equal(pa, pb), key
    result = invoke(refine.main, ['--resume', final])
    assert result.exit_code != 0 and 'expected a run directory or one of its training-state' in result.output


def test_refine_conditional_generator_with_conditional_teacher(tmp_path, files):
    result = invoke(refine.main, ['--network', files['g16_cond'], '--teacher', files['teacher8_cond'],
                                  '--outdir', str(tmp_path), '--kimg', '0.008'] + REFINE_FAST)
    assert result.exit_code == 0, result.output
    data = load_network_pkl(last_snapshot(only_run_dir(str(tmp_path))))
    assert data['G_ema'].c_dim == 3


@pytest.mark.parametrize('network, teacher, message', [
    ('g16', 'teacher8_cond', 'is class-conditional (3 classes) but'),
    ('g16_cond5', 'teacher8_cond', 'has 5 classes but'),
    ('g16', 'teacher8_rgb', 'makes 1-channel images but'),
    ('teacher8', 'teacher8', 'expected a StyleGAN2 network pickle'),
    ('g16', 'g16', 'not an EDM teacher'),
])
def test_refine_mismatch_errors_are_one_line(tmp_path, files, network, teacher, message):
    result = invoke(refine.main, ['--network', files[network], '--teacher', files[teacher], '--dry-run'])
    assert result.exit_code != 0
    assert message in result.output
    assert 'Traceback' not in result.output and result.output.strip().count('\n') == 0


def test_refine_conditional_generator_with_unconditional_teacher_dry_run(files):
    result = invoke(refine.main, ['--network', files['g16_cond'], '--teacher', files['teacher8'], '--dry-run'])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)['resolved']
    assert resolved['teacher_sees_labels'] is False and resolved['generator']['classes'] == 3


def refine_dry_run(files, *extra):
    """The configuration `refine.py --dry-run` resolves for the tiny 16 px generator and 8 px teacher."""
    result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'], '--dry-run', *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_refine_recipe_fills_the_options_left_at_their_defaults(files):
    """--recipe's bundle applies to every option not given; an option given wins; `official` is the shown defaults."""
    keys = ('glr', 'warmup', 'g_beta2', 'ema', 'ema_rampup', 'lr', 'fake_warmup', 'batch', 'adv', 'adv_lr', 'adv_r1',
            'adv_bank', 'adv_pixels')
    def resolved(*extra):
        config = refine_dry_run(files, *extra)
        return {k: config[k] for k in keys}, config['resolved']['ikl']
    default, engine = resolved()
    assert default == dict(refine.RECIPES['ikl-gan'])
    assert engine['adv_weight'] == 10.0 and engine['g_lr'] == 2e-3 and engine['batch'] == 32
    assert engine['g_betas'] == [0.0, 0.99] and engine['lr_warmup_kimg'] == 2.0
    assert engine['ema_halflife_kimg'] == 3.0 and engine['ema_rampup_ratio'] == 0.25
    assert engine['adv_lr'] == 2.5e-3 and engine['adv_r1_gamma'] == 1.0 and engine['adv_pixel_weight'] == 1.0
    slow, engine = resolved('--recipe', 'ikl-adv')
    shown = {k: refine.main.params[[p.name for p in refine.main.params].index(k)].default for k in keys}
    assert slow == dict(shown, **refine.RECIPES['ikl-adv']) and engine['adv_weight'] == 1.0 and engine['batch'] == 128
    official, engine = resolved('--recipe', 'official')
    assert official == shown
    assert engine['adv_weight'] == 0 and engine['g_lr'] == 1e-5 and engine['fake_warmup_kimg'] == 0
    overridden, _ = resolved('--glr', '3e-4', '--adv', '0')  # The recipe's pixel pull needs the critic: off with it.
    assert overridden == dict(default, glr=3e-4, adv=0.0, adv_pixels=0.0)
    overridden, _ = resolved('--adv-pixels', '2')
    assert overridden == dict(default, adv_pixels=2.0)
    halflife = lambda *extra: resolved(*extra)[1]['adv_pixel_halflife_kimg']
    assert halflife() == 1.0 and halflife('--adv-pixels-halflife', '0.25') == 0.25


def test_refine_generator_adam_betas_reach_the_engine(files):
    """--g-beta1/--g-beta2 become the generator's Adam betas; unset (and no recipe sets it), beta2 is 0.999."""
    betas = lambda *extra: refine_dry_run(files, *extra)['resolved']['ikl']['g_betas']
    assert betas('--recipe', 'official') == [0.0, 0.999]
    assert betas('--recipe', 'official', '--g-beta2', '0.99', '--g-beta1', '0.5') == [0.5, 0.99]
    result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'], '--dry-run', '--g-beta2', '1'])
    assert result.exit_code != 0 and '--g-beta2' in result.output


def test_refine_bad_files_and_outdir(tmp_path, files):
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'not a pickle at all')
    result = invoke(refine.main, ['--network', str(corrupt), '--teacher', files['teacher8'], '--dry-run'])
    assert result.exit_code != 0 and 'corrupt.pkl' in result.output and 'Traceback' not in result.output
    result = invoke(refine.main, ['--network', str(tmp_path / 'missing.pkl'), '--teacher', files['teacher8'], '--dry-run'])
    assert result.exit_code != 0 and 'missing.pkl' in result.output
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'],
                                  '--outdir', str(blocker / 'runs'), '--kimg', '0.004'] + REFINE_FAST)
    assert result.exit_code != 0 and 'cannot create run directory' in result.output


def test_distill_one_step_end_to_end_then_generate(tmp_path, files):
    outdir = str(tmp_path / 'runs')
    result = invoke(distill.main, ['--teacher', files['teacher8_cond'], '--init-sigma', '2.5', '--outdir', outdir,
                                   '--kimg', '0.008'] + FAST)
    assert result.exit_code == 0, result.output
    snapshot = last_snapshot(only_run_dir(outdir))
    with open(snapshot, 'rb') as f:
        data = pickle.load(f)
    assert data['init_sigma'] == 2.5 and data['ema'].label_dim == 3
    teacher = pickle.load(open(files['teacher8_cond'], 'rb'))['ema']
    moved = [float((a - b).detach().abs().max()) for a, b in zip(data['ema'].parameters(), teacher.parameters())]
    assert max(moved) > 0
    gen_dir = str(tmp_path / 'gen')
    result = invoke(generate.main, ['--network', snapshot, '--seeds', '0-2', '--class', '1', '--outdir', gen_dir,
                                    '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(gen_dir)) == ['seed0000.png', 'seed0001.png', 'seed0002.png']


def test_distill_stylegan2_student_loads_as_upstream_layout(tmp_path, files):
    outdir = str(tmp_path / 'runs')
    result = invoke(distill.main, ['--teacher', files['teacher8'], '--student', 'stylegan2', '--z-dim', '8',
                                   '--cbase', '64', '--cmax', '8', '--outdir', outdir, '--kimg', '0.008'] + FAST)
    assert result.exit_code == 0, result.output
    data = load_network_pkl(last_snapshot(only_run_dir(outdir)))
    assert data['G_ema'].img_resolution == 8 and data['D'] is not None


def test_best_snapshot_follows_the_lowest_distance_and_curves_are_drawn(tmp_path):
    run_dir = str(tmp_path)
    values = [('network-snapshot-000002.pkl', 9.0), ('network-snapshot-000004.pkl', 7.5),
              ('network-snapshot-000006.pkl', 8.0)]
    records = [dict(results=dict(fd_x1k=10.0, pr_x1k3_precision=0.5), snapshot_pkl=None)]
    for name, value in values:
        path = os.path.join(run_dir, name)
        open(path, 'wb').write(name.encode())
        results = dict(pr_x1k3_precision=0.1, fd_x1k=value)
        cli.keep_best(run_dir, path, results)
        records.append(dict(results=results, snapshot_pkl=path))
    assert cli.selection_metric(dict(pr50k3_full_precision=1, kid2k_full=2)) == 'kid2k_full'
    assert open(os.path.join(run_dir, 'network-snapshot-best.pkl'), 'rb').read() == b'network-snapshot-000004.pkl'
    assert json.load(open(os.path.join(run_dir, 'best.json'))) == dict(metric='fd_x1k', value=7.5,
                                                                       snapshot='network-snapshot-000004.pkl')
    (tmp_path / 'metric-fd_x1k.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    (tmp_path / 'stats.jsonl').write_text(''.join(json.dumps({'Progress/kimg': dict(num=1, mean=k),
                                                              'Loss/fake_score': dict(num=4, mean=1 / k)}) + '\n'
                                                  for k in (1, 2, 3)))
    from training.plots import metric_curves, plot_run
    assert metric_curves(run_dir)['fd_x1k'] == [(0.0, 10.0), (2.0, 9.0), (4.0, 7.5), (6.0, 8.0)]
    path = plot_run(run_dir)
    assert path == os.path.join(run_dir, 'curves.png') and os.path.getsize(path) > 1000


def test_refine_metrics_keep_the_best_snapshot_and_draw_curves(tmp_path, files):
    from metrics.detectors import FMNIST_FORMAT
    from metrics.fmnist_net import FashionFeatureNet
    torch.manual_seed(0)
    detector = str(tmp_path / 'random-detector.pt')
    torch.save(dict(state_dict=FashionFeatureNet().state_dict(), meta=dict(format=FMNIST_FORMAT)), detector)
    dnnlib.util.set_cache_dir(str(tmp_path / 'cache'))
    try:
        result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'], '--kimg', '0.016',
                                      '--outdir', str(tmp_path / 'runs'), '--metrics', 'fid8', '--metrics-ref-num', '8',
                                      f'--detector={detector}'] + REFINE_FAST)
    finally:
        dnnlib.util.set_cache_dir(None)
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(str(tmp_path / 'runs'))
    records = [json.loads(line) for line in open(os.path.join(run_dir, 'metric-fd_random-detector8.jsonl'))]
    pixels = [json.loads(line) for line in open(os.path.join(run_dir, 'metric-pixels.jsonl'))]
    assert len(records) == len(pixels) == 3 and records[0]['snapshot_pkl'] is None
    best = json.load(open(os.path.join(run_dir, 'best.json')))
    values = {os.path.basename(r['snapshot_pkl']): r['results']['fd_random-detector8'] for r in records[1:]}
    assert best['snapshot'] == min(values, key=values.get) and best['value'] == min(values.values())
    with open(os.path.join(run_dir, 'network-snapshot-best.pkl'), 'rb') as a, open(os.path.join(run_dir, best['snapshot']), 'rb') as b:
        assert a.read() == b.read()
    assert os.path.getsize(os.path.join(run_dir, 'curves.png')) > 1000
    assert 'best: fd_random-detector8' in result.output and 'pixel_mean' in result.output


def test_resume_refuses_a_run_without_training_state(tmp_path, files):
    result = invoke(refine.main, ['--network', files['g16'], '--teacher', files['teacher8'], '--outdir', str(tmp_path),
                                  '--kimg', '0.008'] + REFINE_FAST)
    run_dir = only_run_dir(str(tmp_path))
    for path in glob.glob(os.path.join(run_dir, 'training-state-*.pt')):
        os.remove(path)
    result = invoke(refine.main, ['--resume', run_dir])
    assert result.exit_code != 0 and 'no training-state' in result.output and 'Traceback' not in result.output
    result = invoke(distill.main, ['--resume', run_dir])
    assert result.exit_code != 0 and 'not a distill.py run directory' in result.output


def test_sigterm_saves_a_state_that_resumes_exactly(tmp_path, files):
    """A real SIGTERM (as a scheduler sends) mid-run: the step finishes, snapshot and state are saved, exit code
    130; resuming to a longer total matches a straight run bit for bit."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ['--network', files['g16'], '--teacher', files['teacher8'], '--seed', '1'] + REFINE_FAST
    proc = subprocess.Popen([sys.executable, os.path.join(root, 'refine.py'), '--outdir', str(tmp_path / 'a'),
                             '--kimg', '1000'] + common, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))  # One thread, like this process.
    deadline, stats = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None:
        stats = glob.glob(str(tmp_path / 'a' / '*' / 'stats.jsonl'))
        if stats and len(open(stats[0]).readlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert 'resume with --resume' in out.decode()
    run_dir = os.path.dirname(stats[0])
    state = torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=False)
    stopped = state['counters']['cur_nimg']
    total = (stopped + 8) / 1000
    options_path = os.path.join(run_dir, 'training_options.json')
    options = json.load(open(options_path))
    options['kimg'] = total
    json.dump(options, open(options_path, 'w'))
    assert invoke(refine.main, ['--resume', run_dir]).exit_code == 0
    assert invoke(refine.main, common + ['--outdir', str(tmp_path / 'b'), '--kimg', str(total)]).exit_code == 0
    a = load_network_pkl(last_snapshot(run_dir))
    b = load_network_pkl(last_snapshot(only_run_dir(str(tmp_path / 'b'))))
    for key in ('G', 'G_ema'):
        assert all(torch.equal(pa, pb) for pa, pb in zip(a[key].parameters(), b[key].parameters())), key


def test_teacher_sample_reference_has_one_cache_key_for_every_script(files):
    """refine.py's data-free reference and calc_metrics.py --ref-network share their cached statistics."""
    from pipelines import generators
    teacher = teachers.load(files['teacher8'])
    in_refine = generators.sample_reference(files['teacher8'], generators.TeacherSamplerAdapter(teacher, num_steps=18), num=8)
    in_calc_metrics = generators.sample_reference(files['teacher8'], generators.load_generator(files['teacher8']), num=8)
    assert in_refine.cache_key == in_calc_metrics.cache_key
    other = generators.sample_reference(files['teacher8_cond'], generators.load_generator(files['teacher8_cond']), num=8)
    assert other.cache_key != in_refine.cache_key
