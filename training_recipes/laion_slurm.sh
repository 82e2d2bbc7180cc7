#!/usr/bin/env bash
# LAION-400M (or LAION-2B / DataComp: any webdataset shards), ViT-B-16-sigrel; SLURM, 4 nodes x 8 GPUs,
# one task per GPU (open_clip reads SLURM_PROCID etc.). The loss is the A/B variable: LOSS=sigrel (the
# default: relative-bias sigmoid loss, --loss sigrel) or LOSS=siglip (the baseline: --siglip, absolute
# logit_bias); the two runs differ only in the loss flags (training_recipes/_common.sh) and the run name.
#
#   LAION_TRAIN='/data/laion400m/{00000..41455}.tar' \
#   VAL_DATA='/data/cc3m/val/{00000..00001}.tar' VAL_NUM_SAMPLES=13000 LOSS=sigrel \
#   sbatch --account=ACCOUNT --partition=PARTITION --job-name=laion-vitb16-sigrel training_recipes/laion_slurm.sh
#   # then the same with LOSS=siglip (and --job-name=laion-vitb16-siglip)
#
# sbatch exports the submitting shell's environment, so the variables above (LOSS included, and an
# activated conda / venv with open_clip_sigrel installed) reach the job; it runs in the submission directory.
# Nodes / GPUs: change the #SBATCH lines (or pass sbatch --nodes=N); BATCH_SIZE is per GPU
# (512 x 32 GPUs = 16384 global, sized for 80 GB GPUs with --grad-checkpointing). "Epochs" are
# TRAIN_NUM_SAMPLES samples drawn with replacement (--dataset-resampled), as in open_clip's LAION runs.
# Other knobs: LOGS NAME (default laion400m-vitb16-$LOSS) EPOCHS LR WD WARMUP BETA2 WORKERS
# MAX_LOGIT_SCALE VAL_FREQUENCY IMAGENET_VAL MASTER_PORT GPUS_PER_NODE. SIGREL_RECIPE_DRY_RUN=1 prints
# the command instead of running it; =args prints only the training arguments, NUL-separated
# (tests/integration/test_recipes.py parses them).
#SBATCH --job-name=laion-vitb16
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --wait-all-nodes=1
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from slurmd's spool directory, where _common.sh is not: then take the
# folder of the submitted file (scontrol's Command=, relative to the submission directory), or
# SIGREL_RECIPES_DIR when set.
RECIPES_DIR=${SIGREL_RECIPES_DIR:-$(dirname "${BASH_SOURCE[0]}")}
if [[ ! -f "$RECIPES_DIR/_common.sh" && -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null; then
  submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | sed -n 1p) || true
  [[ "$submitted" == /* ]] || submitted="${SLURM_SUBMIT_DIR:-.}/$submitted"
  RECIPES_DIR=$(dirname "$submitted")
fi
if [[ ! -f "$RECIPES_DIR/_common.sh" ]]; then
  echo "$(basename "$0"): no _common.sh in $RECIPES_DIR; set SIGREL_RECIPES_DIR to the training_recipes folder" >&2
  exit 2
fi
source "$RECIPES_DIR/_common.sh"  # LOSS -> LOSS_ARGS, shared flags, recipe_args, launch

LAION_TRAIN=${LAION_TRAIN:-"/data/laion400m/{00000..41455}.tar"}
TRAIN_NUM_SAMPLES=${TRAIN_NUM_SAMPLES:-400000000}
VAL_DATA=${VAL_DATA:-"/data/cc3m/val/{00000..00001}.tar"}   # held-out shards: geometry metrics
VAL_NUM_SAMPLES=${VAL_NUM_SAMPLES:-13000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BATCH_SIZE=${BATCH_SIZE:-512}          # per GPU, with --grad-checkpointing
EPOCHS=${EPOCHS:-32}
LR=${LR:-1e-3}
WD=${WD:-0.2}
WARMUP=${WARMUP:-10000}
BETA2=${BETA2:-0.95}                   # the large global batch: open_clip's LAION value

recipe_args laion400m-vitb16 \
  --train-data "$LAION_TRAIN" \
  --train-num-samples "$TRAIN_NUM_SAMPLES" \
  --dataset-resampled \
  --val-data "$VAL_DATA" \
  --val-num-samples "$VAL_NUM_SAMPLES" \
  --grad-checkpointing

# Rendezvous for torch.distributed (dist_url env://): the first node of the allocation.
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
  # sed reads all of scontrol's output: `head -n 1` could exit first and SIGPIPE it (141 under pipefail)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
fi
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-12802}
# Every task sees all GPUs of its node and picks cuda:$SLURM_LOCALID (open_clip's convention).
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((GPUS_PER_NODE - 1)))}
export CUDA_VISIBLE_DEVICES

# srun stops at the first non-option (python), python at `-m MODULE`: every later argument reaches
# open_clip_sigrel.cli.train unchanged, so no `--` is needed here (unlike the torch launcher of the cc3m / cc12m recipes).
launch srun --cpu_bind=v --accel-bind=gn python -u -m open_clip_sigrel.cli.train
