#!/usr/bin/env bash
# LAION-400M (or LAION-2B / DataComp: any webdataset shards), ViT-B-16-sigrel, SigLIP baseline
# (--siglip, absolute logit_bias); SLURM, 4 nodes x 8 GPUs, one task per GPU (open_clip reads
# SLURM_PROCID etc.).
# A/B partner: laion_sigrel_slurm.sh -- identical except LOSS_ARGS (and the default NAME / job name).
#
#   LAION_TRAIN='/data/laion400m/{00000..41455}.tar' \
#   VAL_DATA='/data/cc3m/val/{00000..00001}.tar' VAL_NUM_SAMPLES=13000 \
#   sbatch --account=ACCOUNT --partition=PARTITION training_recipes/laion_siglip_slurm.sh
#
# sbatch exports the submitting shell's environment, so the variables above (and an activated
# conda / venv with open_clip_sigrel installed) reach the job; it runs in the submission directory.
# Nodes / GPUs: change the #SBATCH lines (or pass sbatch --nodes=N); BATCH_SIZE is per GPU
# (512 x 32 GPUs = 16384 global). "Epochs" are TRAIN_NUM_SAMPLES samples drawn with replacement
# (--dataset-resampled), as in open_clip's LAION runs.
# Other knobs: LOGS NAME EPOCHS LR WD WARMUP WORKERS MAX_LOGIT_SCALE VAL_FREQUENCY IMAGENET_VAL
# MASTER_PORT GPUS_PER_NODE. SIGREL_RECIPE_DRY_RUN=1 prints the command instead of running it;
# =args prints only the training arguments, NUL-separated (tests/integration/test_recipes.py parses them).
#SBATCH --job-name=laion-vitb16-siglip
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --wait-all-nodes=1
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- the only lines that differ from laion_sigrel_slurm.sh (and the #SBATCH job name) ------------
# open_clip's SigLipLoss, absolute trainable logit_bias; --siglip starts at t0 = 10, logit_bias0 = -10.
LOSS_ARGS=(--siglip)
NAME=${NAME:-"laion400m-vitb16-siglip"}
# --------------------------------------------------------------------------------------------------

LAION_TRAIN=${LAION_TRAIN:-"/data/laion400m/{00000..41455}.tar"}
TRAIN_NUM_SAMPLES=${TRAIN_NUM_SAMPLES:-400000000}
VAL_DATA=${VAL_DATA:-"/data/cc3m/val/{00000..00001}.tar"}   # held-out shards: geometry metrics
VAL_NUM_SAMPLES=${VAL_NUM_SAMPLES:-13000}
LOGS=${LOGS:-"./logs"}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BATCH_SIZE=${BATCH_SIZE:-512}          # per GPU, with --grad-checkpointing
EPOCHS=${EPOCHS:-32}
LR=${LR:-1e-3}
WD=${WD:-0.2}
WARMUP=${WARMUP:-10000}
WORKERS=${WORKERS:-8}
MAX_LOGIT_SCALE=${MAX_LOGIT_SCALE:-1000}  # open_clip clamps t at 100; the theory wants t to keep growing
VAL_FREQUENCY=${VAL_FREQUENCY:-1}

ARGS=(
  "${LOSS_ARGS[@]}"
  --model ViT-B-16-sigrel
  --sigrel-max-logit-scale "$MAX_LOGIT_SCALE"
  --loss-dist-impl bidir
  --train-data "$LAION_TRAIN"
  --train-num-samples "$TRAIN_NUM_SAMPLES"
  --dataset-resampled
  --val-data "$VAL_DATA"
  --val-num-samples "$VAL_NUM_SAMPLES"
  --val-frequency "$VAL_FREQUENCY"
  --dataset-type webdataset
  --batch-size "$BATCH_SIZE"
  --epochs "$EPOCHS"
  --lr "$LR"
  --wd "$WD"
  --warmup "$WARMUP"
  --beta1 0.9 --beta2 0.95 --eps 1e-6
  --precision amp_bf16
  --grad-checkpointing
  --workers "$WORKERS"
  --seed 0
  --save-frequency 1
  --resume latest
  --report-to tensorboard
  --log-every-n-steps 100
  --logs "$LOGS"
  --name "$NAME"
)
if [[ -n "${IMAGENET_VAL:-}" ]]; then
  ARGS+=(--imagenet-val "$IMAGENET_VAL" --zeroshot-frequency 2)
fi

# Rendezvous for torch.distributed (dist_url env://): the first node of the allocation.
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-12802}
# Every task sees all GPUs of its node and picks cuda:$SLURM_LOCALID (open_clip's convention).
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((GPUS_PER_NODE - 1)))}
export CUDA_VISIBLE_DEVICES

# srun stops at the first non-option (python), python at `-m MODULE`: every later argument reaches
# open_clip_sigrel.cli.train unchanged, so no `--` is needed here (unlike the torch launcher in the cc3m / cc12m recipes).
CMD=(srun --cpu_bind=v --accel-bind=gn python -u -m open_clip_sigrel.cli.train "${ARGS[@]}")
case "${SIGREL_RECIPE_DRY_RUN:-}" in
  "") exec "${CMD[@]}" ;;
  args) printf '%s\0' "${ARGS[@]}" ;;
  *) printf '%q ' "${CMD[@]}"; echo ;;
esac
