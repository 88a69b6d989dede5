"""Compute quality metrics of a trained generator: FID, KID, precision/recall, IS.

Names and conventions follow StyleGAN2-ADA (`fid50k_full`, `kid50k_full`, `pr50k3_full`, `is50k`); reference
statistics come from a dataset (cached per dataset and detector), an EDM `fid-refs` npz, or samples of another
network such as the teacher ("FID to teacher", when the data is not at hand).

Examples:

    # FID against the training data, as in the StyleGAN2-ADA paper.
    python calc_metrics.py --network=refined.pkl --metrics=fid50k_full,kid50k_full --data=cifar10-32x32.zip

    # EDM-style FID against precomputed reference statistics.
    python calc_metrics.py --network=student.pkl --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    # Offline, Fashion-MNIST: the project's own detector (reported as fd_fmnist..., not FID).
    python calc_metrics.py --network=refined.pkl --metrics=fid10k_full --data=fmnist.zip --detector=fmnist
"""

import json
import os

import click
import torch

import dnnlib
from torch_utils import compiling
from torch_utils import persistence
from torch_utils.pickle_reader import NetworkPickleError
from metrics import compute_metrics, metric_main
from metrics.references import make_reference
from pipelines import generators


def parse_comma_list(value):
    return [item.strip() for item in value.split(',') if item.strip()] if value else []


def parse_detector(value):
    """'fmnist', a path or URL (one detector for all), or 'inception=PATH,vgg16=PATH' (local standard files)."""
    if value is None or '=' not in value:
        return value
    locations = {}
    for item in parse_comma_list(value):
        name, sep, location = item.partition('=')
        if not sep or name not in ('inception', 'vgg16'):
            raise click.BadParameter(f'expected inception=PATH and/or vgg16=PATH, got {item!r}',
                                     param_hint='--detector')
        locations[name] = location
    return locations


def run_dir_of(network_pkl):
    """Upstream appends results next to a snapshot that sits in a run directory (with training_options.json)."""
    if dnnlib.util.is_url(network_pkl):
        return None
    run_dir = os.path.dirname(os.path.abspath(network_pkl))
    return run_dir if os.path.isfile(os.path.join(run_dir, 'training_options.json')) else None


def load_network(path, device, option):
    """A generator adapter, with the option's name in front of a load error."""
    try:
        return generators.load_generator(path, device)
    except NetworkPickleError as err:
        raise click.ClickException(f'{option} {err}') from None


@click.command()
@click.option('--network', 'network_pkl', help='Generator to evaluate (StyleGAN2, one-step student, or teacher '
              'with its sampler)', metavar='PATH|URL', required=True)
@click.option('--metrics', 'metric_names', help='Comma-separated metrics, or none', default='fid50k_full',
              show_default=True, metavar='LIST')
@click.option('--data', help='Reference dataset: ZIP or folder in the upstream layout [default: the training data '
              'recorded in the pickle, if any]', metavar='[ZIP|DIR]')
@click.option('--ref', help='Reference statistics .npz (EDM fid-refs: mu, sigma)', metavar='NPZ|URL')
@click.option('--ref-network', help='Reference = samples of this network, e.g. the teacher', metavar='PATH|URL')
@click.option('--ref-num', help='Samples drawn from --ref-network', type=click.IntRange(min=2), default=50000,
              show_default=True)
@click.option('--num', help='Generated images per metric (overrides the count in the names)',
              type=click.IntRange(min=2))
@click.option('--detector', help='inception, vgg16, fmnist, PATH or URL for every metric; or '
              'inception=PATH,vgg16=PATH for local copies of the standard detectors', metavar='SPEC')
@click.option('--mirror', help='Add x-flipped reals (legacy metrics)', type=bool, default=False, show_default=True)
@click.option('--cov', 'cov_convention', help='Covariance: biased (StyleGAN2-ADA), unbiased (EDM), auto (unbiased '
              'only against mu/sigma files)', type=click.Choice(['auto', 'biased', 'unbiased']), default='auto',
              show_default=True)
@click.option('--batch', 'batch_size', help='Batch size', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--seed', help='Seed of the generated samples', type=int, default=0, show_default=True)
@click.option('--workers', help='Data-loading processes for --data', type=click.IntRange(min=0), default=2,
              show_default=True)
@click.option('--device', help='Torch device', default='cuda' if torch.cuda.is_available() else 'cpu',
              show_default=True)
@click.option('--jsonl', 'jsonl_path', help='Also append every result line to this file', metavar='FILE')
@click.option('--verbose/--quiet', help='Progress bars', default=True, show_default=True)
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose code or globals are not on the allow-lists')
@click.option('--compile', 'compile_net', is_flag=True,
              help="torch.compile the generator's networks (eager, with a warning, if compilation fails)")
def main(network_pkl, metric_names, data, ref, ref_network, ref_num, num, detector, mirror, cov_convention,
         batch_size, seed, workers, device, jsonl_path, verbose, refuse_unknown_code, compile_net):
    """Compute metrics of a generator and print one JSON line per metric."""
    metric_names = [] if metric_names == 'none' else parse_comma_list(metric_names)
    if not metric_names:
        return
    if sum(x is not None for x in (data, ref, ref_network)) > 1:
        raise click.UsageError('give only one of --data, --ref and --ref-network')
    detector = parse_detector(detector)
    device = torch.device(device)
    if refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    try:
        for name in metric_names:
            metric_main.parse_metric(name, num)
        generator = load_network(network_pkl, device, '--network')
        if compile_net:
            for name, net in generator.named_children():
                compiling.compile_module(net, f'generator ({name})', log=lambda line: click.echo(line, err=True))
        if data is not None:
            reference = make_reference(data, mirror=mirror, batch_size=batch_size, num_workers=workers)
        elif ref is not None:
            reference = make_reference(ref)
        elif ref_network is not None:
            ref_generator = load_network(ref_network, device, '--ref-network')
            reference = generators.sample_reference(ref_network, ref_generator, num=ref_num, batch_size=batch_size)
        elif getattr(generator, 'training_set_kwargs', None):  # As upstream: the data the pickle was trained on.
            reference = make_reference(generator.training_set_kwargs['path'], mirror=mirror, batch_size=batch_size,
                                       num_workers=workers)
        else:
            reference = None
        records = compute_metrics(metric_names, generator, reference, detector, device, num_gen=num,
                                  batch_size=batch_size, seed=seed, cov_convention=cov_convention,
                                  progress=verbose)
    except (ValueError, FileNotFoundError, dnnlib.util.DownloadError) as err:
        raise click.ClickException(str(err)) from None

    run_dir = run_dir_of(network_pkl)
    for record in records:
        record['snapshot_pkl'] = network_pkl
        line = json.dumps(record)
        print(line)
        if run_dir is not None:
            metric_main.append_jsonl(record, run_dir)
        if jsonl_path is not None:
            with open(jsonl_path, 'at') as f:
                f.write(line + '\n')


if __name__ == '__main__':
    main()
