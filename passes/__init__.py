"""FX passes: residual-stream detection, block partition, Block AttnRes rewrite.

Installed as ``attnres_compile.passes``. The passes know the read ops only by
their registered names (``torch.ops.attnres.*``) and describe their work as a
:class:`~attnres_compile.passes.plan.Plan` (plain data).
"""

from .detect import find_residual_streams
from .partition import partition_blocks
from .pipeline import apply_plan, plan_graph
from .plan import LayerPlan, Plan, SkippedSite, StreamPlan

__all__ = [
    "LayerPlan",
    "Plan",
    "SkippedSite",
    "StreamPlan",
    "apply_plan",
    "find_residual_streams",
    "partition_blocks",
    "plan_graph",
]
