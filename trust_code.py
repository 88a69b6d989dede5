"""List the code a network pickle embeds, and trust it in one step.

Loading a pickle runs the module sources stored in it. With `--refuse-unknown-code` (or
`TOOLKIT_REFUSE_UNKNOWN_CODE=1`) only sources on the allow-list run: this toolkit's own, and the sha256 hashes
in the trust file. This command reads a pickle without running any of its code, prints each embedded source's
hash, the classes it defines and whether it is trusted, and with `--add` appends the untrusted hashes to the
trust file. Read the source first if you do not know where the file comes from (`--show` prints it).

Examples:

    python trust_code.py stylegan2-ffhq-256x256.pkl              # what would run, and is it trusted?
    python trust_code.py --add edm-cifar10-32x32-cond-vp.pkl     # trust it from now on
"""

import os

import click

from stylegan2.pickles import TF_SUBSTITUTES
from torch_utils import persistence, pickle_reader


@click.command(help=__doc__)
@click.argument('pickles', nargs=-1, required=True, metavar='PKL|URL...')
@click.option('--add', is_flag=True, help='Append the untrusted hashes to the trust file')
@click.option('--show', is_flag=True, help='Also print each untrusted source text')
def main(pickles, add, show):
    new = []
    for path in pickles:
        try:
            sources = pickle_reader.embedded_sources(path, substitutes=TF_SUBSTITUTES)
        except pickle_reader.NetworkPickleError as err:
            raise click.ClickException(str(err)) from None
        if not sources:
            print(f'{path}: embeds no code')
        for s in sources:
            print(f'{path}: {s["sha256"]}  trusted={s["trusted"]:<3}  {s["classes"]}')
            if s['trusted'] == 'no' and s['sha256'] not in new:
                new.append(s['sha256'])
                if show:
                    print(s['source'])
    if add and new:
        path = persistence.trusted_code_file()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'a', encoding='utf-8') as f:
            f.writelines(f'{h}  # {", ".join(pickles)}\n' for h in new)
        print(f'Trusted {len(new)} source(s): appended to {path}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
