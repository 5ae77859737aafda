#!/usr/bin/env bash
# All GPU checks in one go (parts 1-3 about 12 minutes on one H100/H200, part 4 about 10):
#   1. train-step throughput and peak memory vs transformers' ViT/Swin/Swinv2 MIM models (Swin-T and Swin-B), bf16,
#      then fp32 without TF32;
#   2. torch.compile vs eager (loss agreement, speed) and fp16 + GradScaler training;
#   3. the pretraining script end to end in bf16 on the tiny preset and on the paper's ViT-B;
#   4. scale targets (benchmarks/scale.py): MFU of the compiled ViT-B/16 bf16 step by batch size, the full
#      pretraining loop vs the bare step on real-size JPEGs, peak memory with/without activation checkpointing
#      and the largest batch per GPU for ViT-B and Swin-B.
#
# Usage: bash benchmarks/gpu_check.sh [RESULTS_DIR]     (logs and JSON go to RESULTS_DIR, default gpu_results)
# Settings (environment):
#   STEPS            the parts, run in the order given (default "1 2 3"), e.g. "4 1" for scale first;
#   BUDGET_S         seconds for the whole run (default: none): each command's timeout is capped by what is left,
#                    and a command with under 30 s left is skipped (and says so), so a short slot ends on time
#                    with the earlier parts' results written;
#   PAIRS            part 1's pairs (default "vit swin swin-base swinv2 paper"); FP32=0 skips its fp32 run;
#   MFU_BATCHES      part 4's MFU batch sizes (default "128 256"; each is one compile, about a minute for ViT-B);
#   COMPILE_PRESETS  the models compiled in part 2.
# A 15-minute slot with issue 13/14's open figures, as two calls of under ten minutes:
#   BUDGET_S=500 STEPS="4" bash benchmarks/gpu_check.sh
#   BUDGET_S=420 STEPS="1" PAIRS="swinv2 swin-base" FP32=0 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-gpu_results}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
STEPS=${STEPS:-1 2 3}
BUDGET_S=${BUDGET_S:-0}
PAIRS=${PAIRS:-vit swin swin-base swinv2 paper}
FP32=${FP32:-1}
MFU_BATCHES=${MFU_BATCHES:-128 256}
COMPILE_PRESETS=${COMPILE_PRESETS:-swin-tiny-w6-192 vit-base-p16-224}

# `timed SECONDS CMD...`: CMD under `timeout`, its limit capped by what is left of BUDGET_S.
timed() {
    local limit=$1
    shift
    if (( BUDGET_S > 0 )); then
        local left=$(( BUDGET_S - SECONDS ))
        (( left < limit )) && limit=$left
    fi
    if (( limit < 30 )); then
        echo "SKIPPED (under 30 s of BUDGET_S=$BUDGET_S left): $*"
        return 124
    fi
    timeout -k 10 "$limit" "$@"
}

part1() {
    echo "== 1. train step vs transformers (bf16; then fp32 without TF32) =="
    # shellcheck disable=SC2086
    timed 300 $PY benchmarks/train_step.py --device cuda --dtype bf16 --batch_size 64 --warmup 5 --iters 10 \
        --rounds 6 --pairs $PAIRS --json "$RESULTS_DIR/train_step.json" 2>&1 \
        | tee "$RESULTS_DIR/train_step.log" | grep -v Warning
    [[ "$FP32" == 0 ]] && return
    timed 150 $PY benchmarks/train_step.py --device cuda --dtype fp32 --batch_size 32 --warmup 3 --iters 5 \
        --rounds 6 --pairs vit swin --json "$RESULTS_DIR/train_step_fp32.json" 2>&1 \
        | tee "$RESULTS_DIR/train_step_fp32.log" | grep -v Warning
}

part2() {
    echo "== 2. torch.compile + fp16 =="
    # shellcheck disable=SC2086
    timed 200 $PY benchmarks/compile_check.py --presets $COMPILE_PRESETS --batch_size 64 2>&1 \
        | tee "$RESULTS_DIR/compile.log" | grep -v Warning
}

part3() {
    echo "== 3. pretraining script, bf16 =="
    local preset batch
    for preset in vit-nano-p4-32 vit-base-p16-224; do
        batch=$([ "$preset" = vit-nano-p4-32 ] && echo 64 || echo 128)
        timed 75 $PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
            --dynamo_backend no examples/run_pretraining.py --preset "$preset" --mixed_precision bf16 \
            --per_device_train_batch_size "$batch" --sample_data_repeats 64 --max_train_steps 30 --logging_steps 10 \
            --learning_rate 1e-3 --output_dir "/tmp/simmim-gpu-$preset" --overwrite_output_dir \
            > "$RESULTS_DIR/pretrain-$preset.log" 2>&1
        echo "$preset exit=$?"
        grep -E "step (10|20|30|40)/|Num processes|images/s|SKIPPED" "$RESULTS_DIR/pretrain-$preset.log" \
            | grep -v "it/s\]" | tail -6
    done
}

part4() {
    echo "== 4. scale: MFU, loop vs bare step, checkpointing memory =="
    # Every compiled measurement builds its own static-shape graph (about a minute each for ViT-B).
    # shellcheck disable=SC2086
    timed 300 $PY benchmarks/scale.py mfu --device cuda --dtype bf16 --compile --batch_sizes $MFU_BATCHES \
        --json "$RESULTS_DIR/mfu.json" 2>&1 | tee "$RESULTS_DIR/mfu.log" | grep -v Warning
    timed 300 $PY benchmarks/scale.py loop --device cuda --dtype bf16 --compile --batch_sizes 128 \
        --json "$RESULTS_DIR/loop.json" > "$RESULTS_DIR/loop.log" 2>&1
    grep -E "loop rate|loop/bare|SKIPPED|Error" "$RESULTS_DIR/loop.log"
    timed 150 $PY benchmarks/scale.py memory --device cuda --dtype bf16 --json "$RESULTS_DIR/memory.json" 2>&1 \
        | tee "$RESULTS_DIR/memory.log" | grep -v Warning
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
# Every part imports the package and its data stack: stop at once, not part by part, if one is missing.
$PY -c "import simmim_hf, datasets, evaluate, kornia, simplejpeg" || { echo "missing packages: see the error above" >&2; exit 1; }
for step in $STEPS; do
    case $step in
        1 | 2 | 3 | 4) "part$step" ;;
        *) echo "unknown part '$step' in STEPS (parts are 1-4)" >&2; exit 2 ;;
    esac
done
