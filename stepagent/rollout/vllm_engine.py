"""``rollout=vllm``: generation with vLLM (prefix caching), fed the trainer's weights without restarts.

* Start (once per run): full fine-tuning writes the policy's current weights with
  ``save_pretrained`` and vLLM serves that directory; a LoRA policy serves its base model
  (``policy.name_or_path``) with ``enable_lora`` and the adapter as a ``LoRARequest``. Prompts are
  token ids (``skip_tokenizer_init``): the engine never re-tokenizes what the trainer encoded.
* Weights: at the start of every generation phase the trainable parameters' fingerprint is
  compared with the last one pushed. Changed full weights go through a safetensors file to the
  worker (``vllm_worker.WeightLoader``), then the prefix cache is reset (a reload does not
  invalidate cached KV blocks). A changed adapter is saved and served under a new adapter id
  (vLLM caches adapters by id; its prefix cache is kept per id).
* Agreement check: for the first ``logprob_check_samples`` sequences after each push, the
  engine's log-prob of every sampled token is compared with the trainer's own forward pass
  (``rollout/logprob_abs_diff``; vLLM returns raw log-probs, before temperature).
* Prefix caching across one batch: requests prefilled side by side cannot share blocks, so
  the batch's shared prefixes (trie branch points, then the longest prompts) are prefilled
  first in short waves of one generated token (``base.priming_waves``).
* Randomness: each request's sampling seed is drawn from torch's RNG, so a run (and a resumed
  run) samples the same tokens again.
* Processes: ``rollout.in_process=false`` (the default on GPUs) runs vLLM's engine in its own
  process (spawned: the entry point needs ``if __name__ == "__main__"``, which run.py has).
  ``true`` (the default on CPU) runs it in this process; vLLM then reseeds the global RNGs and
  replaces ``torch.set_num_threads``, both undone here after the start.
* Data parallel: each rank starts its own engine. On GPUs each rank's engine process is given
  the rank's device through ``CUDA_VISIBLE_DEVICES`` at start and ``gpu_memory_utilization`` of
  it; this path has not run on GPUs here (no GPU on the development machine). ZeRO-3 is refused
  at config time. vLLM's sleep mode is not used (CPU builds ignore it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from stepagent.config import VLLM_LORA_RANKS
from stepagent.rollout.base import RolloutEngine, priming_waves, register_engine

log = logging.getLogger(__name__)

WORKER_EXTENSION = "stepagent.rollout.vllm_worker.WeightLoader"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _set_env(values: Dict[str, Optional[str]]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _env(**values: Optional[str]) -> Iterator[None]:
    """Environment variables set for the duration (None: unset), then put back as they were."""
    old = {k: os.environ.get(k) for k in values}
    _set_env(values)
    try:
        yield
    finally:
        _set_env(old)


@contextlib.contextmanager
def _trainer_state_kept() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the trainer: global RNG seeds, torch's thread
    count and ``torch.set_num_threads`` (replaced by a no-op)."""
    import numpy as np

    torch_rng, py_rng, np_rng = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def _unwrap(model: Any) -> Any:
    """The plain transformers model (a DeepSpeed engine's module; PEFT's base model for LoRA)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_rank_for_vllm(r: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {r}")


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, cfg: Any, policy: Any, workdir: Any):
        super().__init__()
        self.rc = cfg.rollout
        # null: in this process on CPU (a second process competes for the same few cores), apart on GPU
        self.in_process = bool(self.rc.in_process) if self.rc.in_process is not None else not torch.cuda.is_available()
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.lora = bool(policy.uses_lora)
        base = _unwrap(self.model)
        self.tied = bool(getattr(base.config, "tie_word_embeddings", False))
        self.max_model_len = int(getattr(base.config, "max_position_embeddings", 4096))
        if cfg.policy.kind == "tiny":  # the tiny model's positions are max_seq_len; prompts never exceed it
            self.max_model_len = int(cfg.policy.max_seq_len)
        root = self.rc.weights_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else str(workdir))
        Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="stepagent-vllm-", dir=root))
        self._version = 0
        self._fingerprint: Optional[torch.Tensor] = None
        self._lora_request: Any = None
        self._to_check = 0
        t0 = time.perf_counter()
        if self.lora:
            serve = str(cfg.policy.name_or_path)  # the frozen base, as the trainer loaded it
            self._fingerprint = None  # the adapter is pushed at the first phase
        else:
            serve = str(self.dir / "model")
            base.save_pretrained(serve, safe_serialization=True)
            self._fingerprint = self._fingerprint_now()
            self._to_check = int(self.rc.logprob_check_samples)
        self.llm = self._start(serve, cfg)
        log.info("vLLM engine started in %.1f s (%s, prefix caching %s)", time.perf_counter() - t0,
                 "in process" if self.in_process else "engine process", self.rc.enable_prefix_caching)

    # ------------------------------------------------------------------ start
    def _start(self, serve: str, cfg: Any):
        from vllm import LLM

        from stepagent import distributed as dist

        dtype = _DTYPES.get(next(self.model.parameters()).dtype, "float32")
        kwargs = dict(
            model=serve, skip_tokenizer_init=True, dtype=dtype, seed=int(cfg.seed),
            enable_prefix_caching=bool(self.rc.enable_prefix_caching), enforce_eager=bool(self.rc.enforce_eager),
            max_num_seqs=int(self.rc.max_num_seqs), max_model_len=self.max_model_len,
            gpu_memory_utilization=float(self.rc.gpu_memory_utilization),
            worker_extension_cls=WORKER_EXTENSION, disable_log_stats=False,
        )
        block = self.rc.block_size if self.rc.block_size is not None else (None if torch.cuda.is_available() else 32)
        if block is not None:
            kwargs["block_size"] = int(block)
        if not torch.cuda.is_available():
            # vLLM 0.32 on CPU: a seeded request whose prefill is split across steps crashes the engine
            # ("CPU Generator does not use offset"): no chunked prefill, a step budget of whole prompts
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, self.max_model_len))
        if self.lora:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_for_vllm(int(cfg.policy.lora.r)))
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(float(self.rc.cpu_kv_cache_gb))))),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.in_process else "1",
        }
        if torch.cuda.is_available() and dist.world_size() > 1 and not self.in_process:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            env["CUDA_VISIBLE_DEVICES"] = devices[dist.local_rank() % len(devices)]
        with _env(**env), _trainer_state_kept():
            return LLM(**kwargs)

    # ------------------------------------------------------------------ weights
    def _trainable(self) -> List[Tuple[str, torch.nn.Parameter]]:
        model = getattr(self.model, "module", self.model)
        if self.lora:
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return list(_unwrap(model).named_parameters())

    @torch.no_grad()
    def _fingerprint_now(self) -> torch.Tensor:
        """Sum and sum of squares of the trainable parameters (float64): any update moves them."""
        acc = None
        for _, p in self._trainable():
            d = p.detach().double()
            part = torch.stack([d.sum(), (d * d).sum()])
            acc = part if acc is None else acc + part
        return acc.cpu() if acc is not None else torch.zeros(2, dtype=torch.float64)

    def sync(self, force: bool = False) -> bool:
        """Push the trainer's weights if they changed since the last push; True when pushed."""
        now = self._fingerprint_now()
        if not force and self._fingerprint is not None and torch.equal(now, self._fingerprint):
            return False
        t0 = time.perf_counter()
        self._version += 1
        if self.lora:
            self._push_adapter()
        else:
            self._push_full()
        self._fingerprint = now
        self._to_check = int(self.rc.logprob_check_samples)
        self.stats.weight_syncs += 1
        self.stats.sync_seconds += time.perf_counter() - t0
        return True

    def _push_full(self) -> None:
        from safetensors.torch import save_file

        state = {n: p.detach().to("cpu").contiguous() for n, p in _unwrap(self.model).named_parameters()}
        path = self.dir / f"weights-{self._version}.safetensors"
        save_file(state, str(path))
        try:
            self.llm.collective_rpc("stepagent_load_weights", args=(str(path), self.tied))
        finally:
            path.unlink(missing_ok=True)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _push_adapter(self) -> None:
        from vllm.lora.request import LoRARequest

        path = self.dir / f"adapter-{self._version}"
        getattr(self.model, "module", self.model).save_pretrained(str(path))  # PEFT: the adapter only
        old = self._lora_request
        self._lora_request = LoRARequest(f"policy-{self._version}", self._version, str(path))
        if old is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        self.sync()
        yield

    # ------------------------------------------------------------------ generation
    def batch_prompts(self, batch_size: int, num_samples: int) -> int:
        return max(int(batch_size), int(self.rc.max_num_seqs) // max(int(num_samples), 1))

    def _cache_counters(self) -> Optional[Tuple[float, float]]:
        """vLLM's prefix-cache counters (queried tokens, hit tokens), when it reports them."""
        try:
            metrics = self.llm.get_metrics()
        except Exception:
            return None
        q = h = None
        for m in metrics:
            if m.name == "vllm:prefix_cache_queries":
                q = float(m.value)
            elif m.name == "vllm:prefix_cache_hits":
                h = float(m.value)
        return None if q is None or h is None else (q, h)

    def _generate(self, prompts, max_new_tokens, eos_token_id, temperature, num_samples):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature <= 0
        n = 1 if greedy else num_samples  # greedy samples of one prompt are all the same
        seed = int(torch.randint(0, 2**31 - 1 - len(prompts), (1,)).item()) if not greedy else None
        want_lp = self._to_check > 0
        params = [
            SamplingParams(
                n=n, temperature=0.0 if greedy else float(temperature), top_p=1.0,
                max_tokens=max(1, min(int(max_new_tokens), self.max_model_len - len(p))),
                stop_token_ids=[int(eos_token_id)], logprobs=0 if want_lp else None,
                seed=None if greedy else seed + i, detokenize=False,
            )
            for i, p in enumerate(prompts)
        ]
        before = self._cache_counters()
        if self.rc.enable_prefix_caching and len(prompts) > 1:
            self._prime(prompts)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False, lora_request=self._lora_request)
        after = self._cache_counters()
        if before is not None and after is not None:
            self.stats.prefilled_tokens += int(round((after[0] - before[0]) - (after[1] - before[1])))
        else:
            self.stats.prefilled_tokens += sum(len(p) - int(o.num_cached_tokens or 0) for p, o in zip(prompts, outs))
        result: List[List[List[int]]] = []
        checks = []
        for p, o in zip(prompts, outs):
            samples = []
            for c in o.outputs:
                toks = list(c.token_ids)
                cut = toks.index(eos_token_id) if eos_token_id in toks else len(toks)
                toks = toks[:cut]
                samples.append(toks)
                if want_lp and c.logprobs is not None and len(checks) < self._to_check and toks:
                    checks.append((list(p), toks, [c.logprobs[k][t].logprob for k, t in enumerate(toks)]))
            result.append(samples * num_samples if greedy else samples)
        if checks:
            self._to_check -= len(checks)
            self._check_logprobs(checks)
        return result

    def _prime(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prefill the batch's shared prefixes first, wave by wave (``priming_waves``), one token
        each: then the batch itself finds every shared block in the prefix cache."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        for wave in priming_waves(prompts):
            self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in wave], one, use_tqdm=False,
                              lora_request=self._lora_request)

    @torch.no_grad()
    def _check_logprobs(self, checks: Sequence[Tuple[List[int], List[int], List[float]]]) -> None:
        """The trainer's log-probs of the engine's sampled tokens, against the engine's own."""
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for prompt, toks, engine_lp in checks:
                ids = torch.tensor([prompt + toks], device=device)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(toks, device=device)[:, None])[:, 0]
                diff = (lp.cpu() - torch.tensor(engine_lp, dtype=torch.float32)).abs()
                self.stats.logprob_checked_tokens += len(toks)
                self.stats.logprob_abs_diff_sum += float(diff.sum())
        finally:
            if was_training:
                model.train()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        shutil.rmtree(self.dir, ignore_errors=True)
