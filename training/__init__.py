"""Import paths that upstream pickles record (e.g. `training.dataset.ImageFolderDataset`)."""
