"""Layer plans and the merges that execute them."""

from merge_core.errors import SelfMergeError
from merge_core.layer_plan import LayerPlan

__all__ = ["LayerPlan", "SelfMergeError"]
