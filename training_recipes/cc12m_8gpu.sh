#!/usr/bin/env bash
# CC12M, ViT-B-16-sigrel; one node, 8 GPUs, torchrun. The loss is the A/B variable: LOSS=sigrel (the
# default: relative-bias sigmoid loss, --loss sigrel) or LOSS=siglip (the baseline: --siglip, absolute
# logit_bias); the two runs differ only in the loss flags (training_recipes/_common.sh) and the run name.
#
#   CC12M_TRAIN='/data/cc12m/cc12m-train-{0000..2175}.tar' CC12M_TRAIN_NUM_SAMPLES=10968539 \
#   CC12M_VAL='/data/cc3m/val/{00000..00001}.tar' CC12M_VAL_NUM_SAMPLES=13000 \
#   LOSS=sigrel bash training_recipes/cc12m_8gpu.sh    # then the same with LOSS=siglip
#
# Data: webdataset shards (e.g. img2dataset's cc12m output); the sample counts are those of YOUR
# download (img2dataset's *_stats.json), the defaults below are placeholders. CC12M has no val
# split: CC12M_VAL defaults to CC3M's val shards (any held-out image-text shards will do).
# Sized for 8 x 80 GB GPUs: 256 per GPU (2048 global) at 224 px in bf16 without gradient
# checkpointing; on 40 GB cards lower BATCH_SIZE or add --grad-checkpointing.
# Other knobs (environment): LOGS NAME (default cc12m-vitb16-$LOSS) NPROC_PER_NODE BATCH_SIZE (per GPU)
# EPOCHS LR WD WARMUP BETA2 WORKERS MAX_LOGIT_SCALE VAL_FREQUENCY IMAGENET_VAL (adds zero-shot ImageNet).
# SIGREL_RECIPE_DRY_RUN=1 prints the command instead of running it; =args prints only the training
# arguments, NUL-separated (tests/integration/test_recipes.py parses them with the plugin's parser).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"  # LOSS -> LOSS_ARGS, shared flags, recipe_args, launch

CC12M_TRAIN=${CC12M_TRAIN:-"/data/cc12m/cc12m-train-{0000..2175}.tar"}
CC12M_TRAIN_NUM_SAMPLES=${CC12M_TRAIN_NUM_SAMPLES:-10968539}
CC12M_VAL=${CC12M_VAL:-"/data/cc3m/val/{00000..00001}.tar"}
CC12M_VAL_NUM_SAMPLES=${CC12M_VAL_NUM_SAMPLES:-13000}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
BATCH_SIZE=${BATCH_SIZE:-256}          # per GPU: 2048 global on 8 GPUs
EPOCHS=${EPOCHS:-32}
LR=${LR:-5e-4}
WD=${WD:-0.1}
WARMUP=${WARMUP:-5000}
BETA2=${BETA2:-0.98}

recipe_args cc12m-vitb16 \
  --train-data "$CC12M_TRAIN" \
  --train-num-samples "$CC12M_TRAIN_NUM_SAMPLES" \
  --val-data "$CC12M_VAL" \
  --val-num-samples "$CC12M_VAL_NUM_SAMPLES"

# `--` ends torchrun's options: without it torchrun (torch >= 2.14) reads the training flag --logs
# as an ambiguous prefix of its own --logs-specs and exits before launching anything.
launch torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" -m open_clip_sigrel.cli.train --
