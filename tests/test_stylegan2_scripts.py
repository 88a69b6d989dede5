"""StyleGAN2 scripts: generate.py, projector.py, style_mixing.py, legacy.py on tiny networks (in-process CLI)."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import legacy
import projector
import style_mixing
from stylegan2 import networks, projection
from torch_utils.images import to_uint8_nhwc
from stylegan2.pickles import load_network_pkl, save_network_pkl


def tiny_G(c_dim=0, seed=0):
    torch.manual_seed(seed)
    G = networks.Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=16, img_channels=3,
                           mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=128, channel_max=16))
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('noise_strength'):
                p.fill_(0.2)
    return G.eval()


def tiny_D(c_dim=0):
    return networks.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=128, channel_max=16)


@pytest.fixture(scope='module')
def network_pkl(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('net') / 'g.pkl')
    save_network_pkl(path, G=tiny_G(), D=tiny_D(), G_ema=tiny_G())
    return path


def run(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    return result


def read_png(path):
    return np.asarray(PIL.Image.open(path))


def test_generate_writes_seed_images_and_grid(tmp_path, network_pkl):
    outdir = str(tmp_path / 'out')
    result = run(generate.main, ['--network', network_pkl, '--seeds', '0-3', '--grid', '--batch', '3',
                                 '--outdir', outdir, '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['grid.png'] + [f'seed{s:04d}.png' for s in range(4)]
    # Seed 2 is upstream's latent RandomState(2).randn(z_dim) through G, whatever the batching.
    G = tiny_G()
    z = torch.from_numpy(np.random.RandomState(2).randn(1, 8)).float()
    expected = to_uint8_nhwc(G(z, None, noise_mode='const', force_fp32=True))[0]
    assert np.array_equal(read_png(os.path.join(outdir, 'seed0002.png')), expected)
    assert read_png(os.path.join(outdir, 'grid.png')).shape == (32, 32, 3)
    # Existing images are not overwritten without --overwrite.
    again = run(generate.main, ['--network', network_pkl, '--seeds', '0', '--outdir', outdir])
    assert again.exit_code != 0 and 'already exists' in again.output


def test_generate_errors(tmp_path, network_pkl):
    conditional = str(tmp_path / 'c.pkl')
    save_network_pkl(conditional, G_ema=tiny_G(c_dim=3), D=tiny_D(c_dim=3))
    cases = [(['--network', str(tmp_path / 'missing.pkl'), '--seeds', '0'], 'no such file'),
             (['--network', network_pkl, '--seeds', '5-2'], 'runs backwards'),
             (['--network', network_pkl], '--seeds'),
             (['--network', conditional, '--seeds', '0'], '--class'),
             (['--network', conditional, '--seeds', '0', '--class', '7'], 'out of range')]
    for args, fragment in cases:
        result = run(generate.main, args + ['--outdir', str(tmp_path / 'o')])
        assert result.exit_code != 0 and fragment in result.output, (args, result.output)
        assert not (tmp_path / 'o').exists()  # A failed run leaves no empty output folder behind.
    result = run(generate.main, ['--network', conditional, '--seeds', '0-1', '--class', '2',
                                 '--outdir', str(tmp_path / 'cond')])
    assert result.exit_code == 0 and len(os.listdir(tmp_path / 'cond')) == 2


def test_generate_samples_diffusion_pickles(tmp_path):
    """An EDM-layout pickle (dict(ema=...)) goes through the teachers' sampler."""
    from teachers import networks as teacher_networks
    torch.manual_seed(0)
    net = teacher_networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                                      channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = str(tmp_path / 'edm.pkl')
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net.eval().requires_grad_(False), loss_fn=None, augment_pipe=None,
                         dataset_kwargs={}), f)
    result = run(generate.main, ['--network', path, '--seeds', '0-1', '--steps', '2', '--outdir', str(tmp_path / 'o')])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'o')) == ['seed0000.png', 'seed0001.png']
    assert read_png(tmp_path / 'o' / 'seed0000.png').shape == (8, 8, 3)
    # As a one-step student: x0 = D(sigma z; sigma) with z from the seed's own stream.
    result = run(generate.main, ['--network', path, '--seeds', '4-5', '--init-sigma', '2.5',
                                 '--outdir', str(tmp_path / 'one')])
    assert result.exit_code == 0, result.output
    z = torch.randn([1, 3, 8, 8], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = to_uint8_nhwc(net(z * 2.5, torch.full([1, 1, 1, 1], 2.5), None))[0]
    assert np.array_equal(read_png(tmp_path / 'one' / 'seed0005.png'), expected)
    # A distilled student's pickle carries its init_sigma: one step without being told.
    student = str(tmp_path / 'student.pkl')
    with open(student, 'wb') as f:
        pickle.dump(dict(ema=net, init_sigma=2.5), f)
    result = run(generate.main, ['--network', student, '--seeds', '5', '--outdir', str(tmp_path / 'student')])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / 'student' / 'seed0005.png'), expected)


def test_projection_lowers_its_loss():
    G = tiny_G()
    z = torch.from_numpy(np.random.RandomState(5).randn(1, 8)).float()
    with torch.no_grad():
        target = (G(z, None, noise_mode='const', force_fp32=True)[0] + 1) * 127.5
    dists = [d for _, d in projection.project(G, target.clamp(0, 255), projection.PyramidDistance(), num_steps=25,
                                              w_avg_samples=200)]
    assert len(dists) == 25
    assert min(dists[-5:]) < 0.6 * dists[0], dists


def test_projector_cli_and_generate_replay(tmp_path, network_pkl):
    G = tiny_G()
    z = torch.from_numpy(np.random.RandomState(5).randn(1, 8)).float()
    with torch.no_grad():
        target = to_uint8_nhwc(G(z, None, noise_mode='const', force_fp32=True))[0]
    PIL.Image.fromarray(np.pad(target, [(4, 4), (0, 0), (0, 0)])).resize((16, 24)).save(tmp_path / 't.png')
    outdir = str(tmp_path / 'proj')
    result = run(projector.main, ['--network', network_pkl, '--target', str(tmp_path / 't.png'), '--num-steps', '4',
                                  '--vgg16', 'pyramid', '--video-every', '2', '--outdir', outdir])
    assert result.exit_code == 0, result.output
    files = set(os.listdir(outdir))
    assert {'target.png', 'proj.png', 'projected_w.npz'} <= files and ({'proj.mp4', 'proj.gif'} & files)
    w = np.load(os.path.join(outdir, 'projected_w.npz'))['w']
    assert w.shape == (1, G.num_ws, 8) and np.allclose(w[:, 0], w[:, -1])
    # generate.py renders the projected w exactly as projector.py did.
    result = run(generate.main, ['--network', network_pkl, '--projected_w', os.path.join(outdir, 'projected_w.npz'),
                                 '--outdir', str(tmp_path / 'replay')])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / 'replay' / 'proj00.png'), read_png(os.path.join(outdir, 'proj.png')))


def test_style_mixing_takes_the_chosen_layers_from_the_column_seed(tmp_path, network_pkl):
    outdir = str(tmp_path / 'mix')
    result = run(style_mixing.main, ['--network', network_pkl, '--rows', '1,2', '--cols', '3', '--styles', '0-5',
                                     '--outdir', outdir])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['1-1.png', '1-3.png', '2-2.png', '2-3.png', '3-3.png', 'grid.png']
    # Taking every layer from the column seed reproduces the column seed's own image.
    assert np.array_equal(read_png(os.path.join(outdir, '1-3.png')), read_png(os.path.join(outdir, '3-3.png')))
    assert not np.array_equal(read_png(os.path.join(outdir, '1-1.png')), read_png(os.path.join(outdir, '3-3.png')))
    bad = run(style_mixing.main, ['--network', network_pkl, '--rows', '1', '--cols', '3', '--styles', '0-9',
                                  '--outdir', str(tmp_path / 'bad')])
    assert bad.exit_code != 0 and 'do not exist' in bad.output


def test_legacy_cli_rewrites_as_ours(tmp_path, network_pkl):
    dest = str(tmp_path / 'converted.pkl')
    result = run(legacy.main, ['--source', network_pkl, '--dest', dest, '--as-ours'])
    assert result.exit_code == 0, result.output
    data = load_network_pkl(dest)
    assert type(data['G_ema']) is networks.Generator and type(data['D']) is networks.Discriminator
    z = torch.randn(2, 8)
    assert torch.equal(data['G_ema'](z, None, noise_mode='const'), tiny_G()(z, None, noise_mode='const'))
    again = run(legacy.main, ['--source', network_pkl, '--dest', dest])
    assert again.exit_code != 0 and 'already exists' in again.output
