"""Post-hoc snapshot averaging: which snapshots it takes, and that the average is the parameters' plain mean."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from average_snapshots import average_into, snapshots  # noqa: E402
from pipelines import generators  # noqa: E402
from stylegan2 import networks  # noqa: E402
from stylegan2.pickles import save_network_pkl  # noqa: E402


def tiny_G(seed):
    torch.manual_seed(seed)
    return networks.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=1,
                              mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=128, channel_max=16))


def test_snapshots_from_a_kimg_on_in_order(tmp_path):
    for name in ['network-snapshot-000006.pkl', 'network-snapshot-000002.pkl', 'network-snapshot-000004.pkl',
                 'network-snapshot-best.pkl']:
        (tmp_path / name).write_bytes(b'')
    assert [k for k, _ in snapshots(str(tmp_path), 4)] == [4.0, 6.0]


def test_the_average_is_the_mean_of_every_floating_tensor(tmp_path):
    nets = [tiny_G(seed) for seed in range(3)]
    with torch.no_grad():
        for k, G in enumerate(nets):
            G.mapping.w_avg.fill_(float(k))  # A buffer: averaged too.
    D = networks.Discriminator(c_dim=0, img_resolution=16, img_channels=1, channel_base=128, channel_max=16)
    paths = []
    for k, G in enumerate(nets):
        paths.append(str(tmp_path / f'network-snapshot-{2 * k:06d}.pkl'))
        save_network_pkl(paths[-1], G=G, D=D, G_ema=G)
    adapter = generators.load_generator(paths[0])
    average_into(adapter, paths)
    averaged = adapter.G.state_dict()
    for name, tensor in nets[0].state_dict().items():
        if tensor.is_floating_point():
            want = (nets[0].state_dict()[name] + nets[1].state_dict()[name] + nets[2].state_dict()[name]) / 3
            assert torch.allclose(averaged[name], want, atol=1e-6), name
    assert torch.all(averaged['mapping.w_avg'] == 1.0)
    assert not torch.equal(averaged['synthesis.b16.conv0.weight'], nets[0].state_dict()['synthesis.b16.conv0.weight'])
