"""Train the offline feature network (metrics/fmnist_net.py) on Fashion-MNIST and save its weights.

The standard detectors (Inception-v3, VGG16) cannot be downloaded on an offline machine; this small classifier
gives the demo and the benchmarks a Fréchet distance that needs no download. Its numbers are not Inception FIDs.

Example (the command that produced the shipped weights: test accuracy 0.9256, 15 minutes on one shared CPU thread):

    python train_detector.py --data=/usr/share/datasets/fashion-mnist --out=metrics/weights/fmnist-features-v1.pt

The data folder holds the four gzip'd idx files of Fashion-MNIST (Debian package `dataset-fashion-mnist`).
"""

import json
import os
import time

import click

from dnnlib.cli_types import FiniteFloatRange
import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from metrics.fmnist_net import FashionFeatureNet, INPUT_RESOLUTION
from training.dataset import IDX_FILES, read_idx

def load_split(data_dir: str, split: str):
    """uint8 images [N, 1, 32, 32] (28x28 padded with black) and int64 labels [N]."""
    image_file, label_file = (os.path.join(data_dir, name) for name in IDX_FILES[split])
    for path in (image_file, label_file):
        if not os.path.isfile(path):
            raise click.ClickException(f'--data: missing {path} (expected the Fashion-MNIST idx files)')
    try:
        images, labels = read_idx(image_file), read_idx(label_file)
    except ValueError as err:
        raise click.ClickException(f'--data: {err}') from None
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise click.ClickException(f'--data: {image_file} and {label_file} do not match')
    pad = (INPUT_RESOLUTION - images.shape[1]) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.to(torch.float32) / 127.5 - 1


@torch.no_grad()
def evaluate(net: FashionFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = net(to_input(images[start:start + batch]))
        correct += (logits.argmax(dim=1) == labels[start:start + batch]).sum().item()
    return correct / len(images)


@click.command()
@click.option('--data', 'data_dir', help='Folder with the Fashion-MNIST idx files', metavar='DIR',
              default='/usr/share/datasets/fashion-mnist', show_default=True)
@click.option('--out', help='Where to save the weights (not overwritten)', metavar='FILE', required=True)
@click.option('--epochs', help='Training epochs', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr', help='Peak learning rate (one-cycle)', type=FiniteFloatRange(min=0, min_open=True),
              default=3e-3, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
@click.option('--threads', help='CPU threads', type=click.IntRange(min=1), default=1, show_default=True)
def main(data_dir, out, epochs, batch, lr, seed, threads):
    """Train the offline Fashion-MNIST feature network and report its test accuracy."""
    if os.path.exists(out):
        raise click.ClickException(f'--out: {out} already exists; choose another name')
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)

    train_images, train_labels = load_split(data_dir, 'train')
    test_images, test_labels = load_split(data_dir, 'test')
    net = FashionFeatureNet()
    steps_per_epoch = len(train_images) // batch
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)

    start_time = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_images), generator=rng)
        bar = tqdm.tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{epochs}', unit='batch')
        for step in bar:
            idx = order[step * batch:(step + 1) * batch]
            x = to_input(train_images[idx])
            flip = torch.rand(len(idx), generator=rng) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(net(x), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f'{loss.item():.3f}')
        accuracy = evaluate(net, test_images, test_labels)
        print(f'epoch {epoch + 1}: test accuracy {accuracy:.4f}')

    meta = dict(format='fmnist-features-v1', test_accuracy=accuracy, epochs=epochs, batch=batch, lr=lr,
                seed=seed, train_seconds=round(time.time() - start_time, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state_dict = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    tmp = out + '.tmp'
    torch.save(dict(state_dict=state_dict, meta=meta), tmp)
    os.replace(tmp, out)
    print(json.dumps(dict(out=out, size_bytes=os.path.getsize(out), **meta)))


if __name__ == '__main__':
    main()
