"""Checkpoints a run can continue from exactly, and the preemption signals that trigger an exit.

A checkpoint is written at every stage boundary: after SFT and its evaluation, and after every
cycle (its evaluation and metrics row included), so a resumed run redoes at most one stage.
``run_dir/checkpoints/<tag>/`` (``sft``, ``cycle_1``, ...) holds

    config.json, model.safetensors, ...   the policy as ``save_pretrained`` writes it (the full
                                          model, or only the LoRA adapter): loadable by HF as before
    tokenizer files                       (the ``sft`` checkpoint only)
    train_state.pt    state dicts of what trains across cycles: the policy optimizer, the
                      discriminator and its optimizer (reward=inverse), the value head
                      (ppo.advantage=gae; it shares the policy optimizer)
    reference.safetensors  π_ref = the SFT values of the trainable parameters (reference: sft)
    rng.pt            python / numpy / torch (+ CUDA) RNG states
    state.json        stage, cycle, summaries so far, cycle rows, SFT stats, logger state (W&B run
                      id and step, size of metrics.jsonl), the resolved config
    COMPLETE          written last: a manifest of every file above with its size

Atomicity: everything goes to ``<tag>.tmp/`` and is fsynced, ``COMPLETE`` is written and
fsynced last, then the folder is renamed to ``<tag>`` (and the parent fsynced).
``latest_checkpoint`` only accepts folders whose manifest parses and whose files all exist with
the listed sizes, so a crash at any point of a save leaves the previous checkpoint the newest.

Preemption (``stepagent/preemption.py``): a boundary checkpoint is never interrupted; the stop
flag is checked after it is complete, and ``resume=auto`` continues from the newest complete one.

``save_train_state`` / ``load_train_state`` are the only functions that touch model and
optimizer storage, so a sharded (DeepSpeed ZeRO) variant can replace just these two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# what a checkpoint's users need of preemption, importable from here as before
from stepagent.preemption import (EXIT_PREEMPTED, PREEMPTION_SIGNALS, Preempted, check_preemption,  # noqa: F401
                                  preemption_signals, stop_requested)

log = logging.getLogger(__name__)

FORMAT = 1
COMPLETE = "COMPLETE"
TMP_SUFFIX = ".tmp"
RANKS_SUFFIX = ".ranks"  # staging folder of the data-parallel ranks' own files during a save


# ----------------------------------------------------------------------------- files
def is_main_process() -> bool:
    """Rank 0 (or not distributed): the one process that writes checkpoints for now."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> Dict[str, int]:
    """fsync every file and folder under ``root``; returns {relative path: size}."""
    files: Dict[str, int] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            _fsync_path(p)
            files[str(p.relative_to(root))] = p.stat().st_size
        _fsync_path(Path(dirpath))
    return files


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- model + optimizer
def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_train_state(path: Path, model, objects: Mapping[str, Any]) -> None:
    """The policy (``save_pretrained``: full weights, or the LoRA adapter only) and the state
    dicts of ``objects`` (optimizers, the discriminator, a value head, ...) into ``path``.
    Rank 0 writes; a DeepSpeed engine would save its own partition on every rank here."""
    if not is_main_process():
        return
    model.save_pretrained(str(path))
    states = {name: obj.state_dict() for name, obj in objects.items() if obj is not None}
    if states:
        torch.save(states, path / "train_state.pt")


def _load_weights(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded save_pretrained
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: Dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(path / s)))
        return out
    return load_file(str(path / "model.safetensors"))


def load_train_state(path: Path, model, objects: Mapping[str, Any], weights: bool = True) -> None:
    """Inverse of ``save_train_state``: weights into ``model`` in place (unless ``weights`` is
    False: already loaded), state dicts into ``objects``."""
    path = Path(path)
    if not weights:
        pass
    elif _is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        res = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"{path}: adapter keys the model does not have: {res.unexpected_keys[:5]}")
    else:
        sd = _load_weights(path)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected:
            raise ValueError(f"{path}: weights the model does not have: {unexpected[:5]}")
        # save_pretrained leaves out tied weights (lm_head = embeddings): those may be missing
        current = model.state_dict()
        loaded = {current[k].data_ptr() for k in sd if k in current}
        untied = [k for k in missing if current[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(f"{path}: no saved values for {untied[:5]}")
    if weights:
        model.eval()  # every boundary is after an evaluation
    wanted = {n: o for n, o in objects.items() if o is not None}
    if not wanted:
        return
    states = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    from stepagent import distributed as dist
    from stepagent.train.engine import load_module_state

    for name, obj in wanted.items():
        if name not in states:
            raise ValueError(f"{path}: the checkpoint has no state for {name!r} (it has {sorted(states)})")
        if isinstance(obj, torch.nn.Module):
            load_module_state(obj, states[name])  # also a ZeRO-3 partitioned one
            continue
        obj.load_state_dict(states[name])
        if hasattr(obj, "load_rank_state_dict"):  # a DeepSpeed engine: this rank's part of its state
            own = path / f"{name}.rank{dist.rank()}.pt"
            if not own.exists():
                raise ValueError(f"{path}: no {own.name} (saved with fewer ranks?)")
            obj.load_rank_state_dict(torch.load(own, map_location="cpu", weights_only=False))


# ----------------------------------------------------------------------------- save / find
def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(run_dir: Path, tag: str, write: Callable[[Path], None], seq: int) -> Path:
    """Atomically create ``run_dir/checkpoints/<tag>``: ``write(folder)`` fills a temporary
    folder; then fsync, the ``COMPLETE`` manifest (fsynced), rename, fsync of the parent."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / tag, root / (tag + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save
    tmp.mkdir()
    write(tmp)
    files = _fsync_tree(tmp)
    _write_json(tmp / COMPLETE, {"format": FORMAT, "tag": tag, "seq": seq, "time": time.time(), "files": files})
    _fsync_path(tmp)
    if final.exists():  # a checkpoint of the same stage from an abandoned attempt (resume=<older path>)
        old = root / (tag + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_path(root)
    return final


def read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a complete checkpoint folder, or None (no marker, unreadable, files missing
    or of another size than when it was written)."""
    path = Path(path)
    try:
        manifest = json.loads((path / COMPLETE).read_text())
        for rel, size in manifest["files"].items():
            if (path / rel).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def complete_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(seq, folder) of every complete checkpoint of the run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or p.name.endswith((TMP_SUFFIX, ".old", RANKS_SUFFIX)):
            continue
        m = read_manifest(p)
        if m is not None:
            found.append((int(m["seq"]), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` (None: none yet)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: Optional[int], keep_weights: bool = True) -> None:
    """Keep the resume state of the newest ``keep_last`` complete checkpoints (None: all). Older
    ones lose their marker first (so they are never mistaken for complete), then their resume
    state (``keep_weights``: the policy weights stay, as the per-cycle policies) or everything."""
    if keep_last is None:
        return
    found = complete_checkpoints(run_dir)
    for _, path in found[: max(len(found) - keep_last, 0)]:
        (path / COMPLETE).unlink()
        if not keep_weights:
            shutil.rmtree(path)
            continue
        for name in ("train_state.pt", "reference.safetensors", "rng.pt", "state.json"):
            (path / name).unlink(missing_ok=True)
        for f in [*path.glob("*.rank*.pt"), *path.glob("reference.rank*.safetensors")]:  # data parallel ranks'
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- a loaded checkpoint
class Checkpoint:
    """A complete checkpoint folder: its ``state.json`` and how to restore the rest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if read_manifest(self.path) is None:
            raise ValueError(f"{self.path} is not a complete checkpoint (no valid {COMPLETE} marker)")
        self.meta: Dict[str, Any] = json.loads((self.path / "state.json").read_text())
        # sft.init_from: the eval keys this run changed, so the SFT policy is evaluated again
        self.reevaluate: List[str] = []

    @property
    def cycle(self) -> int:
        return int(self.meta["cycle"])

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    def restore_rng(self) -> None:
        from stepagent import distributed as dist

        own = self.path / f"rng.rank{dist.rank()}.pt"  # data parallel: rank k > 0 has its own
        set_rng_state(torch.load(own if dist.rank() > 0 and own.exists() else self.path / "rng.pt",
                                 weights_only=False))

    def load(self, model, objects: Mapping[str, Any] = {}) -> None:
        load_train_state(self.path, model, objects)

    def reference(self) -> Optional[Dict[str, torch.Tensor]]:
        from stepagent import distributed as dist

        p = self.path / f"reference.rank{dist.rank()}.safetensors"  # ZeRO-3: this rank's shards
        if not p.exists():
            p = self.path / "reference.safetensors"
        if not p.exists():
            return None
        from safetensors.torch import load_file

        return load_file(str(p))


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Checkpoint]:
    """``resume``: None (start fresh), ``auto`` (the newest complete checkpoint of ``run_dir``,
    None if there is none yet), or a path: a checkpoint folder, or a run folder (its newest)."""
    if resume is None:
        return None
    if resume == "auto":
        path = latest_checkpoint(run_dir)
        return Checkpoint(path) if path is not None else None
    p = Path(resume)
    if (p / COMPLETE).exists() or (p / "state.json").exists():
        return Checkpoint(p)
    path = latest_checkpoint(p)
    if path is None:
        raise ValueError(f"resume={resume}: neither a complete checkpoint nor a run folder with one")
    return Checkpoint(path)


# ----------------------------------------------------------------------------- the run's checkpointer
def logger_state_of(logger: Any, run_dir: Path) -> Dict[str, Any]:
    """What a resumed run needs of the logger: the W&B run id (to continue the same run), its step,
    and the size of metrics.jsonl (rows after it belong to the stage that will be redone)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    wb = getattr(logger, "wandb_run", None)
    if metrics.exists():
        _fsync_path(metrics)  # the rows the checkpoint counts survive a machine crash too
    return {"wandb_id": getattr(wb, "id", None), "wandb_step": getattr(wb, "step", None),
            "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}


class Checkpointer:
    """What a run saves at each boundary, and what a resumed run gets back.

    Collects the evaluation summaries (``summaries``, label -> summary) and SFT stats the final
    results need; ``save_stage`` / ``save_cycle`` write checkpoints; the cycle loops call
    ``resume_cycles`` (restores their trainable objects, returns where to continue) and
    ``reference_snapshot`` (π_ref = SFT, from the checkpoint when resuming after a cycle).
    """

    def __init__(self, run_dir: Path, cfg: Any = None, logger: Any = None, policy: Any = None,
                 resumed: Optional[Checkpoint] = None):
        self.run_dir = Path(run_dir)
        self.cfg, self.logger, self.policy, self.resumed = cfg, logger, policy, resumed
        meta = resumed.meta if resumed is not None else {}
        self.summaries: Dict[str, Any] = dict(meta.get("summaries", {}))
        self.sft_stats: Dict[str, Any] = dict(meta.get("sft", {}))
        ccfg = getattr(cfg, "checkpoint", None)
        self.keep_last = getattr(ccfg, "keep_last", None)
        self.keep_weights = getattr(ccfg, "keep_weights", True)

    # -- saving
    def _config(self) -> Optional[Dict[str, Any]]:
        from omegaconf import DictConfig, OmegaConf

        return OmegaConf.to_container(self.cfg, resolve=True) if isinstance(self.cfg, DictConfig) else None

    def save(self, tag: str, seq: int, stage: str, cycle: int = 0, history: Sequence[Dict[str, Any]] = (),
             train: Optional[Mapping[str, Any]] = None, reference: Optional[Dict[str, torch.Tensor]] = None,
             tokenizer: bool = False) -> Optional[Path]:
        """Data parallel: every rank calls this. What only a rank has — its part of a DeepSpeed
        optimizer (``<name>.rank<k>.pt``), its RNG state (``rng.rank<k>.pt``, k > 0), under ZeRO-3
        its shard of π_ref (``reference.rank<k>.safetensors``) — goes to a staging folder that
        rank 0 moves into the checkpoint before its COMPLETE marker. ZeRO-3 modules (the policy,
        the discriminator) are gathered for the write (a collective); rank 0 writes the rest."""
        from stepagent import distributed as dist
        from stepagent.train.engine import DeepSpeedTrainEngine, gathered, is_partitioned

        engines = {k: v for k, v in (train or {}).items() if isinstance(v, DeepSpeedTrainEngine)}
        sharded_ref = reference is not None and is_partitioned(self.policy.model)
        staging = None
        if dist.world_size() > 1 or engines:
            staging = checkpoints_dir(self.run_dir) / (tag + RANKS_SUFFIX)
            if dist.is_main():
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            dist.barrier()
            r = dist.rank()
            for name, eng in engines.items():
                torch.save(eng.rank_state_dict(), staging / f"{name}.rank{r}.pt")
            if r > 0:
                torch.save(rng_state(), staging / f"rng.rank{r}.pt")
            if sharded_ref:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in reference.items()},
                          str(staging / f"reference.rank{r}.safetensors"))
            dist.barrier()
        modules = [self.policy.model] + [o for o in (train or {}).values() if isinstance(o, torch.nn.Module)]
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(gathered(m))
            path = self._save(tag, seq, stage, cycle, history, train, None if sharded_ref else reference,
                              tokenizer, staging)
        dist.barrier()
        return path

    def _save(self, tag: str, seq: int, stage: str, cycle: int = 0, history: Sequence[Dict[str, Any]] = (),
              train: Optional[Mapping[str, Any]] = None, reference: Optional[Dict[str, torch.Tensor]] = None,
              tokenizer: bool = False, rank_files: Optional[Path] = None) -> Optional[Path]:
        if not is_main_process():
            return None
        model = self.policy.model

        def write(d: Path) -> None:
            if rank_files is not None:  # every rank's own files (see ``save``)
                for f in sorted(rank_files.iterdir()):
                    shutil.move(str(f), str(d / f.name))
            save_train_state(d, model, train or {})
            if tokenizer:
                self.policy.tokenizer.save_pretrained(str(d))
            if reference is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in reference.items()}, str(d / "reference.safetensors"))
            torch.save(rng_state(), d / "rng.pt")
            logger_state = logger_state_of(self.logger, self.run_dir)
            _write_json(d / "state.json", {
                "format": FORMAT, "tag": tag, "seq": seq, "stage": stage, "cycle": cycle, "time": time.time(),
                "summaries": self.summaries, "sft": self.sft_stats, "history": list(history),
                "train_objects": sorted(k for k, v in (train or {}).items() if v is not None),
                "logger": logger_state, "config": self._config(),
            })

        t0 = time.time()
        path = write_checkpoint(self.run_dir, tag, write, seq)
        if rank_files is not None:
            shutil.rmtree(rank_files, ignore_errors=True)
        log.info("checkpoint %s written in %.1f s", path, time.time() - t0)
        prune_checkpoints(self.run_dir, self.keep_last, self.keep_weights)
        return path

    def save_stage(self, tag: str, tokenizer: bool = True) -> Optional[Path]:
        """The checkpoint after SFT and its evaluation (cycle 0)."""
        return self.save(tag, seq=0, stage=tag, tokenizer=tokenizer)

    def save_cycle(self, cycle: int, history: Sequence[Dict[str, Any]], train: Optional[Mapping[str, Any]] = None,
                   reference: Optional[Dict[str, torch.Tensor]] = None) -> Optional[Path]:
        """The checkpoint after cycle ``cycle`` (its row is the last of ``history``); then the
        preemption check: a signal that arrived during the cycle stops the run here."""
        path = self.save(f"cycle_{cycle}", seq=cycle, stage="cycle", cycle=cycle, history=history,
                         train=train, reference=reference)
        check_preemption(f"after the cycle {cycle} checkpoint")
        return path

    # -- resuming
    @property
    def resuming_cycles(self) -> bool:
        return self.resumed is not None and self.resumed.cycle > 0

    def reference_snapshot(self) -> Optional[Dict[str, torch.Tensor]]:
        """π_ref = SFT values saved with the checkpoint being resumed (None when not resuming
        after a cycle: take the snapshot from the current, SFT, policy)."""
        return self.resumed.reference() if self.resuming_cycles else None

    def resume_cycles(self, train: Optional[Mapping[str, Any]] = None) -> Tuple[List[Dict[str, Any]], int]:
        """(rows of the finished cycles, first cycle to run). When resuming after cycle n: the
        state dicts of ``train`` and the RNG states are restored (the RNG last, right before the
        loop, where the uninterrupted run was when it saved)."""
        if not self.resuming_cycles:
            return [], 1
        r = self.resumed
        want = {k: v for k, v in (train or {}).items() if v is not None}
        have = set(r.meta.get("train_objects", []))
        if set(want) != have:
            raise ValueError(f"{r.path}: saved state for {sorted(have)}, but this run trains {sorted(want)} "
                             "(was the config changed?)")
        load_train_state(r.path, self.policy.model, want, weights=False)  # the pipeline loaded the policy
        r.restore_rng()
        log.info("resuming after cycle %d from %s", r.cycle, r.path)
        return list(r.meta["history"]), r.cycle + 1
