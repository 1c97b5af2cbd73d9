"""Typed config schemas.

Hydra composes plain YAML from ``conf/``; ``validate_config`` then merges every
group into its dataclass schema, so an unknown key or a wrong type fails at
start-up with the dotted key in the message (not at hour three). Groups whose
options have different fields (``task``, ``policy``) pick their schema from a
registry keyed by the option's ``name``/``kind`` (verl-style).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


# ----------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING
    data_dir: str = MISSING  # folder with the task's data files (the repo's data/<task> by default)
    num_workers: int = 2  # environment worker processes (ScienceWorld: one JVM each)
    task_types: Optional[List[str]] = None  # keep only these task types (None: all)
    train_per_type: Optional[int] = None  # cap on train instances per task type (None: all)
    eval_per_type: Optional[int] = None  # cap on dev/test instances per task type (None: all)
    step_timeout_s: float = 120.0  # a worker silent for this long is killed and restarted


@dataclass
class ScienceWorldTaskConfig(TaskConfig):
    name: str = "scienceworld"
    simplification: str = "easy"  # ETO's simplificationStr
    max_steps: Optional[int] = None  # None: ETO's per-task step limits (max_steps.json)
    env_step_limit: int = 100  # the simulator's own hard limit


@dataclass
class HotpotQATaskConfig(TaskConfig):
    name: str = "hotpotqa"
    max_steps: int = 8
    search_sentences: int = 5  # sentences returned by search[...] (ReAct returns the first 5)
    n_train: int = 300  # deterministic split of the 500 questions, see data/hotpotqa/README.md
    n_dev: int = 100  # test = the remaining 100
    # Keep only questions whose supporting paragraphs are all in their context (151 of 500;
    # the shipped file lacks the others' evidence). The split is made before this filter.
    answerable_only: bool = True


TASK_SCHEMAS: Dict[str, type] = {
    "scienceworld": ScienceWorldTaskConfig,
    "hotpotqa": HotpotQATaskConfig,
}


class ConfigError(ValueError):
    pass


def _merge_typed(schema: type, node: Any, where: str) -> Any:
    try:
        typed = OmegaConf.structured(schema)
        return OmegaConf.merge(typed, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        raise ConfigError(
            f"bad config in group '{where}' (schema {schema.__name__})"
            + (f": key '{where}.{key}'" if key else "")
            + f": {str(e).splitlines()[0]}"
        ) from None


def _validate_named(node: Any, schemas: Dict[str, type], what: str, key: str,
                    group: Optional[str] = None, known: str = "known") -> Any:
    """Pick ``node``'s schema by ``node[key]`` (verl-style registry) and merge into it."""
    name = node.get(key) if isinstance(node, (dict, DictConfig)) else None
    if name not in schemas:
        raise ConfigError(f"unknown {what} {name!r}; {known}: {', '.join(sorted(schemas))}")
    return _merge_typed(schemas[name], node, group or what)


def validate_task_config(node: Any) -> Any:
    """Merge a ``task`` node into its schema (picked by ``name``)."""
    return _validate_named(node, TASK_SCHEMAS, "task", "name", known="registered tasks")


# ----------------------------------------------------------------------------- policy
@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class PolicyConfig:
    kind: str = MISSING  # tiny | hf
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager (| flash_attention_2 on GPUs that have it)
    max_seq_len: int = 1024  # training sequence length; prompts get max_seq_len - max_new_tokens
    max_new_tokens: int = 32  # per action
    max_observation_chars: int = 2000  # truncation rule step 1, see stepagent/agent/prompts.py
    use_task_preamble: bool = True  # put the task's action-syntax description in a system message


@dataclass
class TinyPolicyConfig(PolicyConfig):
    kind: str = "tiny"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4


@dataclass
class HFPolicyConfig(PolicyConfig):
    kind: str = "hf"
    name_or_path: str = MISSING  # hub name or local directory saved with save_pretrained
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # override the tokenizer's template
    eos_token: Optional[str] = None  # end-of-turn token, e.g. "<|eot_id|>" for Llama-3
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)


POLICY_SCHEMAS: Dict[str, type] = {"tiny": TinyPolicyConfig, "hf": HFPolicyConfig}


# ----------------------------------------------------------------------------- training
@dataclass
class SFTConfig:
    enabled: bool = True
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8  # sequences per optimizer step
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_trajectories: Optional[int] = None  # use only the first N expert trajectories


@dataclass
class EvalConfig:
    split: str = "dev"  # dev (ScienceWorld "seen") | test ("unseen") | train
    before_sft: bool = True  # also evaluate the untrained policy, for the SFT-vs-init comparison
    temperature: float = 0.0  # 0: greedy
    max_episodes: Optional[int] = None


@dataclass
class RewardConfig:
    name: str = MISSING  # none (SFT only) | implicit | inverse | outcome


@dataclass
class NoRewardConfig(RewardConfig):
    name: str = "none"


@dataclass
class ImplicitRewardConfig(RewardConfig):
    """Step-level DPO, expert action preferred over the agent's in the same state."""

    name: str = "implicit"
    beta: float = 0.1
    reference: str = "cycle_start"  # cycle_start | sft : which policy is π_ref
    lr: float = 1e-4
    epochs: int = 1  # passes over the cycle's contrast data
    batch_size: int = 4  # packed trajectories per optimizer step
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    nll_weight: float = 0.0  # optional λ·NLL(a^e|s) beside the DPO loss; 0 = METHOD.md's loss exactly


@dataclass
class InverseRewardConfig(RewardConfig):
    """GAIL: a discriminator D(s, a) (D -> 1 on agent pairs) gives the step reward; PPO updates the policy."""

    name: str = "inverse"
    form: str = "gail"  # gail: r = -log D(s,a) | airl: r = log D_E - log(1 - D_E) = -logit D(s,a)
    normalize: Optional[str] = "batch"  # None | batch: zero mean, unit std over the cycle's agent samples
    disc_hidden_size: int = 128  # the discriminator: a separate small Llama encoder + scalar head
    disc_num_layers: int = 2
    disc_num_heads: int = 4
    disc_max_len: int = 512  # (state + action) tokens, left-truncated
    disc_lr: float = 3e-4
    disc_epochs: int = 2
    disc_batch_size: int = 16


@dataclass
class OutcomeRewardConfig(RewardConfig):
    """Ablation: the same PPO, on the agent's own rollouts, final environment score as the only reward."""

    name: str = "outcome"


REWARD_SCHEMAS: Dict[str, type] = {
    "none": NoRewardConfig,
    "implicit": ImplicitRewardConfig,
    "inverse": InverseRewardConfig,
    "outcome": OutcomeRewardConfig,
}


# ----------------------------------------------------------------------------- algorithm
@dataclass
class AlgoConfig:
    name: str = MISSING  # stepagent | sft | loop | eto


@dataclass
class StepAgentAlgoConfig(AlgoConfig):
    name: str = "stepagent"


@dataclass
class SFTAlgoConfig(AlgoConfig):
    name: str = "sft"


@dataclass
class LoopAlgoConfig(AlgoConfig):
    """LOOP (METHOD.md §2): K rollouts per task, leave-one-out advantage, per-token PPO, no KL."""

    name: str = "loop"


@dataclass
class ETOAlgoConfig(AlgoConfig):
    """ETO: explore, pair failed rollouts with the expert trajectory, trajectory-level DPO."""

    name: str = "eto"
    beta: float = 0.1
    lr: float = 1e-4
    epochs: int = 1  # passes over the iteration's pairs
    batch_size: int = 4  # pairs per optimizer step
    micro_batch_size: Optional[int] = None  # pairs per forward/backward (None: the whole batch)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    reference: str = "iteration_start"  # iteration_start | sft : which policy is π_ref
    tasks_per_iteration: Optional[int] = 32  # training tasks explored per iteration (None: all)
    rollouts_per_task: int = 1
    temperature: float = 1.0  # exploration sampling temperature
    rejected_extra_steps: Optional[int] = 5  # keep <= len(τ^e) + this many agent actions (ETO's cut)
    nll_weight: float = 0.0  # λ of an optional NLL term on τ^e; 0 = ETO as published


ALGO_SCHEMAS: Dict[str, type] = {
    "stepagent": StepAgentAlgoConfig,
    "sft": SFTAlgoConfig,
    "loop": LoopAlgoConfig,
    "eto": ETOAlgoConfig,
}
# Which step rewards each algorithm accepts; anything else fails at start.
ALGO_REWARDS: Dict[str, tuple] = {
    "stepagent": ("none", "implicit", "inverse", "outcome"),
    "sft": ("none",),
    "loop": ("none",),
    "eto": ("none",),
}


@dataclass
class InspectionConfig:
    """Inspection: at every expert prefix the agent produces its own actions."""

    samples_per_state: int = 2  # K agent actions per expert state
    temperature: float = 1.0
    trajectories: Optional[int] = 64  # expert trajectories inspected per cycle (random subset; None: all)
    batch_size: int = 16  # prompts per generation call
    heldout_trajectories: Optional[int] = 20  # dev expert trajectories for the held-out agreement rate


@dataclass
class PPOConfig:
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman's estimators)
    entropy_coef: float = 0.0
    epochs: int = 2
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    advantage: str = "loo"  # loo (leave-one-out over K samples) | gae (value head on the policy, GAE(γ, λ))
    gamma: float = 1.0
    lam: float = 0.95
    reference: str = "sft"  # π_ref of the KL term: sft | cycle_start
    value_coef: float = 0.5  # gae only: c_V of the clipped value loss (clipped at clip_eps around V_old)
    drop_advantage_below: float = 0.0  # LOOP drops samples with |A| < 0.01
    batch_size: int = 4  # packed trajectories / rollouts per forward


@dataclass
class LoggerConfig:
    """W&B run identity (stepagent/tracking.py ``wandb_identity``): None picks the default."""

    name: str = MISSING  # none | wandb
    project: str = "stepagent"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the experiment's name (the task's without one)
    job_type: Optional[str] = None  # None: the arm (algo / algo-reward without one)
    run_name: Optional[str] = None  # None: <arm>_s<seed>
    tags: List[str] = field(default_factory=list)  # added to the automatic key:value tags
    auto_tags: bool = True  # experiment/task/arm/algo/reward/policy/seed tags
    mode: Optional[str] = None  # online | offline; None: offline when no WANDB_API_KEY is set


@dataclass
class CheckpointConfig:
    """Resumable checkpoints after SFT and after every cycle (stepagent/checkpoint.py)."""

    # Checkpoints that keep their resume state (optimizer, RNG, discriminator, π_ref snapshot),
    # newest first; older ones are reduced to the policy weights. None: keep all.
    keep_last: Optional[int] = None
    keep_weights: bool = True  # false: a pruned checkpoint is deleted, weights included
    # After SIGTERM/SIGUSR1 under SLURM (SLURM_JOB_ID set) also run `scontrol requeue $SLURM_JOB_ID`.
    # Leave false with slurm/*.sbatch: their wrapper requeues.
    requeue: bool = False


@dataclass
class DeepSpeedConfig:
    """Data parallelism with DeepSpeed ZeRO (stepagent/train/engine.py, stepagent/distributed.py).

    ``none``: plain PyTorch in one process. Any other option: one rank per process started by
    ``torchrun --nproc_per_node N run.py deepspeed=zero2`` (or the ``deepspeed`` launcher);
    without a launcher it runs as a single rank (world size 1)."""

    name: str = "none"  # none | zero0 | zero2 | zero3 | zero3_offload (conf/deepspeed/<name>.yaml)
    stage: int = 0  # ZeRO stage: 0 data parallel | 1 optimizer state | 2 + gradients | 3 + parameters sharded
    offload_optimizer: Optional[str] = None  # None | cpu: optimizer state and step on the CPU (stage >= 1)
    offload_param: Optional[str] = None  # None | cpu: parameter shards on the CPU (stage 3)
    pin_memory: bool = False  # pinned CPU buffers for offload (faster copies to a GPU)
    # Stage 3 keeps parameters with at most this many elements whole on every rank (None:
    # DeepSpeed's 1e5). 0 partitions everything (the tests: the tiny model really is split).
    stage3_param_persistence_threshold: Optional[int] = None
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default


def validate_deepspeed_config(d: Any, world_size: int = 1) -> None:
    """Stage/offload combinations DeepSpeed accepts, and a launcher only with DeepSpeed."""
    if d.name == "none":
        if world_size > 1:
            raise ConfigError(
                f"started with {world_size} ranks but deepspeed=none: data parallelism goes through "
                "DeepSpeed, e.g. `torchrun --nproc_per_node N run.py deepspeed=zero2`"
            )
        return
    if d.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage must be 0, 1, 2 or 3, got {d.stage}")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(d, key) not in (None, "cpu", "none"):
            raise ConfigError(f"deepspeed.{key} must be null or cpu, got {getattr(d, key)!r}")
    if d.offload_param not in (None, "none") and d.stage != 3:
        raise ConfigError("deepspeed.offload_param needs ZeRO stage 3")
    if d.offload_optimizer not in (None, "none") and d.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage >= 1")


@dataclass
class Config:
    task: Any = MISSING
    policy: Any = MISSING
    algo: Any = MISSING
    reward: Any = MISSING
    ppo: PPOConfig = MISSING
    inspection: InspectionConfig = field(default_factory=InspectionConfig)
    logger: LoggerConfig = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    cycles: int = 3  # inspection + reflection cycles after SFT (ignored by reward=none)
    run_dir: str = MISSING
    cache_dir: str = MISSING
    experiment: Optional[str] = None  # set by experiments/experiment/<name>.yaml
    arm: Optional[str] = None  # ablation arm (conf/arm), names the run in reports
    # null: start fresh | auto: continue from the newest complete checkpoint in run_dir (start
    # fresh if none; a finished run only reprints its results) | <path>: a checkpoint folder or a run folder
    resume: Optional[str] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # conf/deepspeed: none | zero0 | zero2 | zero3 | ...


def validate_policy_config(node: Any) -> Any:
    return _validate_named(node, POLICY_SCHEMAS, "policy kind", "kind", group="policy")


def validate_reward_config(node: Any) -> Any:
    return _validate_named(node, REWARD_SCHEMAS, "reward", "name")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Merge the composed config into the typed schemas; raise ConfigError naming a bad key."""
    cfg = OmegaConf.to_container(cfg, resolve=True)  # resolve ${hydra:...} while Hydra is live
    task = validate_task_config(cfg.get("task"))
    policy = validate_policy_config(cfg.get("policy"))
    reward = validate_reward_config(cfg.get("reward"))
    algo = _validate_named(cfg.get("algo"), ALGO_SCHEMAS, "algo", "name")
    if reward.name not in ALGO_REWARDS[algo.name]:
        raise ConfigError(
            f"algo={algo.name} does not take reward={reward.name}; it accepts reward="
            + " | ".join(ALGO_REWARDS[algo.name])
            + ("" if algo.name == "stepagent" else " (use algo=stepagent for step rewards)")
        )
    advantage = (cfg.get("ppo") or {}).get("advantage", "loo")
    if advantage not in ("loo", "gae"):
        raise ConfigError(f"ppo.advantage must be loo | gae, got {advantage!r}")
    rest = {k: v for k, v in cfg.items() if k not in ("task", "policy", "reward", "algo")}
    typed = _merge_typed(Config, rest, "<root>")
    keep = typed.checkpoint.keep_last
    if keep is not None and keep < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1 or null (keep all), got {keep}")
    validate_deepspeed_config(typed.deepspeed, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's
    typed.task = task
    typed.policy = policy
    typed.reward = reward
    typed.algo = algo
    OmegaConf.set_readonly(typed, True)
    return typed
