"""Training data and the run layer every trainer shares (`training.dataset.ImageFolderDataset` is also the
class name upstream pickles record)."""
