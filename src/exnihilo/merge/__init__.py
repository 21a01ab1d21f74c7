"""Model merging: mergekit-compatible configs (linear, slerp, task arithmetic, TIES, DARE)
and WARP's merge stage, streamed tensor by tensor over safetensors shards."""

from exnihilo.merge.config import MergeConfig, load_config, parse_config
from exnihilo.merge.run import MergeSummary, merge, plan_merge, warp, warp_sweep

__all__ = ["MergeConfig", "MergeSummary", "load_config", "merge", "parse_config",
           "plan_merge", "warp", "warp_sweep"]
