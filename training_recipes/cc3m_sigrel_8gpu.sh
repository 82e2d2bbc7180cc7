#!/usr/bin/env bash
# CC3M, ViT-B-16-sigrel, relative-bias sigmoid loss (--loss sigrel); one node, 8 GPUs, torchrun.
# A/B partner: cc3m_siglip_8gpu.sh -- identical except LOSS_ARGS (and the default NAME).
#
#   CC3M_TRAIN='/data/cc3m/train/{00000..00331}.tar' CC3M_TRAIN_NUM_SAMPLES=2870000 \
#   CC3M_VAL='/data/cc3m/val/{00000..00001}.tar' CC3M_VAL_NUM_SAMPLES=13000 \
#   bash training_recipes/cc3m_sigrel_8gpu.sh
#
# Data: webdataset shards (e.g. img2dataset's cc3m output); the sample counts are those of YOUR
# download (img2dataset's *_stats.json), the defaults below are placeholders.
# Other knobs (environment): LOGS NAME NPROC_PER_NODE BATCH_SIZE (per GPU) EPOCHS LR WD WARMUP
# WORKERS MAX_LOGIT_SCALE VAL_FREQUENCY IMAGENET_VAL (adds zero-shot ImageNet).
# SIGREL_RECIPE_DRY_RUN=1 prints the command instead of running it; =args prints only the training
# arguments, NUL-separated (tests/integration/test_recipes.py parses them with the plugin's parser).
set -euo pipefail

# ---- the only lines that differ from cc3m_siglip_8gpu.sh ----------------------------------------
# Relative bias trainable from the SigLIP-equivalent start: t0 = 10, b_rel0 = 1 (logit_bias0 = -10).
LOSS_ARGS=(--loss sigrel --sigrel-init-logit-scale 10 --sigrel-init-rel-bias 1.0)
NAME=${NAME:-"cc3m-vitb16-sigrel"}
# --------------------------------------------------------------------------------------------------

CC3M_TRAIN=${CC3M_TRAIN:-"/data/cc3m/train/{00000..00331}.tar"}
CC3M_TRAIN_NUM_SAMPLES=${CC3M_TRAIN_NUM_SAMPLES:-2870000}
CC3M_VAL=${CC3M_VAL:-"/data/cc3m/val/{00000..00001}.tar"}
CC3M_VAL_NUM_SAMPLES=${CC3M_VAL_NUM_SAMPLES:-13000}
LOGS=${LOGS:-"./logs"}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
BATCH_SIZE=${BATCH_SIZE:-256}          # per GPU: 2048 global on 8 GPUs
EPOCHS=${EPOCHS:-30}
LR=${LR:-5e-4}
WD=${WD:-0.1}
WARMUP=${WARMUP:-2000}
WORKERS=${WORKERS:-8}
MAX_LOGIT_SCALE=${MAX_LOGIT_SCALE:-1000}  # open_clip clamps t at 100; the theory wants t to keep growing
VAL_FREQUENCY=${VAL_FREQUENCY:-1}

ARGS=(
  "${LOSS_ARGS[@]}"
  --model ViT-B-16-sigrel
  --sigrel-max-logit-scale "$MAX_LOGIT_SCALE"
  --loss-dist-impl bidir
  --train-data "$CC3M_TRAIN"
  --train-num-samples "$CC3M_TRAIN_NUM_SAMPLES"
  --val-data "$CC3M_VAL"
  --val-num-samples "$CC3M_VAL_NUM_SAMPLES"
  --val-frequency "$VAL_FREQUENCY"
  --dataset-type webdataset
  --batch-size "$BATCH_SIZE"
  --epochs "$EPOCHS"
  --lr "$LR"
  --wd "$WD"
  --warmup "$WARMUP"
  --beta1 0.9 --beta2 0.98 --eps 1e-6
  --precision amp_bf16
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

# `--` ends torchrun's options: without it torchrun (torch >= 2.14) reads the training flag --logs
# as an ambiguous prefix of its own --logs-specs and exits before launching anything.
CMD=(torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" -m open_clip_sigrel.cli.train -- "${ARGS[@]}")
case "${SIGREL_RECIPE_DRY_RUN:-}" in
  "") exec "${CMD[@]}" ;;
  args) printf '%s\0' "${ARGS[@]}" ;;
  *) printf '%q ' "${CMD[@]}"; echo ;;
esac
