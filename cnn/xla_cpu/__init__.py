"""The CNN's ``xla_cpu`` implementation: the same model as :mod:`cnn.model`, computed by kernels
chosen for XLA:CPU, each tested equal to the reference layer it replaces.

- :mod:`cnn.xla_cpu.pool`: 2x2 max-pool whose gradient goes to one winner per window (XLA:CPU
  lowers ``reduce_window``'s gradient to a slow select-and-scatter).
- :mod:`cnn.xla_cpu.norm_pool`: a BN block's training-mode BatchNorm -> ReLU -> pool as one
  function with its gradient written out (fewer passes over the block's largest tensors).
- :mod:`cnn.xla_cpu.dense`: the dense layers' product with a gradient that reads the kernel as it lies.
- :class:`common.dropout.HashedDropout`: dropout masks that XLA fuses (no Threefry loops).

Select it with ``cnn.CNN(..., impl="xla_cpu")`` or ``--impl xla_cpu``; docs/performance.md has
the measurements behind each kernel.
"""

from cnn.model import Layers
from cnn.xla_cpu.block import ConvBlock
from cnn.xla_cpu.dense import dot_general
from common.dropout import HashedDropout

LAYERS = Layers(conv_block=ConvBlock, dropout=HashedDropout, dot_general=dot_general)

__all__ = ["LAYERS", "ConvBlock"]
