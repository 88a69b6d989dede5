"""StyleGAN2-ADA: the networks (`networks`), every pickle format in and out (`pickles`, `tf_convert`) and the GAN
training loss (`loss`)."""
