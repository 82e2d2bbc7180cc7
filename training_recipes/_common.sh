# Sourced by the training recipes, not run on its own: what every recipe shares, written once.
#   LOSS (environment: sigrel, the default, or siglip) -> LOSS_ARGS, the only flags in which the two
#   runs of an A/B pair differ; recipe_args builds the training arguments (the open_clip flags every
#   recipe passes are here); launch execs the launcher or prints a dry run (SIGREL_RECIPE_DRY_RUN).
# A recipe sets its dataset's variables and BATCH_SIZE EPOCHS LR WD WARMUP BETA2, then calls
#   recipe_args RUN_PREFIX DATA_FLAGS...   and   launch LAUNCHER... (the command up to the training arguments).

LOSS=${LOSS:-sigrel}
case "$LOSS" in
  # Relative bias trainable from the SigLIP-equivalent start: t0 = 10, b_rel0 = 1 (logit_bias0 = -10).
  sigrel) LOSS_ARGS=(--loss sigrel --sigrel-init-logit-scale 10 --sigrel-init-rel-bias 1.0) ;;
  # open_clip's SigLipLoss, absolute trainable logit_bias; --siglip starts at t0 = 10, logit_bias0 = -10.
  siglip) LOSS_ARGS=(--siglip) ;;
  *) echo "$(basename "$0"): LOSS=$LOSS: expected sigrel or siglip" >&2; exit 2 ;;
esac

# Knobs with the same default in every recipe (each can be overridden from the environment).
LOGS=${LOGS:-"./logs"}
WORKERS=${WORKERS:-8}
MAX_LOGIT_SCALE=${MAX_LOGIT_SCALE:-1000}  # open_clip clamps t at 100; the theory wants t to keep growing
VAL_FREQUENCY=${VAL_FREQUENCY:-1}         # every evaluation logs the geometry metrics

# recipe_args RUN_PREFIX FLAGS...: sets ARGS to the loss flags, the recipe's own FLAGS (data, and
# whatever only that recipe needs) and the shared flags. The default NAME carries the loss: with
# --resume latest, two runs of a pair in one run folder would resume each other's checkpoints.
recipe_args() {
  local prefix=$1
  shift
  NAME=${NAME:-"$prefix-$LOSS"}
  ARGS=(
    "${LOSS_ARGS[@]}"
    --model ViT-B-16-sigrel
    --sigrel-max-logit-scale "$MAX_LOGIT_SCALE"
    --loss-dist-impl bidir
    "$@"
    --val-frequency "$VAL_FREQUENCY"
    --dataset-type webdataset
    --batch-size "${BATCH_SIZE:?no default in this recipe}"
    --epochs "${EPOCHS:?no default in this recipe}"
    --lr "${LR:?no default in this recipe}"
    --wd "${WD:?no default in this recipe}"
    --warmup "${WARMUP:?no default in this recipe}"
    --beta1 0.9 --beta2 "${BETA2:?no default in this recipe}" --eps 1e-6
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
}

# launch LAUNCHER...: runs LAUNCHER... "${ARGS[@]}", or with SIGREL_RECIPE_DRY_RUN=args prints only ARGS,
# NUL-separated (what tests/integration/test_recipes.py parses), with any other value the command (%q-quoted).
launch() {
  local cmd=("$@" "${ARGS[@]}")
  case "${SIGREL_RECIPE_DRY_RUN:-}" in
    "") exec "${cmd[@]}" ;;
    args) printf '%s\0' "${ARGS[@]}" ;;
    *) printf '%q ' "${cmd[@]}"; echo ;;
  esac
}
