"""Convert a StyleGAN2 network pickle (TensorFlow StyleGAN2/StyleGAN2-ADA, NVIDIA's PyTorch, or ours) into the
stylegan2-ada-pytorch layout `dict(G, D, G_ema, augment_pipe, training_set_kwargs)`, which NVIDIA's tools and
this toolkit load. No TensorFlow is needed.

Example:

\b
    python legacy.py --source=https://nvlabs-fi-cdn.nvidia.com/stylegan2/networks/stylegan2-cat-config-f.pkl \\
        --dest=stylegan2-cat-config-f.pkl

Security: a network pickle contains code, and loading it runs that code. Only load files you trust, or pass
--refuse-unknown-code.
"""

import click

from stylegan2 import pickles, scripting


@click.command(help=__doc__)
@click.option('--source', help='Input pickle; loading it runs code inside it', metavar='PATH|URL', required=True)
@click.option('--dest', help='Output pickle', metavar='PATH', required=True)
@click.option('--force-fp16', help='Rebuild with 4 fp16 resolutions and conv_clamp=256', is_flag=True)
@click.option('--as-ours', help="Rebuild the networks with this toolkit's classes (outputs are checked)",
              is_flag=True)
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose code is not on the allow-list')
@click.option('--overwrite', is_flag=True, help='Replace --dest if it exists')
def main(source, dest, force_fp16, as_ours, refuse_unknown_code, overwrite):
    scripting.set_code_policy(refuse_unknown_code)
    try:
        data = pickles.load_network_pkl(source, force_fp16=force_fp16)
        if as_ours:
            for key in pickles.NETWORK_KEYS:
                if data.get(key) is not None:
                    data[key] = pickles.rebuild_network(data[key])
    except pickles.NetworkPickleError as err:
        raise click.BadParameter(str(err), param_hint='--source') from None
    try:
        pickles.save_network_pkl(dest, **data, overwrite=overwrite)
    except (FileExistsError, pickles.NetworkPickleError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f'Wrote {dest} ({", ".join(k for k in pickles.NETWORK_KEYS if data.get(k) is not None)})')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
