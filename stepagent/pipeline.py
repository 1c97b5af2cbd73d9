"""The run: expert trajectories -> policy -> (evaluate init) -> SFT -> evaluate.

``run.py`` hands the Hydra config here. Later stages (StepAgent cycles, PPO
baselines) hook in after SFT.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from stepagent.agent.policy import Policy, build_policy
from stepagent.agent.prompts import PromptEncoder
from stepagent.algos.stepagent import CycleContext, run_stepagent_cycles
from stepagent.config import validate_config
from stepagent.data.experts import load_or_build_experts
from stepagent.data.trajectory import Trajectory
from stepagent.envs import make_task
from stepagent.envs.base import Task
from stepagent.envs.pool import EnvPool
from stepagent.eval.evaluate import SUMMARY_COLUMNS, evaluate, markdown_table, summary_rows
from stepagent.tracking import RunLogger
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


def tokenizer_corpus(task: Task, experts: List[Trajectory]) -> List[str]:
    """Texts the tiny tokenizer is trained on: everything a prompt can contain."""
    texts = [task.preamble()]
    for t in experts:
        texts.append(t.instruction)
        for s in t.steps:
            texts.append(s.action)
            texts.append(s.observation)
    return texts


def make_encoder(policy: Policy, cfg, task: Task) -> PromptEncoder:
    return PromptEncoder(
        policy.tokenizer,
        max_prompt_tokens=cfg.policy.max_seq_len - cfg.policy.max_new_tokens,
        max_observation_chars=cfg.policy.max_observation_chars,
        preamble=task.preamble() if cfg.policy.use_task_preamble else "",
    )


def run_reflection(cfg, policy, encoder, task, experts, run_dir, logger, run_eval, pool, cache_dir):
    """The training cycles after SFT, chosen by ``algo`` (and ``reward`` for StepAgent)."""
    algo, reward = cfg.algo.name, cfg.reward.name
    if cfg.cycles <= 0 or algo == "sft" or (algo == "stepagent" and reward == "none"):
        return []
    heldout: List[Trajectory] = []
    if cfg.inspection.heldout_trajectories:
        heldout = load_or_build_experts(task, cfg.eval.split, cache_dir, task.num_workers)
        heldout = heldout[: cfg.inspection.heldout_trajectories]
    ctx = CycleContext(cfg, policy, encoder, task, experts, heldout, run_dir, logger, run_eval, pool)
    if algo == "eto":
        from stepagent.algos.eto import run_eto_iterations

        return run_eto_iterations(ctx, pool)
    if algo == "loop" or reward == "outcome":
        from stepagent.algos.rollout_ppo import run_rollout_ppo_cycles

        return run_rollout_ppo_cycles(ctx)
    return run_stepagent_cycles(ctx)


def run(raw_cfg: DictConfig) -> Dict[str, Any]:
    cfg = validate_config(raw_cfg)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg))
    logger = RunLogger(run_dir, cfg, cfg.logger)
    try:
        return _run(cfg, run_dir, logger)
    finally:
        logger.finish()


def _run(cfg, run_dir: Path, logger: RunLogger) -> Dict[str, Any]:
    task = make_task(cfg.task)
    cache_dir = Path(cfg.cache_dir)
    experts = load_or_build_experts(task, "train", cache_dir, task.num_workers)
    if cfg.sft.max_trajectories:
        experts = experts[: cfg.sft.max_trajectories]
    log.info("%d expert trajectories (%d steps)", len(experts), sum(len(t) for t in experts))

    policy = build_policy(cfg.policy, tokenizer_corpus(task, experts), cache_dir, cfg.seed)
    encoder = make_encoder(policy, cfg, task)
    instances = task.instances(cfg.eval.split)
    if cfg.eval.max_episodes:
        instances = instances[: cfg.eval.max_episodes]

    summaries: Dict[str, Any] = {}
    with EnvPool(task.env_factory(), task.num_workers, cfg.task.step_timeout_s) as pool:

        def run_eval(tag: str):
            return evaluate(
                policy.model, policy.tokenizer, encoder, task, instances, pool,
                cfg.policy.max_new_tokens, cfg.eval.temperature, out_dir=run_dir, tag=tag, logger=logger,
            )

        if cfg.eval.before_sft:
            summaries["init"] = run_eval("eval_init")
        stats: Dict[str, Any] = {}
        if cfg.sft.enabled:
            samples = sft_samples(experts, encoder, cfg.policy.max_seq_len)
            log.info("SFT on %d sequences", len(samples))
            stats = train_sft(policy.model, samples, cfg.sft, policy.tokenizer.pad_token_id, logger, cfg.seed)
            logger.log(stats)
            policy.model.save_pretrained(str(run_dir / "checkpoints" / "sft"))
            policy.tokenizer.save_pretrained(str(run_dir / "checkpoints" / "sft"))
        start = summaries["sft" if cfg.sft.enabled else "policy"] = run_eval("eval_sft" if cfg.sft.enabled else "eval")
        # cycle 0 of the eval-by-cycle curves: every arm (SFT alone too) starts from this point
        logger.log({"cycle": 0, "eval/reward_x100": start["overall"]["reward_x100"],
                    "eval/success_rate": start["overall"]["success_rate"]})

        cycles = run_reflection(cfg, policy, encoder, task, experts, run_dir, logger, run_eval, pool, cache_dir)
        for row in cycles:
            summaries[f"cycle {row['cycle']}"] = json.loads(
                (run_dir / f"eval_cycle_{row['cycle']}.json").read_text())["summary"]

    table = markdown_table(summaries)
    (run_dir / "results.md").write_text(
        f"# {cfg.task.name} / {cfg.eval.split} split\n\n{table}\n"
    )
    resources = {"peak_rss_mb": peak_rss_mb(), "policy_parameters": policy.num_parameters(),
                 "trainable_parameters": policy.num_parameters(trainable_only=True)}
    logger.log({f"resources/{k}": v for k, v in resources.items()})
    logger.log_table("results", ["policy", *SUMMARY_COLUMNS],
                     [[label, *row] for label, s in summaries.items() for row in summary_rows(s)])
    (run_dir / "results.json").write_text(
        json.dumps({"summaries": summaries, "sft": stats, "cycles": cycles, "resources": resources}, indent=1))
    print(f"\nEvaluation on {cfg.task.name} {cfg.eval.split} ({len(instances)} episodes):\n\n{table}\n")
    print(f"Run directory: {run_dir}")
    return {"summaries": summaries, "sft": stats, "cycles": cycles, "run_dir": str(run_dir)}
