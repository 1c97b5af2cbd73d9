"""Generation engines, HF ``generate`` vs vLLM (prefix caching), on the same policy and prompts.

Two phases, as the training loop runs them (``stepagent.rollout``; nothing benchmark-specific
in the generation path):

  inspection  every expert prefix of ``--trajectories`` expert trajectories of the embedded
              default (ScienceWorld, the four find-* types), K = ``--samples`` actions each at
              temperature 1 (``algos.inspection.inspect``);
  evaluation  ``--episodes`` dev episodes played greedily in the real simulator
              (``eval.evaluate.run_episodes``; every live episode in one batch per turn).
vLLM runs as ``rollout=vllm`` does by default (on CPU: in this process).

The policy is the embedded tiny Llama after ``--sft-epochs`` of SFT on the same experts (or a
saved checkpoint, ``--checkpoint``). Per engine and phase the table gives: prompt tokens handed
to the engine, prompt tokens it prefilled (HF: the left-padded batch once per returned
sequence; vLLM: prefix-cache queries minus hits, from its own counters), the unique-token
bound (the token trie of all prompts: what a perfect token-level prefix cache computes), the
block bound (what a cache of whole ``block``-token blocks must compute: each distinct full block
once, plus every sequence's last partial block; vLLM's block is 32 tokens on CPU), generated
tokens per second and the wall time of the phase (the vLLM engine's start is reported apart).

    .venv/bin/python benchmarks/generation.py                 # ~5 min on 2 cores
    .venv/bin/python benchmarks/generation.py --trajectories 16 --episodes 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stepagent.config import validate_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    return validate_config(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="K actions per expert prefix")
    ap.add_argument("--episodes", type=int, default=8, help="greedy dev episodes per engine")
    ap.add_argument("--sft-epochs", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="a saved policy (checkpoints/sft of a run) instead of SFT here")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--in-process", choices=["auto", "true", "false"], default="auto",
                    help="vLLM's engine in this process (auto: rollout.in_process=null, in process on CPU)")
    ap.add_argument("--vllm", action="append", default=[], metavar="KEY=VALUE",
                    help="a rollout=vllm override, e.g. --vllm rollout.max_num_seqs=512 (repeatable)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the embedded default, e.g. task.eval_per_type=4")
    args = ap.parse_args()

    import torch

    from stepagent.agent.policy import build_policy
    from stepagent.algos.inspection import inspect
    from stepagent.data.experts import load_or_build_experts
    from stepagent.envs import make_task
    from stepagent.envs.pool import EnvPool
    from stepagent.eval.evaluate import run_episodes
    from stepagent.pipeline import make_encoder, seed_everything, tokenizer_corpus
    from stepagent.rollout import block_prefix_bound, make_engine, unique_prefix_tokens
    from stepagent.train.sft import sft_samples, train_sft

    torch.set_num_threads(2)
    engines = [e for e in args.engines.split(",") if e]
    base = [f"cache_dir={args.cache_dir}", "run_dir=/tmp/stepagent-bench-generation",
            f"inspection.samples_per_state={args.samples}"] + list(args.overrides)
    cfg = compose(base)
    seed_everything(cfg.seed)
    task = make_task(cfg.task)
    experts = load_or_build_experts(task, "train", cfg.cache_dir, task.num_workers)
    policy = build_policy(cfg.policy, tokenizer_corpus(task, experts), Path(cfg.cache_dir), cfg.seed)
    encoder = make_encoder(policy, cfg, task)
    if args.checkpoint:
        from safetensors.torch import load_file

        policy.model.load_state_dict(load_file(str(Path(args.checkpoint) / "model.safetensors")), strict=False)
    elif args.sft_epochs:
        from omegaconf import OmegaConf

        sft_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.sft), {"epochs": args.sft_epochs})
        train_sft(policy.model, sft_samples(experts, encoder, cfg.policy.max_seq_len), sft_cfg,
                  policy.tokenizer.pad_token_id, None, cfg.seed)
    trajs = experts[: args.trajectories]
    dev = task.instances("dev")[: args.episodes]
    print(f"policy: tiny Llama, {sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M parameters; "
          f"{len(trajs)} expert trajectories ({sum(len(t) for t in trajs)} prefixes) x K={args.samples}; "
          f"{len(dev)} dev episodes", flush=True)

    rows, actions = [], {}
    with EnvPool(task.env_factory(), task.num_workers, cfg.task.step_timeout_s) as pool:
        for name in engines:
            overrides = base + [f"rollout={name}"]
            if name == "vllm":
                overrides += ([] if args.in_process == "auto" else [f"rollout.in_process={args.in_process}"]) + list(args.vllm)
            ecfg = compose(overrides)
            t0 = time.perf_counter()
            engine = make_engine(ecfg, policy, Path("/tmp"))
            start_s = time.perf_counter() - t0
            try:
                for phase in ("inspection", "evaluation"):
                    engine.pop_stats()
                    engine.recorded_prompts = []
                    torch.manual_seed(cfg.seed)
                    t0 = time.perf_counter()
                    if phase == "inspection":
                        segs = inspect(engine, policy.tokenizer, encoder, task, trajs, args.samples, 1.0,
                                       cfg.policy.max_new_tokens, cfg.inspection.batch_size, progress=False)
                        n_seq = sum(len(s.agent_actions) for v in segs.values() for s in v)
                    else:
                        eps = run_episodes(engine, policy.tokenizer, encoder, task, dev, pool,
                                           cfg.policy.max_new_tokens, 0.0, progress=False)
                        actions[name] = [ep.actions for ep in eps]
                        n_seq = sum(len(ep.actions) for ep in eps)
                    wall = time.perf_counter() - t0
                    st = engine.pop_stats()
                    unique = unique_prefix_tokens(engine.recorded_prompts)
                    block = engine.llm.llm_engine.vllm_config.cache_config.block_size if name == "vllm" else 32
                    samples = args.samples if phase == "inspection" else 1
                    reachable = block_prefix_bound(engine.recorded_prompts, block, samples)
                    rows.append({
                        "phase": phase, "engine": name, "start_s": round(start_s, 1), "sequences": n_seq,
                        "prompt_tokens": st.prompt_tokens, "prefilled_tokens": st.prefilled_tokens,
                        "unique_prompt_tokens": unique, "prefill_over_unique": st.prefilled_tokens / max(unique, 1),
                        "block": block, "block_bound": reachable,
                        "generated_tokens": st.generated_tokens,
                        "gen_tokens_per_s": st.generated_tokens / st.seconds if st.seconds else 0.0,
                        "generate_s": st.seconds, "wall_s": wall, "weight_syncs": st.weight_syncs,
                        "logprob_abs_diff": (st.logprob_abs_diff_sum / st.logprob_checked_tokens
                                             if st.logprob_checked_tokens else None),
                    })
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                engine.close()

    print()
    print("| phase | engine | sequences | prompt tokens | prefilled | unique bound | prefilled / unique | "
          "block bound | prefilled / block bound | generated | gen tok/s | generate s | wall s | engine start s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['engine']} | {r['sequences']} | {r['prompt_tokens']:,} | {r['prefilled_tokens']:,} | "
              f"{r['unique_prompt_tokens']:,} | {r['prefill_over_unique']:.2f}x | {r['block_bound']:,} | "
              f"{r['prefilled_tokens'] / max(r['block_bound'], 1):.2f}x | {r['generated_tokens']:,} | "
              f"{r['gen_tokens_per_s']:.0f} | {r['generate_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['start_s'] if r['engine'] == 'vllm' else 0:.1f} |")
    by = {(r["phase"], r["engine"]): r for r in rows}
    for phase in ("inspection", "evaluation"):
        if (phase, "hf") in by and (phase, "vllm") in by:
            h, v = by[(phase, "hf")], by[(phase, "vllm")]
            print(f"{phase}: vLLM generates {v['gen_tokens_per_s'] / max(h['gen_tokens_per_s'], 1e-9):.1f}x HF's tokens/s; "
                  f"prefill {h['prefilled_tokens'] / max(v['prefilled_tokens'], 1):.1f}x fewer tokens")
    if "hf" in actions and "vllm" in actions:
        same = sum(a == b for a, b in zip(actions["hf"], actions["vllm"]))
        print(f"greedy evaluation: {same}/{len(actions['hf'])} episodes with identical actions under both engines")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # vLLM's engine process is spawned: the guard is required
    main()
