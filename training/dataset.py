"""`training.dataset.ImageFolderDataset`, the class name upstream StyleGAN2-ADA and EDM pickles record in their
dataset kwargs; the implementation lives in `teachers/dataset.py`."""

from teachers.dataset import ImageFolderDataset

__all__ = ['ImageFolderDataset']
