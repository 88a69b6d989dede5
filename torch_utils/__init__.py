"""The PyTorch layer that upstream network pickles expect: persistence, misc, ops, training stats, distributed."""
