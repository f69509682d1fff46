"""Block AttnRes reads: PyTorch reference math and the ``attnres::*`` custom ops.

Importing this package registers the ops (``torch.ops.attnres.read``,
``block_read``, ``merge`` and their ``*_backward`` ops).
"""

from . import ops, reference
from .ops import attnres_block_read, attnres_merge, attnres_read

__all__ = ["attnres_block_read", "attnres_merge", "attnres_read", "ops", "reference"]
