#!/usr/bin/env bash
# All GPU checks in one go (parts 1-3 about 12 minutes on one H100/H200, part 4 about 10; pick with STEPS):
#   1. train-step throughput and peak memory vs transformers' ViT/Swin/Swinv2 MIM models (Swin-T and Swin-B), bf16;
#   2. torch.compile vs eager (loss agreement, speed) and fp16 + GradScaler training;
#   3. the pretraining script end to end in bf16 on the tiny preset and on the paper's ViT-B;
#   4. scale targets (benchmarks/scale.py): MFU of the compiled ViT-B/16 bf16 step by batch size, the full
#      pretraining loop vs the bare step on real-size JPEGs, peak memory with/without activation checkpointing
#      and the largest batch per GPU for ViT-B and Swin-B.
# Usage: bash benchmarks/gpu_check.sh [RESULTS_DIR]     (logs and JSON go to RESULTS_DIR, default gpu_results)
#   STEPS="1 2" runs only those parts (default "1 2 3"; STEPS="1 4" fits a 15-minute slot with issue 13/14's
#   figures); COMPILE_PRESETS picks the models compiled in part 2.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-gpu_results}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
STEPS=${STEPS:-1 2 3}
COMPILE_PRESETS=${COMPILE_PRESETS:-swin-tiny-w6-192 vit-base-p16-224}
want() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

if want 1; then
echo "== 1. train step vs transformers (bf16; then fp32 without TF32) =="
timeout 300 $PY benchmarks/train_step.py --device cuda --dtype bf16 --batch_size 64 --warmup 5 --iters 10 --rounds 6 \
    --pairs vit swin swin-base swinv2 paper --json "$RESULTS_DIR/train_step.json" 2>&1 | tee "$RESULTS_DIR/train_step.log" | grep -v Warning
timeout 150 $PY benchmarks/train_step.py --device cuda --dtype fp32 --batch_size 32 --warmup 3 --iters 5 --rounds 6 \
    --pairs vit swin --json "$RESULTS_DIR/train_step_fp32.json" 2>&1 | tee "$RESULTS_DIR/train_step_fp32.log" \
    | grep -v Warning
fi

if want 2; then
echo "== 2. torch.compile + fp16 =="
# shellcheck disable=SC2086
timeout 200 $PY benchmarks/compile_check.py --presets $COMPILE_PRESETS --batch_size 64 2>&1 \
    | tee "$RESULTS_DIR/compile.log" | grep -v Warning
fi

if want 3; then
echo "== 3. pretraining script, bf16 =="
for preset in vit-nano-p4-32 vit-base-p16-224; do
    batch=$([ "$preset" = vit-nano-p4-32 ] && echo 64 || echo 128)
    timeout 75 accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
        examples/run_pretraining.py --preset "$preset" --mixed_precision bf16 --per_device_train_batch_size "$batch" \
        --sample_data_repeats 64 --max_train_steps 30 --logging_steps 10 --learning_rate 1e-3 \
        --output_dir "/tmp/simmim-gpu-$preset" > "$RESULTS_DIR/pretrain-$preset.log" 2>&1
    echo "$preset exit=$?"; grep -E "step (10|20|30|40)/|Num processes|images/s" "$RESULTS_DIR/pretrain-$preset.log" | grep -v "it/s\]" | tail -6
done
fi

want 4 || exit 0
echo "== 4. scale: MFU, loop vs bare step, checkpointing memory =="
# Every compiled measurement builds its own static-shape graph (about a minute each for ViT-B).
timeout -k 10 300 $PY benchmarks/scale.py mfu --device cuda --dtype bf16 --compile --batch_sizes 128 256 \
    --json "$RESULTS_DIR/mfu.json" 2>&1 | tee "$RESULTS_DIR/mfu.log" | grep -v Warning
timeout -k 10 300 $PY benchmarks/scale.py loop --device cuda --dtype bf16 --compile --batch_sizes 128 \
    --json "$RESULTS_DIR/loop.json" > "$RESULTS_DIR/loop.log" 2>&1; grep "loop/bare" "$RESULTS_DIR/loop.log"
timeout -k 10 150 $PY benchmarks/scale.py memory --device cuda --dtype bf16 --json "$RESULTS_DIR/memory.json" 2>&1 \
    | tee "$RESULTS_DIR/memory.log" | grep -v Warning
