"""Runs inside vLLM's worker (``LLM(worker_extension_cls=...)``): loads the trainer's weights into
the running engine. Imported by the worker process, so it imports nothing of the trainer.

Weights travel as a safetensors file (a path through ``collective_rpc``: tensors passed directly
arrive as lists). With tied embeddings a reload leaves vLLM's repacked CPU lm_head kernel stale;
re-running its post-load processing refreshes it (checked: greedy outputs equal HF again).
"""

from __future__ import annotations


class WeightLoader:
    def stepagent_load_weights(self, path: str, tied_embeddings: bool) -> int:
        from safetensors.torch import load_file

        state = load_file(path)
        self.reload_weights(weights_iterator=iter(state.items()))
        if tied_embeddings:
            lm_head = getattr(self.model_runner.model, "lm_head", None)
            method = getattr(lm_head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(lm_head)
        return len(state)
