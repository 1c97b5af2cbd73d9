"""StepAgent: step-wise RL from expert demonstrations for LLM agents.

Importing this package is deliberately cheap (no torch): environment worker
processes import ``stepagent.envs`` and must start fast.
"""

__version__ = "0.1.0"
