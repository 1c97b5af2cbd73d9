"""Data parallelism across the ranks that ``torchrun`` (or the ``deepspeed`` launcher) starts.

Every rank runs the whole pipeline on the same config. What differs is the data:

* inference (evaluation episodes, inspection prompts, reference log-probs, rollouts) is
  split with ``shard_indices`` — rank r takes items r, r+W, r+2W, ... (no padding) — run
  locally, and put back in the original order on every rank by ``gather_sharded``;
  so every rank (and rank 0's logs) sees the full results;
* training minibatches are split with ``shard_batch``, which gives every rank the same
  number of items (padding by repeating the minibatch's first items), so all ranks make
  the same number of forward / backward / optimizer calls — DeepSpeed averages the
  gradients, and ZeRO-3 needs every rank in every collective.

A single process (no launcher, ``deepspeed=none``) touches none of this: every helper is
the identity when no process group exists.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from typing import Any, Dict, List, Optional, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


# ----------------------------------------------------------------------------- who am I
def launched() -> bool:
    """True under torchrun / the deepspeed launcher with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_min: float = 60.0) -> None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Without a launcher, a one-process group on a free local
    port (DeepSpeed always needs a group). Backend: NCCL for CUDA tensors (+ gloo for CPU
    ones) when CUDA is available, gloo otherwise. Idempotent."""
    if is_initialized():
        return
    if not launched():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    log.info("process group: rank %d of %d (%s)", rank(), world_size(), backend)


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. builds a shared cache), then the others do (and
    find the cache built). A plain block in a single process."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def agree_on_start_time() -> datetime.datetime:
    """Rank 0's clock, on every rank (one run directory per job, see run.py)."""
    now = datetime.datetime.now()
    if not (is_initialized() and world_size() > 1):
        return now
    box = [now]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- sharding
def shard_indices(n: int) -> List[int]:
    """This rank's items of ``n``, strided (r, r+W, ...): lengths differ by at most one, no padding."""
    return list(range(rank(), n, world_size()))


def shard_batch(items: Sequence[T]) -> List[T]:
    """This rank's part of a training minibatch: items r, r+W, ..., padded to
    ceil(len/W) by repeating the minibatch's first items, so every rank makes the same
    number of forward/backward calls (the repeated items weigh double in that step)."""
    W = world_size()
    if W == 1:
        return list(items)
    if not items:
        raise ValueError("shard_batch: an empty minibatch cannot be split across ranks")
    per = -(-len(items) // W)
    padded = list(items) + [items[i % len(items)] for i in range(per * W - len(items))]
    return padded[rank() :: W]


def all_gather_objects(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled through the process group)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: List[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_sharded(local: Sequence[T], n: int) -> List[T]:
    """Undo ``shard_indices(n)``: every rank's results back in the original order, on every rank."""
    if world_size() == 1:
        return list(local)
    parts = all_gather_objects(list(local))
    out: List[Any] = [None] * n
    for r, part in enumerate(parts):
        for i, x in zip(range(r, n, len(parts)), part):
            out[i] = x
    return out


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of any rank (a collective: every rank must call it)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


_local_depth = 0


@contextlib.contextmanager
def local_phase():
    """Marks a rank-local phase (generation, log-prob passes: ranks make different numbers of
    calls there), where nothing may call a collective; ``in_local_phase`` tells."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def in_local_phase() -> bool:
    return _local_depth > 0


def mean_over_ranks(stats: Dict[str, float]) -> Dict[str, float]:
    """Average numeric diagnostics over ranks (the same keys on every rank)."""
    if world_size() == 1 or not stats:
        return dict(stats)
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def setup_rank_logging(run_dir, level: int = logging.INFO) -> Optional[str]:
    """Every rank writes ``run_dir/logs/rank<k>.log``; ranks other than 0 also stop writing
    Hydra's shared job log (rank 0 keeps it) and print only warnings to the console."""
    from pathlib import Path

    if not is_initialized():
        return None
    path = Path(run_dir) / "logs" / f"rank{rank()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(getattr(h, "_stepagent_rank_log", False) for h in root.handlers):
        return str(path)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(f"[%(asctime)s][rank {rank()}][%(name)s][%(levelname)s] - %(message)s"))
    fh.setLevel(level)
    fh._stepagent_rank_log = True  # type: ignore[attr-defined]
    if not is_main():
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
            elif isinstance(h, logging.StreamHandler):
                h.setLevel(logging.WARNING)
    root.addHandler(fh)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return str(path)


def share_start_time() -> None:
    """Under a launcher: join the process group and export rank 0's start time as
    STEPAGENT_RUN_DATE / STEPAGENT_RUN_TIME, which conf/config.yaml's ``hydra.run.dir`` reads —
    so every rank's Hydra picks the same run directory (``${now:...}`` may differ by a second)."""
    if not launched():
        return
    init()
    t = agree_on_start_time()
    os.environ.setdefault("STEPAGENT_RUN_DATE", t.strftime("%Y-%m-%d"))
    os.environ.setdefault("STEPAGENT_RUN_TIME", t.strftime("%H-%M-%S"))
