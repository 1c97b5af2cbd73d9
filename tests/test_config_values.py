"""Every checked config value: a bad one fails at start with a config error naming its key, in
seconds and before any work; every shipped config still validates; the YAML files and the schema
defaults agree (one source of defaults).

The bulk of the table runs in-process (Hydra's compose API + ``validate_config``); the issue's
cases and a few more run as real ``python run.py`` processes (exit code 2, ``config error`` and the
key on stderr, under 15 s, no cache written)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, OmegaConf

from stepagent.config import (ALGO_SCHEMAS, POLICY_SCHEMAS, REWARD_SCHEMAS, ROLLOUT_SCHEMAS, TASK_SCHEMAS, Advantage, AttnImplementation,
                              CheckpointConfig, Choice, ConfigError, Config, DeepSpeedConfig, DType, EvalConfig,
                              FieldError, HFPolicyConfig, InspectionConfig, LoggerConfig, PPOConfig, RewardForm,
                              ScienceWorldTaskConfig, SFTConfig, is_plausible_hub_id, validate_config)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
HF = "policy=hf"


@pytest.fixture(scope="module")
def hydra_conf():
    os.environ.setdefault("STEPAGENT_ROOT", str(REPO))  # experiments/ on the search path, as run.py does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def compose_cfg(overrides, tmp_path):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    return compose("config", overrides=overrides + [f"run_dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"])


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# ----------------------------------------------------------------------------- bad values
# (overrides, the dotted key the message must name, another substring it must contain or None).
# "{tmp}" is an existing directory (the test's tmp_path).
BAD = [
    # enumerated values
    (["reward=inverse", "reward.form=foo"], "reward.form", "gail | airl"),
    (["reward=inverse", "reward.normalize=foo"], "reward.normalize", "none | batch"),
    (["reward=implicit", "reward.reference=foo"], "reward.reference", "cycle_start | sft"),
    (["reward=outcome", "ppo.reference=foo"], "ppo.reference", "cycle_start | sft"),
    (["arm=loop", "ppo.reference=foo"], "ppo.reference", None),
    (["algo=eto", "algo.reference=foo"], "algo.reference", "iteration_start | sft"),
    (["ppo.kl_estimator=k9"], "ppo.kl_estimator", "k1 | k2 | k3"),
    (["reward=inverse", "reward.disc_backbone=foo"], "reward.disc_backbone", "encoder | policy"),
    (["reward=inverse", "reward.disc_backbone=policy", "policy=hf", "policy.name_or_path={tmp}"], "reward.disc_backbone",
     "not implemented"),
    (["rollout=vllm", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization", "(0, 1)"),
    (["rollout=vllm", "rollout.max_num_seqs=0"], "rollout.max_num_seqs", ">= 1"),
    (["rollout=vllm", "deepspeed=zero3"], "rollout=vllm", "ZeRO-3"),
    (["rollout=vllm", "policy=hf", "policy.name_or_path={tmp}", "policy.lora.r=1024"], "rollout=vllm", "rank 512"),
    (["ppo.advantage=td"], "ppo.advantage", "loo | gae"),
    (["policy.dtype=float99"], "policy.dtype", "float32 | bfloat16 | float16"),
    ([HF, "policy.name_or_path={tmp}", "policy.dtype=fp8"], "policy.dtype", None),
    (["policy.attn_implementation=flash_attention_2"], "policy.attn_implementation", "4D"),
    (["policy.attn_implementation=flex_attention"], "policy.attn_implementation", "sdpa | eager"),
    (["eval.split=foo"], "eval.split", "train | dev | test"),
    (["eval.split=validation"], "eval.split", None),
    (["logger=wandb", "logger.mode=foo"], "logger.mode", "online | offline"),
    (["deepspeed=zero3_offload", "deepspeed.offload_param=nvme"], "deepspeed.offload_param", "cpu"),
    (["deepspeed=zero2", "deepspeed.offload_optimizer=gpu"], "deepspeed.offload_optimizer", "cpu"),
    # root
    (["cycles=-2"], "cycles", ">= 0"),
    (["seed=-1"], "seed", ">= 0"),
    # inspection: K, temperature, counts
    (["inspection.samples_per_state=0"], "inspection.samples_per_state", ">= 1"),
    (["reward=implicit", "inspection.temperature=0"], "inspection.temperature", "> 0"),
    (["inspection.temperature=-1"], "inspection.temperature", None),
    (["reward=inverse", "inspection.samples_per_state=1"], "inspection.samples_per_state", "loo"),
    (["reward=outcome", "inspection.samples_per_state=1"], "inspection.samples_per_state", "loo"),
    (["algo=loop", "inspection.samples_per_state=1"], "inspection.samples_per_state", "algo=loop"),
    (["arm=inverse", "inspection.samples_per_state=1"], "inspection.samples_per_state", None),
    (["inspection.trajectories=0"], "inspection.trajectories", "null"),
    (["inspection.batch_size=0"], "inspection.batch_size", None),
    (["inspection.heldout_trajectories=-1"], "inspection.heldout_trajectories", None),
    (["inspection.heldout_trajectories=null"], "inspection.heldout_trajectories", "0 turns"),
    # eval
    (["eval.temperature=-0.5"], "eval.temperature", ">= 0"),
    (["eval.max_episodes=0"], "eval.max_episodes", "null"),
    (["eval.final_splits=[dev,valid]"], "eval.final_splits", "valid"),
    (["eval.final_splits=[test,test]"], "eval.final_splits", "twice"),
    (["task.icl_format=second"], "task.icl_format", "conversation | first"),
    # sft
    (["sft.lr=0"], "sft.lr", "> 0"),
    (["sft.lr=-1e-3"], "sft.lr", None),
    (["sft.epochs=0"], "sft.epochs", ">= 1"),
    (["sft.batch_size=0"], "sft.batch_size", None),
    (["sft.max_grad_norm=0"], "sft.max_grad_norm", None),
    (["sft.max_trajectories=0"], "sft.max_trajectories", "null"),
    (["sft.warmup_steps=-1"], "sft.warmup_steps", None),
    (["sft.weight_decay=-0.1"], "sft.weight_decay", None),
    # reward=implicit
    (["reward=implicit", "reward.lr=0"], "reward.lr", "> 0"),
    (["reward=implicit", "reward.beta=0"], "reward.beta", "> 0"),
    (["reward=implicit", "reward.epochs=0"], "reward.epochs", None),
    (["reward=implicit", "reward.batch_size=0"], "reward.batch_size", None),
    (["reward=implicit", "reward.nll_weight=-1"], "reward.nll_weight", None),
    (["reward=implicit", "reward.max_grad_norm=0"], "reward.max_grad_norm", None),
    # reward=inverse
    (["reward=inverse", "reward.disc_lr=0"], "reward.disc_lr", "> 0"),
    (["reward=inverse", "reward.disc_epochs=0"], "reward.disc_epochs", None),
    (["reward=inverse", "reward.disc_batch_size=0"], "reward.disc_batch_size", None),
    (["reward=inverse", "reward.disc_hidden_size=0"], "reward.disc_hidden_size", None),
    # ppo
    (["ppo.lr=0"], "ppo.lr", "> 0"),
    (["ppo.lr=-1e-4"], "ppo.lr", None),
    (["ppo.epochs=0"], "ppo.epochs", None),
    (["ppo.batch_size=0"], "ppo.batch_size", None),
    (["ppo.clip_eps=0"], "ppo.clip_eps", "> 0"),
    (["ppo.kl_coef=-0.1"], "ppo.kl_coef", ">= 0"),
    (["ppo.entropy_coef=-0.1"], "ppo.entropy_coef", None),
    (["ppo.gamma=1.5"], "ppo.gamma", "[0, 1]"),
    (["ppo.lam=-0.1"], "ppo.lam", "[0, 1]"),
    (["ppo.max_grad_norm=0"], "ppo.max_grad_norm", None),
    (["ppo.value_coef=-1"], "ppo.value_coef", None),
    # algo=eto
    (["algo=eto", "algo.lr=0"], "algo.lr", "> 0"),
    (["algo=eto", "algo.beta=0"], "algo.beta", None),
    (["algo=eto", "algo.epochs=0"], "algo.epochs", None),
    (["algo=eto", "algo.batch_size=0"], "algo.batch_size", None),
    (["algo=eto", "algo.micro_batch_size=0"], "algo.micro_batch_size", None),
    (["algo=eto", "algo.tasks_per_iteration=0"], "algo.tasks_per_iteration", "null"),
    (["algo=eto", "algo.rollouts_per_task=0"], "algo.rollouts_per_task", None),
    (["algo=eto", "algo.rollouts_per_task=2", "algo.temperature=0"], "algo.temperature", "> 0"),
    (["algo=eto", "algo.nll_weight=-1"], "algo.nll_weight", None),
    (["algo=eto", "algo.rejected_extra_steps=-1"], "algo.rejected_extra_steps", None),
    # checkpoint, deepspeed
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", ">= 1"),
    (["deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=-1"],
     "deepspeed.stage3_param_persistence_threshold", None),
    # task
    (["task.num_workers=0"], "task.num_workers", ">= 1"),
    (["task.step_timeout_s=0"], "task.step_timeout_s", "> 0"),
    (["task.train_per_type=0"], "task.train_per_type", "null"),
    (["task.eval_per_type=0"], "task.eval_per_type", "null"),
    (["task.task_types=[no-such-type]"], "task.task_types", "find-animal"),
    (["task.task_types=[]"], "task.task_types", "null"),
    (["task.data_dir=/no/such/dir"], "task.data_dir", "does not exist"),
    (["task.data_dir=data/hotpotqa"], "task.data_dir", "max_steps.json"),
    (["task.max_steps=0"], "task.max_steps", None),
    (["task=hotpotqa", "task.task_types=[multihop]"], "task.task_types", "bridge, comparison"),
    (["task=hotpotqa", "task.data_dir=data/nowhere"], "task.data_dir", "does not exist"),
    (["task=hotpotqa", "task.max_steps=0"], "task.max_steps", None),
    # policy
    (["policy.max_new_tokens=0"], "policy.max_new_tokens", ">= 1"),
    (["policy.max_new_tokens=1024"], "policy.max_new_tokens", "max_seq_len"),
    (["policy.num_layers=0"], "policy.num_layers", None),
    ([HF, "policy.name_or_path=/no/such/dir"], "policy.name_or_path", "does not exist"),
    ([HF, "policy.name_or_path=./no/such/dir"], "policy.name_or_path", "does not exist"),
    ([HF, "policy.name_or_path='~/no-such-model-dir'"], "policy.name_or_path", "does not exist"),
    ([HF, "policy.name_or_path=a/b/c"], "policy.name_or_path", "does not exist"),
    ([HF], "policy.name_or_path", "no value"),
    ([HF, "policy.name_or_path={tmp}", "policy.max_new_tokens=4096"], "policy.max_new_tokens", None),
    ([HF, "policy.name_or_path={tmp}", "policy.lora.r=0"], "policy.lora.r", None),
    ([HF, "policy.name_or_path={tmp}", "policy.lora.dropout=1.0"], "policy.lora.dropout", None),
]


def _id(case):
    return " ".join(case[0])


@pytest.mark.parametrize("overrides,key,detail", BAD, ids=[_id(c) for c in BAD])
def test_bad_value_is_a_config_error_naming_the_key(overrides, key, detail, tmp_path, hydra_conf):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert key in msg, msg
    if detail:
        assert detail in msg, msg
    assert not (tmp_path / "cache").exists()


# Each of these, as `python run.py ...`: exit 2 within seconds, `config error: <key> ...` on stderr.
# The list first, then one of each other kind.
RUN_PY = [
    (["reward=inverse", "reward.form=foo"], "reward.form"),
    (["ppo.kl_estimator=k9"], "ppo.kl_estimator"),
    (["policy.dtype=float99"], "policy.dtype"),
    (["reward=inverse", "reward.normalize=foo"], "reward.normalize"),
    (["cycles=-2"], "cycles"),
    (["inspection.samples_per_state=0"], "inspection.samples_per_state"),
    (["reward=outcome", "ppo.reference=foo"], "ppo.reference"),
    (["arm=loop", "ppo.reference=foo"], "ppo.reference"),
    (["reward=implicit", "inspection.temperature=0"], "inspection.temperature"),
    (["reward=inverse", "inspection.samples_per_state=1"], "inspection.samples_per_state"),
    ([HF, "policy.name_or_path=/no/such/dir"], "policy.name_or_path"),
    (["task.task_types=[no-such-type]"], "task.task_types"),
    (["reward=implicit", "reward.lr=0"], "reward.lr"),
    (["ppo.lr=-1e-4"], "ppo.lr"),
    (["eval.split=foo"], "eval.split"),
    (["logger=wandb", "logger.mode=foo"], "logger.mode"),
    (["policy.attn_implementation=flash_attention_2"], "policy.attn_implementation"),
]
PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.mark.parametrize("overrides,key", RUN_PY, ids=[" ".join(c[0]) for c in RUN_PY])
def test_run_py_exits_2_in_seconds_naming_the_key(overrides, key, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    python = str(PYTHON if PYTHON.exists() else sys.executable)
    t0 = time.time()
    r = subprocess.run([python, "run.py", *overrides, f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    wall = time.time() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    assert "config error" in r.stderr and key in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert wall < 15, f"{wall:.1f} s"
    assert not (tmp_path / "cache").exists()  # no expert build, no tokenizer, no model


def test_validation_runs_before_torch_is_imported(tmp_path):
    """run.py checks the config before it imports the pipeline (torch, transformers, the simulator)."""
    python = str(PYTHON if PYTHON.exists() else sys.executable)
    code = ("import sys, stepagent.config; "
            "sys.exit(sorted(m for m in ('torch', 'transformers', 'scienceworld') if m in sys.modules) != [])")
    assert subprocess.run([python, "-c", code], cwd=REPO).returncode == 0
    r = subprocess.run([python, "-X", "importtime", "run.py", "cycles=-1", f"hydra.run.dir={tmp_path}/run",
                        f"cache_dir={tmp_path}/cache"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "cycles" in r.stderr and not {"torch", "transformers", "scienceworld"} & imported


# ----------------------------------------------------------------------------- good values
GOOD = [
    [],
    ["cycles=0"],
    ["inspection.heldout_trajectories=0"],
    ["eval.temperature=0.7"],
    ["inspection.trajectories=null", "sft.max_trajectories=null", "eval.max_episodes=null"],
    ["reward=implicit", "inspection.samples_per_state=1", "inspection.temperature=0"],
    ["reward=inverse", "inspection.samples_per_state=1", "ppo.advantage=gae"],
    ["reward=inverse", "reward.normalize=null"],
    ["reward=inverse", "reward.normalize=none", "reward.form=airl"],
    ["reward=implicit", "reward.reference=sft"],
    ["reward=outcome", "ppo.reference=cycle_start", "ppo.kl_estimator=k1", "ppo.gamma=0", "ppo.kl_coef=0"],
    ["algo=eto", "algo.temperature=0", "algo.reference=sft", "algo.tasks_per_iteration=null"],
    ["algo=eto", "algo.rollouts_per_task=2"],
    ["logger=wandb", "logger.mode=offline"],
    ["policy.attn_implementation=eager", "policy.dtype=bfloat16"],
    ["eval.split=test"],
    ["eval.split=test", "eval.final_splits=[]"],
    ["eval.final_splits=[test,dev,train]", "task.icl_format=first"],
    [HF, "policy.name_or_path=meta-llama/Meta-Llama-3-8B-Instruct"],
    [HF, "policy.name_or_path=gpt2"],
    [HF, "policy.name_or_path={tmp}"],
    ["deepspeed=zero2", "deepspeed.offload_optimizer=cpu"],
    ["deepspeed=zero3", "deepspeed.offload_param=none", "deepspeed.stage3_param_persistence_threshold=0"],
    ["task=hotpotqa", "task.task_types=[bridge]"],
    ["task.task_types=null", "task.train_per_type=null"],
    [f"task.data_dir={REPO / 'data' / 'scienceworld'}"],
] + [[f"deepspeed={o}"] for o in options("deepspeed")] + [[f"algo={o}"] for o in options("algo")]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "default" for o in GOOD])
def test_good_values_validate(overrides, tmp_path, hydra_conf):
    cfg = validate_config(compose_cfg(overrides, tmp_path))
    again = validate_config(cfg)  # pipeline.run validates what run.py validated: the same config
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(cfg)


def test_enum_values_read_as_strings(tmp_path, hydra_conf):
    """Code compares enum fields with strings, formats and dumps them: they behave as their values."""
    import json

    cfg = validate_config(compose_cfg(["reward=inverse", "logger=wandb", "logger.mode=offline"], tmp_path))
    assert isinstance(cfg.reward.form, RewardForm) and cfg.reward.form == "gail" and cfg.reward.normalize == "batch"
    assert f"{cfg.policy.dtype}" == str(cfg.policy.dtype) == "%s" % cfg.policy.dtype == "float32"
    assert {"float32": 1}[cfg.policy.dtype] == 1 and cfg.ppo.advantage in ("loo", "gae")
    dumped = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=1))
    assert dumped["ppo"]["kl_estimator"] == "k3" and dumped["logger"]["mode"] == "offline"
    assert "attn_implementation: sdpa" in OmegaConf.to_yaml(cfg)


def test_schemas_built_in_code_are_checked_too():
    assert PPOConfig(advantage="gae").advantage is Advantage.gae
    assert HFPolicyConfig(name_or_path=str(REPO), dtype="float32").dtype is DType.float32
    with pytest.raises(FieldError, match=r"^lr must be > 0"):
        PPOConfig(lr=0)
    with pytest.raises(FieldError, match=r"dtype must be float32 \| bfloat16 \| float16, got 'float99'"):
        HFPolicyConfig(name_or_path=str(REPO), dtype="float99")
    with pytest.raises(FieldError, match=r"attn_implementation must be sdpa \| eager.*4D"):
        HFPolicyConfig(name_or_path=str(REPO), attn_implementation="flash_attention_2")
    with pytest.raises(FieldError, match="does not exist"):
        HFPolicyConfig(name_or_path="/no/such/dir")
    with pytest.raises(ValueError, match="find-animal"):  # lists the valid types
        ScienceWorldTaskConfig(task_types=["find-unicorn"])
    with pytest.raises(FieldError, match="samples_per_state"):
        InspectionConfig(samples_per_state=0)


@pytest.mark.parametrize("name,ok", [
    ("gpt2", True), ("meta-llama/Meta-Llama-3-8B-Instruct", True), ("Qwen/Qwen2.5-7B-Instruct", True),
    ("/no/such/dir", False), ("./model", False), ("../model", False), ("~/model", False), ("a/b/c", False),
    ("org/", False), ("", False), ("org/na me", False), ("org/..", False),
])
def test_plausible_hub_id(name, ok):
    assert is_plausible_hub_id(name) is ok


def test_enums_are_str_valued_and_format_as_their_value():
    for enum_cls in Choice.__subclasses__():
        for m in enum_cls:
            assert m.name == m.value and str(m) == m.value and f"{m}" == m.value and m == m.value
    assert AttnImplementation.values() == ["sdpa", "eager"]


# ----------------------------------------------------------------------------- one source of defaults
# Values a YAML option sets on purpose, different from its schema's default (what the option is for).
# Everything else in every YAML option must equal the schema default, and vice versa.
OPTION_SPECIFIC = {
    # the embedded default runs a slice of ScienceWorld (the schema's default, null, is all of it), with
    # gold paths edited for the tiny policy (the schema's default, keep, is the simulator's path: it is
    # also what a checkpoint written before these keys existed was trained on, see sft.init_from)
    ("task", "scienceworld"): {"task_types", "eval_per_type", "gold_noops", "gold_look"},
    ("task", "scienceworld_full"): {"num_workers"},
    # the embedded default plays a few games per type; the schema's default (null) is every game
    ("task", "alfworld"): {"train_per_type", "eval_per_type"},
    ("task", "alfworld_full"): {"num_workers"},
    # (name_or_path has no default: each option names its model)
    ("policy", "llama3_8b"): {"eos_token"},
    ("policy", "qwen2_5_7b"): {"eos_token"},
    ("deepspeed", "zero0"): {"name"},
    ("deepspeed", "zero2"): {"name", "stage"},
    ("deepspeed", "zero3"): {"name", "stage"},
    ("deepspeed", "zero3_offload"): {"name", "stage", "offload_optimizer", "offload_param", "pin_memory"},
}
SCHEMA_OF = {
    "task": lambda n: TASK_SCHEMAS[n["name"]],
    "policy": lambda n: POLICY_SCHEMAS[n["kind"]],
    "reward": lambda n: REWARD_SCHEMAS[n["name"]],
    "algo": lambda n: ALGO_SCHEMAS[n["name"]],
    "ppo": lambda n: PPOConfig,
    "logger": lambda n: LoggerConfig,
    "deepspeed": lambda n: DeepSpeedConfig,
    "rollout": lambda n: ROLLOUT_SCHEMAS[n["name"]],
}


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _drift(yaml_node, schema):
    """Keys whose YAML value differs from the schema default (a MISSING schema default is a selector
    the option must set: skipped)."""
    got = _leaves(yaml_node)
    want = _leaves(OmegaConf.to_container(OmegaConf.structured(schema)))
    assert set(got) <= set(want), f"keys not in {schema.__name__}: {sorted(set(got) - set(want))}"
    return {k: (got[k], want[k]) for k in got
            if not (want[k] == MISSING and got[k] != MISSING) and (got[k] != want[k] or type(got[k]) is bool
                                                                    and got[k] is not want[k])}


@pytest.mark.parametrize("group,option", [(g, o) for g in SCHEMA_OF for o in options(g)])
def test_yaml_option_values_equal_schema_defaults(group, option, tmp_path, hydra_conf):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    node = OmegaConf.to_container(cfg[group], resolve=True)
    drift = _drift(node, SCHEMA_OF[group](node))
    allowed = OPTION_SPECIFIC.get((group, option), set())
    unexpected = {k: v for k, v in drift.items() if k not in allowed}
    assert not unexpected, f"conf/{group}/{option}.yaml vs its schema (yaml, schema): {unexpected}"
    stale = allowed - set(drift)
    assert not stale, f"OPTION_SPECIFIC lists keys that no longer differ: {sorted(stale)}"


def test_root_yaml_values_equal_schema_defaults(tmp_path, hydra_conf):
    cfg = OmegaConf.to_container(compose_cfg([], tmp_path), resolve=True)
    for key, schema in (("sft", SFTConfig), ("inspection", InspectionConfig), ("eval", EvalConfig),
                        ("checkpoint", CheckpointConfig)):
        assert not _drift(cfg[key], schema), (key, _drift(cfg[key], schema))
    root = OmegaConf.structured(Config)
    for key in ("seed", "cycles", "resume", "arm"):
        assert cfg[key] == root[key], key
