import torch
import torch.nn as nn

from peftkit import LayerAdapter


class HelloBias(LayerAdapter):
    def __init__(self, base):
        super().__init__()
        out_features = base.weight.shape[0]
        self.hello_bias = nn.Parameter(torch.zeros(out_features, dtype=base.weight.dtype))

    def delta(self, x, h, base):
        return self.hello_bias.expand_as(h)
