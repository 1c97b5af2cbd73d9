"""The run: expert trajectories -> policy -> (evaluate init) -> SFT -> evaluate -> cycles -> the final
policy on every split of ``eval.final_splits`` -> results.md (seen/unseen side by side) and results.json.

``run.py`` hands the Hydra config here. After SFT the cycle driver (``algos/cycle.py``) runs
the arm the config names (``algos/registry.py``); the SFT baseline runs none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from stepagent import distributed as dist
from stepagent.agent.policy import Policy, build_policy
from stepagent.agent.prompts import PromptEncoder, PromptFrame
from stepagent.algos.cycle import CycleContext, run_cycles
from stepagent.algos.registry import arm_name
from stepagent.checkpoint import Checkpoint, Checkpointer, complete_checkpoints, latest_checkpoint, resolve_resume
from stepagent.config import ConfigError, validate_config
from stepagent.preemption import Preempted, check_preemption, preemption_signals
from stepagent.rollout.base import make_engine
from stepagent.data.experts import load_experts, load_or_build_experts
from stepagent.data.trajectory import Trajectory
from stepagent.envs import make_task
from stepagent.envs.base import Task, uses_react
from stepagent.envs.pool import EnvPool
from stepagent.eval.evaluate import SUMMARY_COLUMNS, evaluate, results_markdown, splits_table, summary_rows
from stepagent.eval.protocol import caption, score_rule, split_name
from stepagent.tracking import RunLogger
from stepagent.train.engine import deepspeed_config_dict, deepspeed_enabled, enable_deepspeed, train_engine
from stepagent.train.sft import sft_samples, train_sft

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the trainer; environment workers are separate)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_corpus(task: Task, experts: List[Trajectory], frame: Optional[PromptFrame] = None) -> List[str]:
    """Texts the tiny tokenizer is trained on: everything a prompt can contain."""
    texts = [task.preamble()] + (frame.texts() if frame is not None else [])
    for t in experts:
        texts.append(t.instruction)
        for s in t.steps:
            texts.append(s.action)
            texts.append(s.observation)
    return texts


def prompt_frame(cfg) -> Optional[PromptFrame]:
    """ETO's evaluation prompt from ``task.instruction_file`` and ``task.icl_example`` (null, the
    tiny default: none). The example file may hold any trajectory format the readers accept; its
    first record is the example (ETO evaluates 1-shot)."""
    tcfg = getattr(cfg, "task", None)
    inst_path, icl_path = getattr(tcfg, "instruction_file", None), getattr(tcfg, "icl_example", None)
    if not inst_path and not icl_path:
        return None
    instruction = Path(inst_path).expanduser().read_text(encoding="utf-8") if inst_path else ""
    example = None
    if icl_path:
        from stepagent.data.readers import read_trajectory_file

        examples = read_trajectory_file(Path(icl_path).expanduser(), tcfg.name, fmt="auto")
        example = examples[0]
        if len(examples) > 1:
            log.info("%s holds %d trajectories; the first (%s) is the in-context example", icl_path, len(examples),
                     example.id)
    frame = PromptFrame.build(instruction, example, getattr(tcfg, "icl_format", "conversation"))
    log.info("prompt: %s%s, %s layout (task.icl_format)", f"instruction {inst_path}" if inst_path else
             "the task's own preamble", f", in-context example {icl_path} ({len(frame.example_actions)} actions)"
             if icl_path else "", frame.layout)
    return frame


def make_encoder(policy: Policy, cfg, task: Task, frame: Optional[PromptFrame] = None) -> PromptEncoder:
    """The one prompt encoder of a run (SFT, inspection, evaluation, rollouts). An instruction file
    replaces the task's preamble (``policy.use_task_preamble``)."""
    frame = frame if frame is not None else prompt_frame(cfg)
    own_instruction = frame is not None and bool(frame.instruction)
    return PromptEncoder(
        policy.tokenizer,
        max_prompt_tokens=cfg.policy.max_seq_len - cfg.policy.max_new_tokens,
        max_observation_chars=cfg.policy.max_observation_chars,
        preamble=task.preamble() if cfg.policy.use_task_preamble and not own_instruction else "",
        frame=frame,
        goal_reminder=bool(getattr(cfg.policy, "goal_reminder", False)),
    )


def run_reflection(cfg, policy, encoder, task, experts, run_dir, logger, run_eval, pool, cache_dir,
                   checkpoints: Optional[Checkpointer] = None, rollout: Any = None):
    """The training cycles after SFT, of the arm ``cfg`` names (none for the SFT baseline)."""
    if cfg.cycles <= 0 or arm_name(cfg) is None:
        return []
    heldout: List[Trajectory] = []
    if cfg.inspection.heldout_trajectories:
        with dist.main_first():  # rank 0 builds the cache, the other ranks read it
            heldout = load_or_build_experts(task, cfg.eval.split, cache_dir, task.num_workers)
        heldout = heldout[: cfg.inspection.heldout_trajectories]
    ctx = CycleContext(cfg, policy, encoder, task, experts, heldout, run_dir, logger, run_eval, pool,
                       checkpoints=checkpoints, rollout=rollout)
    return run_cycles(ctx)


# ----------------------------------------------------------------------------- resume
# Config keys a resumed run may change without a warning (where things go, not what is computed).
RESUME_FREE_KEYS = ("resume", "run_dir", "cache_dir", "logger", "checkpoint", "cycles", "task.num_workers",
                    "task.step_timeout_s")


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: Optional[Dict[str, Any]], cfg) -> List[str]:
    """Dotted keys whose value differs from the checkpoint's config (the free keys aside)."""
    if not saved:
        return []
    a, b = _flat(saved), _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)]


def finished_results(run_dir: Path) -> Dict[str, Any]:
    """resume=auto on a finished run: print its results again and change nothing."""
    results = json.loads((run_dir / "results.json").read_text())
    md = run_dir / "results.md"
    print(f"\nThis run has finished; its results ({run_dir / 'results.json'}):\n\n"
          f"{md.read_text() if md.exists() else json.dumps(results['summaries'], indent=1)}")
    print(f"Run directory: {run_dir}")
    return {"summaries": results["summaries"], "sft": results["sft"], "cycles": results["cycles"],
            "run_dir": str(run_dir), "finished_before": True}


# Keys the SFT policy depends on: sft.init_from refuses a checkpoint whose run differed in them.
SFT_KEYS = ("seed", "policy", "sft", "task")
# Keys that only change what is evaluated: when they differ, the SFT policy is evaluated again on
# this run's eval.split instead of taking over the SFT run's evaluations.
SFT_EVAL_KEYS = ("eval", "task.eval_per_type", "task.dev_per_type", "task.test_per_type")
SFT_FREE_KEYS = ("sft.init_from", "eval.final_splits", "eval.before_sft", "task.num_workers", "task.step_timeout_s")


def _at_schema_default(cfg, key: str) -> bool:
    """Whether ``cfg``'s value of the dotted ``task.*`` / ``policy.*`` ``key`` equals its schema's default
    (False for any other key, or a key the schema does not know)."""
    from stepagent.config import POLICY_SCHEMAS, TASK_SCHEMAS

    group, _, field = key.partition(".")
    node = cfg.get(group) if group in ("task", "policy") else None
    if node is None or "." in field:
        return False
    schemas = TASK_SCHEMAS if group == "task" else POLICY_SCHEMAS
    schema = schemas.get(str(node.get("name" if group == "task" else "kind")))
    if schema is None or field not in getattr(schema, "__dataclass_fields__", {}):
        return False
    f = schema.__dataclass_fields__[field]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return node.get(field) == default


def _under(key: str, prefixes: Tuple[str, ...]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in prefixes)


def sft_checkpoint(cfg) -> Checkpoint:
    """``sft.init_from``'s SFT-stage checkpoint, checked against this run's config."""
    path = Path(cfg.sft.init_from)
    try:
        if (path / "state.json").exists():
            found = Checkpoint(path)
        else:
            stages = [Checkpoint(p) for _, p in complete_checkpoints(path)]
            stages = [c for c in stages if c.meta.get("stage") == "sft" and c.cycle == 0]
            if not stages:
                raise ValueError(f"{path} holds no complete SFT checkpoint (has its SFT run finished?)")
            found = stages[-1]
    except ValueError as e:
        raise ConfigError(f"sft.init_from={cfg.sft.init_from}: {e}") from None
    if found.meta.get("stage") != "sft" or found.cycle != 0:
        raise ConfigError(f"sft.init_from={cfg.sft.init_from}: {found.path} is the checkpoint of stage "
                          f"{found.meta.get('stage')!r} (cycle {found.cycle}), not of SFT")
    saved = _flat(found.meta.get("config") or {})
    # a key the checkpoint's config lacks is newer than that run: unchanged if this run keeps it at its
    # schema default (which reproduces the old behaviour), changed otherwise
    changed = [k for k in config_changes(found.meta.get("config"), cfg)
               if (k in saved or not _at_schema_default(cfg, k)) and not _under(k, SFT_FREE_KEYS)]
    evaluated = [k for k in changed if _under(k, SFT_EVAL_KEYS)]
    differ = [k for k in changed if _under(k, SFT_KEYS) and k not in evaluated]
    if differ:
        raise ConfigError(f"sft.init_from={cfg.sft.init_from}: that SFT ran with other values of "
                          f"{', '.join(differ)}; start from an SFT run with this run's settings")
    found.reevaluate = evaluated  # the SFT run's evaluations measured something else: evaluate again
    return found


def prepare_resume(cfg, run_dir: Path) -> Optional[Checkpoint]:
    """The checkpoint ``resume`` names (None: start from the beginning), else ``sft.init_from``'s
    SFT checkpoint, with ``metrics.jsonl`` cut back to the rows logged before it: those after
    belong to the stage that is redone."""
    if cfg.resume is None and not cfg.sft.init_from:
        return None
    try:
        resumed = resolve_resume(cfg.resume, run_dir) if cfg.resume is not None else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    metrics = run_dir / "metrics.jsonl"
    if resumed is None and cfg.sft.init_from:
        resumed = sft_checkpoint(cfg)
        log.info("sft.init_from: starting from the SFT checkpoint %s", resumed.path)
    if resumed is None:
        log.info("resume=%s: no complete checkpoint in %s, starting from the beginning", cfg.resume, run_dir)
        if dist.is_main():
            metrics.unlink(missing_ok=True)  # rows of an attempt that stopped before its first checkpoint
        return None
    size = int(resumed.meta["logger"].get("metrics_bytes", 0))
    if not dist.is_main():  # data parallel: rank 0 owns metrics.jsonl
        pass
    elif resumed.run_dir.resolve() == run_dir.resolve():
        if metrics.exists() and metrics.stat().st_size >= size:
            os.truncate(metrics, size)
        else:
            log.warning("%s is shorter than when %s was written; keeping it as it is", metrics, resumed.path)
    else:  # another run's checkpoint: this run starts with that run's rows up to it
        src = resumed.run_dir / "metrics.jsonl"
        metrics.write_bytes(src.read_bytes()[:size] if src.exists() else b"")
    changed = config_changes(resumed.meta.get("config"), cfg)
    if changed and resumed.run_dir.resolve() != run_dir.resolve() and cfg.sft.init_from:
        log.info("this run's config differs from the SFT run's in: %s", ", ".join(changed))
    elif changed:
        log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
    log.info("resuming from %s (%s)", resumed.path,
             f"after cycle {resumed.cycle}" if resumed.cycle else f"after stage {resumed.meta['stage']}")
    return resumed


def continue_wandb_steps(logger: RunLogger, resumed: Checkpoint) -> None:
    """A resumed W&B run continues at the checkpoint's step, or after the server's last step
    (online: what the stopped attempt logged after the checkpoint stays in W&B's history, which
    only W&B's rewind could cut). Offline, W&B restarts at step 0 without this."""
    wb, saved = logger.wandb_run, resumed.meta["logger"].get("wandb_step")
    if wb is None or saved is None:
        return
    wb.log({"resumed_from_cycle": resumed.cycle}, step=max(int(saved), wb.step), commit=True)


def on_preempted(e: Preempted, cfg, run_dir: Path, logger: RunLogger) -> None:
    """Say what the next attempt continues from; mark the W&B run; optionally requeue."""
    newest = latest_checkpoint(run_dir)
    log.warning("%s. Newest complete checkpoint: %s. Exiting with code %d; the same command with "
                "resume=auto continues from it.", e, newest or "none (a resumed run starts from the beginning)",
                e.exit_code)
    if logger.wandb_run is not None:
        try:
            logger.wandb_run.mark_preempting()
        except Exception as err:  # never let bookkeeping hide the preemption
            log.warning("W&B mark_preempting failed: %s", err)
    job = os.environ.get("SLURM_JOB_ID")
    if cfg.checkpoint.requeue and job:
        log.warning("requeueing SLURM job %s", job)
        subprocess.run(["scontrol", "requeue", job], check=False)


def eval_instances(task: Task, split: str, cfg) -> list:
    """The instances an evaluation on ``split`` plays (the first ``eval.max_episodes``)."""
    instances = task.instances(split)
    return instances[: cfg.eval.max_episodes] if cfg.eval.max_episodes else instances


def final_splits(cfg) -> List[str]:
    """The splits the final policy is reported on: ``eval.final_splits`` with ``eval.split`` (train,
    dev, test order)."""
    wanted = {str(s) for s in cfg.eval.final_splits} | {str(cfg.eval.split)}
    return [s for s in ("train", "dev", "test") if s in wanted]


def eval_label(tag: str) -> str:
    """The results-table label of an evaluation tag (eval_cycle_2 -> cycle 2)."""
    return {"eval_init": "init", "eval_sft": "sft", "eval": "policy"}.get(tag) or \
        tag.removeprefix("eval_").replace("_", " ")


def setup_deepspeed(cfg, run_dir: Path) -> None:
    """deepspeed != none: join the process group (torchrun's, or a one-rank group without a
    launcher), route every optimizer through DeepSpeed, one log file per rank."""
    ds_config = deepspeed_config_dict(cfg.deepspeed, cfg.policy.dtype)
    if ds_config is None:
        enable_deepspeed(None)
        return
    dist.init()
    enable_deepspeed(ds_config)
    path = dist.setup_rank_logging(run_dir)
    log.info("DeepSpeed %s (ZeRO stage %d) on %d rank(s); this rank logs to %s", cfg.deepspeed.name,
             cfg.deepspeed.stage, dist.world_size(), path)


def run(raw_cfg: DictConfig) -> Dict[str, Any]:
    cfg = validate_config(raw_cfg)
    run_dir = Path(cfg.run_dir)
    if cfg.resume == "auto" and (run_dir / "results.json").exists():
        return finished_results(run_dir)
    setup_deepspeed(cfg, run_dir)
    # every rank samples its own actions: rank 0 keeps the single-process seed
    seed_everything(cfg.seed + 100_003 * dist.rank())
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = prepare_resume(cfg, run_dir)
    if dist.is_main():
        (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg))
    same_run = resumed is not None and resumed.run_dir.resolve() == run_dir.resolve()
    # one logger per job: only rank 0 writes metrics.jsonl and W&B
    logger = RunLogger(run_dir, cfg, cfg.logger, enabled=dist.is_main(),
                       resume_run_id=resumed.meta["logger"].get("wandb_id") if same_run else None)
    if same_run:
        continue_wandb_steps(logger, resumed)
    try:
        with preemption_signals():
            return _run(cfg, run_dir, logger, resumed)
    except Preempted as e:
        on_preempted(e, cfg, run_dir, logger)
        raise
    finally:
        logger.finish()


def _run(cfg, run_dir: Path, logger: RunLogger, resumed: Optional[Checkpoint] = None) -> Dict[str, Any]:
    task = make_task(cfg.task)
    cache_dir = Path(cfg.cache_dir)
    with dist.main_first():  # data parallel: rank 0 builds the caches, the other ranks read them
        experts = load_experts(cfg.task, task, cache_dir)  # task.experts_file, else the gold paths
    if cfg.sft.max_trajectories:
        experts = experts[: cfg.sft.max_trajectories]
    log.info("%d expert trajectories (%d steps)", len(experts), sum(len(t) for t in experts))
    task.react = uses_react(cfg.task.action_format, [s.action for t in experts for s in t.steps])
    log.info("actions: %s (task.action_format=%s)", "ReAct, the environment gets the text after 'Action: '"
             if task.react else "bare", cfg.task.action_format)

    with dist.main_first():
        frame = prompt_frame(cfg)
        policy = build_policy(cfg.policy, tokenizer_corpus(task, experts, frame), cache_dir, cfg.seed)
    encoder = make_encoder(policy, cfg, task, frame)
    instances = eval_instances(task, str(cfg.eval.split), cfg)

    # Evaluation summaries and SFT stats so far (restored when resuming), and the checkpoints.
    ckpt = Checkpointer(run_dir, cfg, logger, policy, resumed)
    if resumed is not None:
        resumed.load(policy.model)
    if deepspeed_enabled():
        # the policy's one DeepSpeed engine, before anything snapshots its parameters (ZeRO-3
        # partitions them here); every training stage reuses it with its own lr
        train_engine(policy.model, lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay)
    # the generation engine of every evaluation, inspection and rollout (rollout=hf | vllm)
    rollout = make_engine(cfg, policy, run_dir)
    with contextlib.closing(rollout), EnvPool(task.env_factory(), task.num_workers, cfg.task.step_timeout_s) as pool:

        def run_eval(tag: str):
            rollout.pop_stats()
            summary = evaluate(
                rollout, policy.tokenizer, encoder, task, instances, pool,
                cfg.policy.max_new_tokens, cfg.eval.temperature, out_dir=run_dir if dist.is_main() else None,
                tag=tag, logger=logger,
            )
            logger.log(rollout.pop_stats().as_row(f"{tag}/generation"))
            ckpt.summaries[eval_label(tag)] = summary
            return summary

        if resumed is None:
            if cfg.eval.before_sft:
                run_eval("eval_init")
            if cfg.sft.enabled:
                check_preemption("before SFT")
                samples = sft_samples(experts, encoder, cfg.policy.max_seq_len)
                log.info("SFT on %d sequences", len(samples))
                ckpt.sft_stats = train_sft(policy.model, samples, cfg.sft, policy.tokenizer.pad_token_id, logger,
                                           cfg.seed)
                logger.log(ckpt.sft_stats)
            check_preemption("before the evaluation after SFT")
            start = run_eval("eval_sft" if cfg.sft.enabled else "eval")
            # cycle 0 of the eval-by-cycle curves: every arm (SFT alone too) starts from this point
            logger.log({"cycle": 0, "eval/reward_x100": start["overall"]["reward_x100"],
                        "eval/success_rate": start["overall"]["success_rate"]})
            # the policy (+ tokenizer) after SFT and its evaluation: a resumed run starts here at the latest
            ckpt.save_stage("sft" if cfg.sft.enabled else "start")
            check_preemption("after the SFT checkpoint")
        else:
            resumed.restore_rng()  # the RNG states the uninterrupted run had at this point
            if resumed.reevaluate:
                log.info("sft.init_from: evaluating the SFT policy again (this run differs in %s)",
                         ", ".join(resumed.reevaluate))
                ckpt.summaries.clear()
                start = run_eval("eval_sft")
                logger.log({"cycle": 0, "eval/reward_x100": start["overall"]["reward_x100"],
                            "eval/success_rate": start["overall"]["success_rate"]})
                ckpt.save_stage("sft")  # this run's own SFT checkpoint, with its evaluations (an init_from)

        cycles = run_reflection(cfg, policy, encoder, task, experts, run_dir, logger, run_eval, pool, cache_dir,
                                checkpoints=ckpt, rollout=rollout)
        # the final policy on every split of eval.final_splits (eval.split's evaluation is reused)
        summaries = ckpt.summaries
        final_label = list(summaries)[-1]
        finals: Dict[str, Any] = {}
        for split in final_splits(cfg):
            if split == str(cfg.eval.split):
                finals[split] = summaries[final_label]
                continue
            check_preemption(f"before the final evaluation on {split}")
            finals[split] = evaluate(
                rollout, policy.tokenizer, encoder, task, eval_instances(task, split, cfg), pool,
                cfg.policy.max_new_tokens, cfg.eval.temperature, out_dir=run_dir if dist.is_main() else None,
                tag=f"eval_final_{split}", logger=logger,
            )
    stats = ckpt.sft_stats
    if not dist.is_main():  # rank 0 writes the results
        return {"summaries": summaries, "sft": stats, "cycles": cycles, "run_dir": str(run_dir)}

    rule = score_rule(cfg.task.name, cfg.task)
    md = results_markdown(cfg.task.name, str(cfg.eval.split), summaries, finals, final_label, rule)
    (run_dir / "results.md").write_text(md)
    resources = {"peak_rss_mb": peak_rss_mb(), "policy_parameters": policy.num_parameters(),
                 "trainable_parameters": policy.num_parameters(trainable_only=True)}
    logger.log({f"resources/{k}": v for k, v in resources.items()})
    logger.log_table("results", ["policy", *SUMMARY_COLUMNS],
                     [[label, *row] for label, s in summaries.items() for row in summary_rows(s)])
    logger.log_table("results_by_split", ["split", "policy", *SUMMARY_COLUMNS],
                     [[split_name(cfg.task.name, sp), final_label, *row] for sp, s in finals.items()
                      for row in summary_rows(s)])
    # "summaries": every stage on eval.split, as before (experiments/report.py, resume); "final": the
    # final policy on each split; "protocol": what the numbers measure
    protocol = {"task": cfg.task.name, "split": str(cfg.eval.split), "final_splits": list(finals),
                "split_names": {sp: split_name(cfg.task.name, sp) for sp in finals}, "score": rule,
                "caption": caption(cfg.task.name, rule)}
    (run_dir / "results.json").write_text(json.dumps(
        {"summaries": summaries, "final": {"policy": final_label, "splits": finals}, "protocol": protocol,
         "sft": stats, "cycles": cycles, "resources": resources}, indent=1))
    print(f"\n{cfg.task.name}: {caption(cfg.task.name, rule)}\n\n"
          f"{splits_table(cfg.task.name, str(cfg.eval.split), summaries, finals, final_label)}\n\n"
          f"(per task type: {run_dir / 'results.md'})\n")
    print(f"Run directory: {run_dir}")
    return {"summaries": summaries, "final": {"policy": final_label, "splits": finals}, "sft": stats,
            "cycles": cycles, "run_dir": str(run_dir)}
