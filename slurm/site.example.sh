# shellcheck shell=bash
# Site settings for the SLURM templates. Copy to slurm/site.sh (git-ignored) and edit:
#
#   cp slurm/site.example.sh slurm/site.sh
#
# Every template sources slurm/site.sh (or $STEPAGENT_SITE) at job start, on the first
# node, from the repository root, before it starts anything. Scheduler options
# (partition, account, QOS) cannot be set from here, because the job is already
# placed; give them to sbatch as -p/-A/-q, or export SLURM's own input variables in
# your login shell (~/.bashrc), which sbatch and the submitit launcher both read:
#
#   export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=my-project   # sbatch -p gpu -A my-project
#   export SBATCH_QOS=normal

# Software: modules and the Python environment (any of these; the templates run $PYTHON,
# default `python` from PATH after this file ran)
# module load cuda/12.4 gcc/12
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate stepagent
# source "$STEPAGENT_ROOT/.venv/bin/activate"
# PYTHON=/path/to/env/bin/python

# Caches on fast, large storage: experts, tokenizers and tiny models (STEPAGENT_CACHE),
# Hugging Face models
# export STEPAGENT_CACHE=/scratch/$USER/stepagent-cache
# export HF_HOME=/scratch/$USER/hf
# export HF_HUB_OFFLINE=1            # compute nodes without internet: pre-download on a login node

# W&B: offline on nodes without internet (upload later with `wandb sync`)
# export WANDB_MODE=offline

# Multi-node networking (NCCL): the interface the nodes talk over, InfiniBand on or off
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_DISABLE=0
# export NCCL_DEBUG=WARN

# Ranks per node when it should differ from the allocated GPUs (default: $SLURM_GPUS_ON_NODE)
# export STEPAGENT_NPROC=4
