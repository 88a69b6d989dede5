"""Where the rooms meet: generator adapters and loaders for every generator pickle (`generators`), and the
options and run wiring that `refine.py` and `distill.py` share (`cli`). `ikl/` stays generic; this package is
the one place that knows StyleGAN2, teachers and the engine together."""
