"""Generation engines (``rollout=hf | vllm``) behind one interface (``base.RolloutEngine``)."""

from stepagent.rollout.base import (GenerationStats, RolloutEngine, as_rollout_engine, block_prefix_bound, make_engine,
                                    unique_prefix_tokens)

__all__ = ["GenerationStats", "RolloutEngine", "as_rollout_engine", "block_prefix_bound", "make_engine", "unique_prefix_tokens"]
