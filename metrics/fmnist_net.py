"""The offline feature network: a small CNN the project trains on Fashion-MNIST and ships.

It exists so that a Fréchet distance can be reported on a machine without internet. Its numbers are *not*
Inception FIDs and are never labelled as such: results computed with it are named `fd_fmnist...` etc.

Input: 1-channel 32x32 images in [-1, 1] (Fashion-MNIST's 28x28 padded by 2 black pixels on each side).
Features: the 128-d global-average-pooled activations feeding the classifier's single linear layer, in the
same place as Inception's pool3 features sit before its logits.
"""

import torch
from torch import nn

FEATURE_DIM = 128
NUM_CLASSES = 10
INPUT_RESOLUTION = 32
INPUT_CHANNELS = 1


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FashionFeatureNet(nn.Module):
    """32x32 -> 16 -> 8 -> 4, then global average pooling to FEATURE_DIM features and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(INPUT_CHANNELS, 32), nn.MaxPool2d(2),
            _conv_block(32, 64), nn.MaxPool2d(2),
            _conv_block(64, 128), nn.MaxPool2d(2),
            _conv_block(128, FEATURE_DIM),
        )
        self.classifier = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 32, 32] in [-1, 1] -> [N, FEATURE_DIM]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, NUM_CLASSES]."""
        return self.classifier(self.features(x))
