"""peftkit.core: the tuner interface, plugin manager, model wrapper, composition,
merging and serialization.

This package imports torch lazily where it can: the plugin manager, configs and
the shorthand parser are torch-free so that `peftkit methods` stays fast; the
layer and model modules import torch.
"""
