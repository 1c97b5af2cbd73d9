"""Arms: the reflection methods the cycle driver can run, registered by name (verl-style).

An arm is one file under ``stepagent/algos/arms/`` with a class registered here::

    @register_arm("implicit")
    class ImplicitArm(Arm):
        def __init__(self, ctx): ...          # optimizers, π_ref snapshot, discriminator...
        def step(self, cycle, subset, cdir):  # the cycle's training; returns its metrics
            ...

The cycle driver (``algos/cycle.py``) owns everything else: resume, the cycle's subset, the
held-out agreement, the evaluation, the metrics row and the checkpoint. Adding an arm is one new
file and one import line in ``algos/arms/__init__.py``.

Which arm a config runs (``arm_name``): ``algo=loop|eto`` are their own arms; ``algo=stepagent``
runs the arm named by its step reward (``reward=implicit|inverse|outcome``); ``algo=sft`` and
``reward=none`` run no cycles.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Type

import torch

from stepagent.train.reference import trainable_snapshot

if TYPE_CHECKING:  # the driver's context; arms never import the driver
    from stepagent.algos.cycle import CycleContext


class Arm:
    """One reflection method: set up once, then one ``step`` per cycle.

    Attributes the driver reads:
      ``train_state``  objects that train across cycles (optimizers, discriminator, value head):
                       saved in every cycle checkpoint and restored before the first resumed cycle
      ``reference``    π_ref's trainable-parameter values (reference: sft), saved with checkpoints
    """

    name = ""

    def __init__(self, ctx: "CycleContext"):
        self.ctx = ctx
        self.train_state: Dict[str, Any] = {}
        self.reference: Optional[Dict[str, torch.Tensor]] = None

    def items(self) -> Sequence[Any]:
        """What each cycle takes a random subset of: the expert trajectories (inspection arms)."""
        return self.ctx.experts

    def subset_size(self) -> Optional[int]:
        """How many ``items`` a cycle uses (None: all)."""
        return self.ctx.cfg.inspection.trajectories

    def step(self, cycle: int, subset: List[Any], cdir: Path) -> Dict[str, Any]:
        """Train on cycle ``cycle``'s ``subset``; write the cycle's data under ``cdir`` (rank 0);
        return the arm's metrics for the cycle row."""
        raise NotImplementedError

    def heldout_metrics(self, segments: Dict[str, List[Any]]) -> Dict[str, Any]:
        """Metrics of the arm's own learned parts on the held-out (dev) expert segments the driver
        has just inspected with the updated policy (greedy, one action per expert prefix); e.g.
        the inverse arm's discriminator accuracy. None by default."""
        return {}


ARMS: Dict[str, Type[Arm]] = {}


def register_arm(*names: str) -> Callable[[Type[Arm]], Type[Arm]]:
    def deco(cls: Type[Arm]) -> Type[Arm]:
        for n in names:
            if n in ARMS:
                raise ValueError(f"arm {n!r} registered twice ({ARMS[n].__name__}, {cls.__name__})")
            ARMS[n] = cls
        return cls

    return deco


def arm_name(cfg: Any) -> Optional[str]:
    """The arm ``cfg`` runs after SFT, or None (the SFT baseline: no cycles)."""
    algo, reward = str(cfg.algo.name), str(cfg.reward.name)
    if algo == "stepagent":
        return None if reward == "none" else reward
    return None if algo == "sft" else algo


def make_arm(ctx: "CycleContext") -> Optional[Arm]:
    name = arm_name(ctx.cfg)
    if name is None:
        return None
    import stepagent.algos.arms  # noqa: F401  (importing the package registers the built-in arms)

    if name not in ARMS:
        raise ValueError(f"no arm registered as {name!r}; registered: {', '.join(sorted(ARMS))}")
    arm = ARMS[name](ctx)
    arm.name = name
    return arm


def sft_reference(ctx: "CycleContext", wanted: bool) -> Optional[Dict[str, torch.Tensor]]:
    """π_ref = the SFT policy: its trainable values now (the cycles start right after SFT), or
    the checkpoint's copy when resuming after a cycle. None when ``wanted`` is false (π_ref is
    the policy at the start of each cycle: no snapshot needed)."""
    if not wanted:
        return None
    return ctx.checkpoints.reference_snapshot() or trainable_snapshot(ctx.policy.model)

