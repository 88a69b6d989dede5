"""dnnlib.util: open_url (local, file://, cache, offline error), construct-by-name, formatting."""

import hashlib
import os

import pytest

import dnnlib
from dnnlib import util


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'a b.bin'
    path.write_bytes(b'hello')
    with util.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with util.open_url('file://' + str(path).replace(' ', '%20')) as f:
        assert f.read() == b'hello'
    assert util.open_url(str(path), return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match='No such file'):
        util.open_url(str(tmp_path / 'missing.pkl'))


def test_open_url_cache_hit_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    url = 'https://example.invalid.org/models/net.pkl'
    cache = tmp_path / 'downloads'
    cache.mkdir()
    md5 = hashlib.md5(url.encode()).hexdigest()
    (cache / f'{md5}_net.pkl').write_bytes(b'cached bytes')
    monkeypatch.setattr(util, '_download', lambda *a, **k: pytest.fail('cache hit must not download'))
    with util.open_url(url) as f:
        assert f.read() == b'cached bytes'
    assert util.open_url(url, return_filename=True) == str(cache / f'{md5}_net.pkl')


def test_open_url_download_is_cached_atomically(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, num_attempts, verbose):
        calls.append(url)
        return b'payload', 'net.pkl'

    monkeypatch.setattr(util, '_download', fake_download)
    url = 'https://example.invalid.org/net.pkl'
    first = util.open_url(url, cache_dir=str(tmp_path), return_filename=True)
    second = util.open_url(url, cache_dir=str(tmp_path), return_filename=True)
    assert first == second and len(calls) == 1
    assert open(first, 'rb').read() == b'payload'
    assert [f for f in os.listdir(tmp_path) if f.endswith('.tmp')] == []


def test_open_url_offline_gives_one_clear_error(tmp_path):
    url = 'http://127.0.0.1:9/edm-cifar10.pkl'  # Nothing listens on the discard port: connection refused.
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    message = str(info.value)
    assert url in message and 'local path' in message
    assert '\n' not in message


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert dnnlib.make_cache_dir_path('x') == str(tmp_path / 'env' / 'x')
    util.set_cache_dir(str(tmp_path / 'explicit'))
    try:
        assert dnnlib.make_cache_dir_path('x') == str(tmp_path / 'explicit' / 'x')
    finally:
        util.set_cache_dir(None)


def test_construct_and_call_by_name():
    d = util.construct_class_by_name(class_name='dnnlib.util.EasyDict', a=3)
    assert isinstance(d, dnnlib.EasyDict) and d.a == 3
    assert util.call_func_by_name(16.0, func_name='np.sqrt') == 4.0
    assert util.get_obj_by_name('torch.nn.functional.silu').__name__ == 'silu'
    with pytest.raises(ImportError, match='no attribute path'):
        util.get_obj_by_name('numpy.linalg.does_not_exist')


def test_is_url_and_format_time():
    assert util.is_url('https://a.b/c.pkl') and not util.is_url('/tmp/c.pkl')
    assert util.is_url('file:///tmp/x', allow_file_urls=True) and not util.is_url('file:///tmp/x')
    assert util.format_time(5) == '5s'
    assert util.format_time(3725) == '1h 02m 05s'
    assert util.format_time(2 * 86400 + 3600) == '2d 01h 00m'
    assert util.format_time_brief(3725) == '1h 02m'
