"""torch_utils.misc, training_stats and distributed (single process; multi-process is covered by ikl's DDP test)."""

import numpy as np
import pytest
import torch

from torch_utils import distributed, misc, training_stats


def test_constant_is_cached_and_accepts_negative_strides():
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::-1]
    a = misc.constant(arr, dtype=torch.float32)
    b = misc.constant(arr.copy(), dtype=torch.float32)
    assert a is b
    assert torch.equal(a, torch.tensor([[2.0, 1, 0], [5, 4, 3]]))
    c = misc.constant(1.5, shape=[2, 2])
    assert c.shape == (2, 2) and c.dtype == torch.get_default_dtype() and torch.all(c == 1.5)


def test_assert_shape_messages():
    x = torch.zeros(2, 3)
    misc.assert_shape(x, [None, 3])
    with pytest.raises(AssertionError, match='Wrong number of dimensions: got 2, expected 3'):
        misc.assert_shape(x, [2, 3, 4])
    with pytest.raises(AssertionError, match='Wrong size for dimension 1: got 3, expected 4'):
        misc.assert_shape(x, [2, 4])


def test_profiled_function_keeps_name_and_result():
    @misc.profiled_function
    def double(x):
        return 2 * x
    assert double.__name__ == 'double' and double(3) == 6


def test_copy_params_and_buffers():
    src = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        src.weight.fill_(2.0)
        src.running_mean.fill_(0.5)
    dst = torch.nn.BatchNorm1d(3)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.running_mean, src.running_mean)
    with pytest.raises(AssertionError, match='missing'):
        misc.copy_params_and_buffers(torch.nn.Sequential(torch.nn.Linear(3, 3)), dst, require_all=True)


def test_infinite_sampler_covers_dataset_and_splits_ranks():
    data = list(range(10))
    it = iter(misc.InfiniteSampler(data, shuffle=False))
    assert [next(it) for _ in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    r0 = iter(misc.InfiniteSampler(data, rank=0, num_replicas=2, shuffle=False))
    r1 = iter(misc.InfiniteSampler(data, rank=1, num_replicas=2, shuffle=False))
    assert [next(r0) for _ in range(5)] == [0, 2, 4, 6, 8] and [next(r1) for _ in range(5)] == [1, 3, 5, 7, 9]
    shuffled = [int(i) for i, _ in zip(misc.InfiniteSampler(data, seed=3), range(200))]
    again = [int(i) for i, _ in zip(misc.InfiniteSampler(data, seed=3), range(200))]
    assert shuffled == again and shuffled[:10] != data and set(shuffled) == set(data)


def test_training_stats_collector_mean_std():
    collector = training_stats.Collector(regex='Test/.*', keep_previous=False)
    training_stats.report('Test/loss', torch.tensor([1.0, 2.0, 3.0, 4.0]))
    training_stats.report0('Test/lr', 0.5)
    training_stats.report('Other/value', 100.0)
    collector.update()
    assert collector.names() == ['Test/loss', 'Test/lr']
    assert collector.num('Test/loss') == 4
    assert collector['Test/loss'] == pytest.approx(2.5)
    assert collector.std('Test/loss') == pytest.approx(np.std([1, 2, 3, 4]))
    stats = collector.as_dict()
    assert stats['Test/lr'].mean == 0.5 and stats['Test/lr'].num == 1
    collector.update()  # Nothing new was reported.
    assert collector.num('Test/loss') == 0 and np.isnan(collector.mean('Test/loss'))


def test_distributed_single_process_without_launcher(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    device = distributed.init(device='cpu')
    assert device == torch.device('cpu')
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    distributed.barrier()


def test_distributed_shutdown_leaves_the_process_group(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    assert distributed.get_world_size() == 1 and torch.distributed.is_initialized()
    distributed.shutdown()
    assert not torch.distributed.is_initialized()
    distributed.shutdown()  # a second call (or one without a group) does nothing


def test_kimg_files_lists_a_runs_files_by_kimg_and_the_latest_state_is_the_last(tmp_path):
    from training.run import kimg_files, latest_training_state
    for name in ['training-state-000010.pt', 'training-state-000000.032.pt', 'training-state-000002.pt',
                 'training-state-x.pt', 'network-snapshot-000002.pkl']:
        torch.save({}, tmp_path / name)
    assert [k for k, _ in kimg_files(str(tmp_path), 'training-state', 'pt')] == [0.032, 2.0, 10.0]
    assert kimg_files(str(tmp_path), 'network-snapshot', 'pkl') == [(2.0, str(tmp_path / 'network-snapshot-000002.pkl'))]
    assert latest_training_state(str(tmp_path)) == str(tmp_path / 'training-state-000010.pt')
