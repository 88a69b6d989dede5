"""StyleGAN2-ADA: the networks (`networks`), every pickle format in and out (`pickles`, with TensorFlow conversion
in `tf_convert`), projection into W (`projection`) and the GAN training loss (`loss`)."""

from .pickles import NetworkPickleError, load_network_pkl, rebuild_network, save_network_pkl

__all__ = ['NetworkPickleError', 'load_network_pkl', 'rebuild_network', 'save_network_pkl']
