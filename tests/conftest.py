import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never talk to a W&B server

# A real run.py job small enough for tests (seconds): one task type, a 2-layer 64-wide policy.
SMALL_RUN = [
    "task.task_types=[find-animal]", "task.train_per_type=6", "task.eval_per_type=2",
    "policy.hidden_size=64", "policy.intermediate_size=128", "policy.num_layers=2",
    "policy.vocab_size=1024", "policy.max_new_tokens=12",
    "sft.epochs=2", "sft.batch_size=4",
]

CORPUS = [
    "Your task is to find a(n) animal. First, focus on the thing. Then, move it to the red box in the kitchen.",
    "This room is called the hallway. In it, you see: the agent, a substance called air, a picture.",
    "open door to kitchen", "go to kitchen", "look around", "focus on dove", "pick up dove",
    "You move to the kitchen.", "The door is already open.", "You focus on the dove egg.",
    "move egg dove egg in inventory to red box", "You move the dove to the red box.",
]


@pytest.fixture
def one_torch_thread():
    """Tiny models: extra intra-op threads only add sync cost (100x on a busy 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from stepagent.agent.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, vocab_size=400)


def toy_task():
    """A Task with no instances or environment: inspection needs only its interface."""
    from stepagent.envs.base import Task

    class ToyTask(Task):
        name = "toy"

        def instances(self, split):
            return []

        def env_factory(self):
            raise NotImplementedError

    return ToyTask(None)


def make_tiny_model(tokenizer, seed=0, attn="sdpa", layers=2, hidden=64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture
def sample_trajectory():
    from stepagent.data.trajectory import Step, Trajectory

    return Trajectory(
        id="scienceworld/find-animal/0", task="scienceworld", task_type="find-animal",
        instruction=CORPUS[0] + "\n\n" + CORPUS[1],
        steps=[Step("open door to kitchen", "The door is already open."),
               Step("go to kitchen", "You move to the kitchen."),
               Step("focus on dove", "You focus on the dove egg.")],
        reward=1.0,
    )


def require_extra(module: str, extra: str):
    """Import ``module`` of the optional extra ``extra``. Under ``make test``
    (STEPAGENT_REQUIRE_EXTRAS=1, the extras installed by the Makefile) a missing extra is an error,
    never a silent skip; elsewhere the tests that need it are skipped with the install hint."""
    import importlib

    if os.environ.get("STEPAGENT_REQUIRE_EXTRAS") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{module} (extra '{extra}') is required under make test: {e}") from e
    return pytest.importorskip(module, reason=f"the {extra} extra is not installed (pip install -e '.[{extra}]')")
