#!/usr/bin/env bash
# The GPU checks and benchmarks of one lent-GPU session, stage by stage, for the `device` tool's
# machine (see README "GPU sessions"). Each stage runs under its own time limit and a failing stage
# does not stop the next; every stage's output goes to $OUT/gpu.log and the result JSONs to
# $RESULTS (runs/gpu-results), which `pack` archives under $OUT (the tool brings both back).
# Usage, from the repository root on that machine:
#   bash bench/gpu_session.sh env cuda-tests loader step e2e
# Stages: env, bench-data + wait-data (the loader's data rendered in the background),
# bench-data-b64 + wait-b64 (e2e-b64's), bench-data-b256 + wait-b256 (e2e-b256-levers'),
# cuda-tests, cuda-tests-quick, tests (the whole suite),
# loader, loader-quick, loader-nvdec, loader-workers, step, step-compile, step-grid, step-modes,
# step-sdpa, step-master, step-master-bf16, step-master-256, step-coordesc, step-coordesc-256,
# step-gemm-autotune, step-gemm-autotune-256, gelu-tests, step-gelu, step-gelu-256,
# step-gelu-bias, step-gelu-bias-256, qkv-tests, step-qkv-split, step-qkv-split-256,
# step-bias-split, step-bias-split-256, loader-hw, e2e-b64-hw, fbank-tests, fbank-bench,
# e2e-b64-fbank, e2e-b64-levers, e2e-b256-levers, float8-tests, step-float8, step-float8-256,
# e2e-b256-float8, stream-tests, e2e-b16, e2e-b16-levers,
# step-autotune-master, e2e,
# e2e-eager, e2e-fast, e2e-fast-pretrain, e2e-b64, e2e-b64-gelu, e2e-graphs, e2e-thread,
# e2e-quick, e2e-ft-quick, e2e-ft-nothread-quick, e2e-graphs-quick, profile-stage, profile-e2e,
# profile-e2e-b64, profile-e2e-b64-prio,
# profile-e2e-ft, profile-step, profile-step-master, profile-step-gelu, profile-step-split,
# profile-step-fp16,
# scaling, demo,
# train-graphs,
# pack (archives every result so far into $OUT/results.tgz, as the tool returns at most 8 files;
# after each long stage, so that a call cut off at its limit still returns what it finished).
set -u
OUT=${OUT:-runs/gpu-session}
RESULTS=${RESULTS:-runs/gpu-results}  # outside $OUT: `pack` archives it into $OUT/results.tgz
DATA=${DATA:-runs/bench-data}
DATA_B64=${DATA_B64:-runs/bench-data-b64}
DATA_B256=${DATA_B256:-runs/bench-data-b256}
CORES=${CORES:-2}  # CPU cores per GPU on an 8-GPU node with 16 cores (issues 5 and 8)
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
LOG=$OUT/gpu.log

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log its output and exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name start $(date +%T) (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name rc=${PIPESTATUS[0]} end $(date +%T)" | tee -a "$LOG"
}

fixed_step() {  # fixed_step NAME SECONDS ARGS...: the compiled pretraining step at one batch,
    # 3 + 10 steps, its result named NAME; ARGS: --precision, --batch-size and any others
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" python3 -m bench.step --mode pretrain --compile --steps 10 \
        --warmup 3 --name "$name" --results-dir "$RESULTS" "$@"
}

e2e_b64() {  # e2e_b64 NAME ARGS...: full pretraining end to end at batch 64, bf16-master,
    # compiled, 2 cores, source in 2 workers, thread prefetch, 3 + 20 batches of e2e-b64's set;
    # ARGS: the model's and the loader's settings; results under $RESULTS/NAME. The DALI-fed
    # steps run twice, on torch's stream and on one of the highest priority (train.step_stream:
    # the loader's kernels yield to the step's), one row each; the loader-fed runs with the
    # whole process pinned to $CORES CPUs only (--pin-cores --no-unpinned: the CPU share of one
    # GPU, the targets' condition; unpinned runs cost minutes the session lacks since the
    # paper-style loader does the original's unused work, --baseline-work paper, ~2x the CPU
    # per sample of the lean one that earlier sessions measured).
    local name=$1
    shift
    stage "$name" 450 python3 -m bench.end_to_end --mode pretrain --size full \
        --full-batch-size 64 --precision bf16-master --compile --data "$DATA_B64" --clips 1700 \
        --cores "$CORES" --py-workers 2 --thread-prefetch 2 --steps 20 \
        --step-stream default,high-priority --pin-cores --no-unpinned \
        --results-dir "$RESULTS/${name#e2e-}" "$@"
}

e2e_b256() {  # e2e_b256 NAME ARGS...: the same at batch 256 (an H200's memory), 2 + 6 batches
    # of bench-data-b256's set (whole rounds of the paper-style loader's 2 workers: 5 timed
    # batches would count one made before the window, bench.common.whole_rounds)
    local name=$1
    shift
    stage "$name" 540 python3 -m bench.end_to_end --mode pretrain --size full \
        --full-batch-size 256 --precision bf16-master --compile --data "$DATA_B256" \
        --clips 2300 --cores "$CORES" --py-workers 2 --thread-prefetch 2 --warmup 2 \
        --steps 6 --step-stream default,high-priority --pin-cores --no-unpinned \
        --results-dir "$RESULTS/${name#e2e-}" "$@"
}

render_frames_set() {  # render_frames_set NAME DIR CLIPS: an end-to-end set of CLIPS 10-s
    # frames-only clips under DIR, rendered in the background (as bench.end_to_end's own
    # ensure_dataset would) while the next stages run; its process id in RENDER_PID
    local name=$1 dir=$2 clips=$3
    echo "=== $name start $(date +%T)" | tee -a "$LOG"
    python3 -c "from pathlib import Path; from bench.end_to_end import ensure_dataset; \
        ensure_dataset(Path('$dir'), $clips, 10.0, quiet=True, layouts=('frames',))" \
        >"$OUT/$name.log" 2>&1 &
    RENDER_PID=$!
}

wait_rendered() {  # wait_rendered NAME SECONDS PID RENDER_NAME DIR: wait for a background
    # rendering (PID empty: nothing started in this call, nothing to wait for), then show it
    stage "$1" "$2" bash -c "while [ -n '$3' ] && kill -0 '$3' 2>/dev/null; do sleep 1; done; \
        tail -3 $OUT/$4.log; ls $5"
}

for s in "$@"; do
    case $s in
    env)
        stage env 120 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total \
            --format=csv; python3 -c "import json, bench.common as c; \
            print(json.dumps(c.machine_info(), indent=1))"; python3 -c "import nvidia.dali as d; \
            print(\"dali\", d.__version__)"; nproc' ;;
    cuda-tests) stage cuda-tests 420 python3 -m pytest -q -m cuda tests -rs ;;
    bench-data)  # the loader benchmark's synthetic data, rendered in the background (all cores)
        # while the next stages run; `wait-data` waits for it. Same arguments as bench.loader's
        # own generation for `loader-quick`'s 24 batches (481 clips: every measured batch inside
        # one epoch), so it finds them.
        echo "=== bench-data start $(date +%T)" | tee -a "$LOG"
        python3 -c "from equiav.data.synth import generate; generate('$DATA', clips=481, \
            classes=10, seed=0, video_format=('webm', 'frames'), seconds=10.0, \
            test_fraction=0.1, progress=False)" >"$OUT/bench-data.log" 2>&1 &
        DATA_PID=$! ;;
    wait-data)  # (without bench-data in the same call: nothing to wait for)
        wait_rendered wait-data 240 "${DATA_PID:-}" bench-data "$DATA" ;;
    bench-data-b64)  # e2e-b64's 1700 frames-only clips; `wait-b64` waits for them
        render_frames_set bench-data-b64 "$DATA_B64" 1700
        DATA_B64_PID=$RENDER_PID ;;
    wait-b64) wait_rendered wait-b64 240 "${DATA_B64_PID:-}" bench-data-b64 "$DATA_B64" ;;
    bench-data-b256)  # e2e-b256-levers' 2300 frames-only clips (2070 to train on: the 2 + 6
        # batches of 256 inside one epoch; ~2 minutes on 16 cores)
        render_frames_set bench-data-b256 "$DATA_B256" 2300
        DATA_B256_PID=$RENDER_PID ;;
    wait-b256) wait_rendered wait-b256 300 "${DATA_B256_PID:-}" bench-data-b256 "$DATA_B256" ;;
    cuda-tests-quick) stage cuda-tests 200 python3 -m pytest -q -m cuda tests -rs -x ;;
    e2e-quick)  # full pretrain, eager, source in 2 workers, batches made in a background thread
        stage e2e-quick 200 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 2 \
            --steps 40 --results-dir "$RESULTS/thread" ;;
    tests) stage tests 540 python3 -m pytest -q -x -n 8 tests ;;
    loader)
        # Two alternating rounds (medians): the data generation (>= 268 clips, so that no
        # measured batch crosses an epoch) and three rounds might not fit the stage's limit.
        stage loader 420 python3 -m bench.loader --data "$DATA" --cores "$CORES" --device cuda \
            --repeats 2 --results-dir "$RESULTS" ;;
    loader-quick)  # file layouts only, 3 rounds of 24 batches (12 took 38 s on an H200): at
        # ~1800 samples/s 12 batches last 0.1 s, and the 2 batches DALI prefetched during the
        # warmup count for up to a sixth of them
        stage loader-quick 300 python3 -m bench.loader --data "$DATA" --cores "$CORES" \
            --device cuda --layouts frames,webm --repeats 3 --batches 24 \
            --results-dir "$RESULTS" ;;
    loader-hw)  # JPEG frames with all of them on the GPU's hardware JPEG decoder
        # (data.hw_decoder_load=1.0) and with DALI's default share (0.65: the rest on nvJPEG's
        # hybrid path, Huffman decoding on the 2 CPU threads), one after the other, 2 rounds
        for load in 0.65 1.0; do
            stage "loader-hw-$load" 150 python3 -m bench.loader --data "$DATA" \
                --cores "$CORES" --device cuda --layouts frames --repeats 2 --batches 24 \
                --hw-decoder-load "$load" --results-dir "$RESULTS/loader-hw-$load"
        done ;;
    loader-nvdec)  # video files through NVDEC (data.video_decoder=gpu), the earlier default
        stage loader-nvdec 240 python3 -m bench.loader --data "$DATA" --cores "$CORES" \
            --device cuda --layouts webm --repeats 1 --video-decoder gpu \
            --results-dir "$RESULTS/nvdec" ;;
    loader-workers)
        stage loader-workers 420 python3 -m bench.loader --data "$DATA" --cores "$CORES" \
            --device cuda --layouts frames,webm --py-workers 0,2 --repeats 1 \
            --results-dir "$RESULTS/workers" ;;
    step) stage step 420 python3 -m bench.step --results-dir "$RESULTS" ;;
    step-compile)
        stage step-compile 540 python3 -m bench.step --compile --no-search --name step-compile \
            --results-dir "$RESULTS" ;;
    step-grid)  # every precision x fused/unfused AdamW, eager, batch 16 (~1 minute)
        stage step-grid 300 python3 -m bench.step --mode pretrain --grid eager --no-search \
            --results-dir "$RESULTS" ;;
    e2e)
        stage e2e 540 python3 -m bench.end_to_end --mode pretrain,finetune --size tiny,full \
            --data "$DATA" --cores "$CORES" --results-dir "$RESULTS" ;;
    e2e-eager)  # the sync-free step and device stage without compilation: full pretrain
        stage e2e-eager 420 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --results-dir "$RESULTS/eager" ;;
    profile-stage)  # the loader's device stage alone: launches, syncs, kernel time
        stage profile-stage 240 python3 -m bench.profile --what stage --data "$DATA" \
            --cores "$CORES" --steps 10 --name profile-stage --results-dir "$RESULTS" ;;
    profile-e2e)  # DALI-fed compiled steps: is the GPU ever idle?
        stage profile-e2e 360 python3 -m bench.profile --what e2e --compile --py-workers 2 \
            --data "$DATA" --cores "$CORES" --steps 10 --name profile-e2e-compiled \
            --results-dir "$RESULTS" ;;
    profile-e2e-b64)  # e2e-b64's DALI-fed steps (bf16-master, compiled, batch 64, thread
        # prefetch, its 1700 clips): what the loader's kernels ("dali" and "input_stage" classes)
        # take from the step's GPU: DALI-fed steps ran ~5 % below step-only with 0.8 % input wait
        stage profile-e2e-b64 360 python3 -m bench.profile --what e2e --compile \
            --precision bf16-master --batch-size 64 --py-workers 2 --thread-prefetch 2 \
            --data "$DATA_B64" --clips 1700 --cores "$CORES" --steps 10 \
            --name profile-e2e-b64-master --results-dir "$RESULTS" ;;
    profile-e2e-b64-prio)  # the same with the step on the high-priority stream
        # (train.step_stream): do the loader's kernels move into the step's idle SMs?
        stage profile-e2e-b64-prio 360 python3 -m bench.profile --what e2e --compile \
            --precision bf16-master --batch-size 64 --py-workers 2 --thread-prefetch 2 \
            --data "$DATA_B64" --clips 1700 --cores "$CORES" --steps 10 \
            --step-stream high-priority --name profile-e2e-b64-prio --results-dir "$RESULTS" ;;
    profile-e2e-ft)  # DALI-fed eager finetuning with thread prefetch: 69 % of step-only, why?
        stage profile-e2e-ft 240 python3 -m bench.profile --what e2e --mode finetune \
            --py-workers 2 --thread-prefetch 2 --data "$DATA" --cores "$CORES" --steps 10 \
            --name profile-e2e-finetune-thread --results-dir "$RESULTS" ;;
    e2e-ft-quick)  # finetuning, eager, as e2e-quick
        stage e2e-ft-quick 150 python3 -m bench.end_to_end --mode finetune --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 2 \
            --steps 40 --results-dir "$RESULTS/thread-ft" ;;
    e2e-ft-nothread-quick)  # finetuning without the background thread: is the thread's host
        # work what slows the finetuning step (69 % of step-only with it on an H200)?
        stage e2e-ft-nothread-quick 150 python3 -m bench.end_to_end --mode finetune --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 0 \
            --steps 40 --results-dir "$RESULTS/nothread-ft" ;;
    e2e-graphs-quick)  # pretraining, CUDA graphs, as e2e-quick (170 s on an H200)
        stage e2e-graphs-quick 220 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 2 --compile \
            --compile-mode reduce-overhead --steps 40 --results-dir "$RESULTS/thread-graphs" ;;
    profile-step)  # the compiled step at batch 128: which kernels hold the MFU down
        stage profile-step 360 python3 -m bench.profile --what step --compile --batch-size 128 \
            --data "$DATA" --steps 5 --name profile-step-compiled-b128 --results-dir "$RESULTS" ;;
    e2e-graphs)  # CUDA graphs for the step: its ~2000 launches become one replay
        stage e2e-graphs 540 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --compile \
            --compile-mode reduce-overhead --results-dir "$RESULTS/graphs" ;;
    e2e-thread)  # the loader's batches made in a background thread, eager and compiled
        stage e2e-thread 420 python3 -m bench.end_to_end --mode pretrain,finetune --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 2 \
            --results-dir "$RESULTS/thread"
        stage e2e-thread-graphs 540 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --thread-prefetch 2 --compile \
            --compile-mode reduce-overhead --results-dir "$RESULTS/thread-graphs" ;;
    step-modes)  # the step at batch 16 and 128 under CUDA graphs, then with GEMM epilogue fusion
        stage step-graphs 420 python3 -m bench.step --mode pretrain --compile \
            --compile-mode reduce-overhead --batch-limit 128 --name step-graphs \
            --results-dir "$RESULTS"
        stage step-autotune 540 python3 -m bench.step --mode pretrain --compile \
            --compile-mode max-autotune-no-cudagraphs --batch-limit 128 --name step-autotune \
            --results-dir "$RESULTS" ;;
    step-master)  # a bf16 model with fp32 master weights, compiled for batch 128 alone (~60 s
        # on an H200, compilation included); `step-master-bf16` is the bf16-autocast side of it
        fixed_step step-master 300 --precision bf16-master --batch-size 128 ;;
    step-master-bf16)
        fixed_step step-master-bf16 300 --precision bf16 --batch-size 128 ;;
    step-master-256)  # bf16-master at batch 256 (an H200's memory; bf16 at 128 took 62 GiB)
        fixed_step step-master-256 360 --precision bf16-master --batch-size 256 ;;
    e2e-b64)  # full pretraining at batch 64, bf16-master, compiled: the step's rate rises with
        # the batch and the paper-style loader's does not (issue 8's 10x target). Its own set of
        # 1700 clips in JPEG frames only (~30 s to render on 16 cores): the 3 + 20 batches of 64
        # stay inside one epoch for both loaders (the paper-style loader stalls at every epoch
        # start; 481 clips would be 6 batches an epoch)
        e2e_b64 e2e-b64 ;;
    e2e-b64-gelu)  # e2e-b64 with our Triton GELU (model.gelu=triton: the step 2.6 % faster)
        e2e_b64 e2e-b64-gelu --gelu triton ;;
    e2e-b64-hw)  # e2e-b64 with every JPEG frame on the hardware decoder (data.hw_decoder_load
        # =1.0): DALI-fed steps ran 5 % slower than step-only, and the hybrid path's CUDA
        # kernels run beside the step
        e2e_b64 e2e-b64-hw --hw-decoder-load 1.0 ;;
    train-graphs)  # a real training run (train.py, full size, the synthetic set) with CUDA
        # graphs and bf16-master, 60 steps, then resumed to 80: before either becomes a preset's
        # default (~5 minutes: two compilations; checkpoints of ~2.5 GB stay under runs/)
        TRAIN=(python3 train.py pretrain --config configs/pretrain_audioset.yaml
            --set data.dataset=synthetic --set data.train_json="$DATA/train.json"
            --set data.val_json=null --set data.test_json="$DATA/test.json"
            --set data.retrieval_json=null --set data.label_csv="$DATA/class_labels_indices.csv"
            --set data.audio_mean=-4.346 --set data.audio_std=4.332
            --set model.audio_pretrained_encoder=null --set model.visual_pretrained_encoder=null
            --set train.compile_mode=reduce-overhead --set train.precision=bf16-master
            --set train.log_every=10 --set train.save_path=runs/train-graphs)
        rm -rf runs/train-graphs
        stage train-graphs 300 "${TRAIN[@]}" --set train.max_steps=60
        stage train-graphs-resume 240 "${TRAIN[@]}" --set train.max_steps=80 \
            --set train.resume=auto
        mkdir -p "$RESULTS/train-graphs"
        cp runs/train-graphs/tb/metrics.jsonl "$RESULTS/train-graphs/" ;;
    step-sdpa)  # the attention kernel: FlashAttention-2 and memory-efficient attention instead
        # of torch's default (cuDNN), in the best step so far (bf16-master, compiled, batch 128,
        # our Triton GELU), against `step-gelu`, the same step with the default kernel. Each
        # compiles afresh (~75 s on an H200): a forced kernel bypasses the compile cache, which
        # would hand back the default's graph (bench.step.forced_attention; the rows of
        # 2026-11-26's fifth session were that)
        for kernel in flash efficient; do
            fixed_step "step-sdpa-$kernel" 240 --precision bf16-master --batch-size 128 \
                --gelu triton --sdpa "$kernel"
        done ;;
    profile-step-master)  # the kernels of the best step so far (bf16-master, compiled, batch
        # 128, 42.5 % MFU on an H200): which of them hold it below 45 %
        stage profile-step-master 300 python3 -m bench.profile --what step --compile \
            --precision bf16-master --batch-size 128 --data "$DATA" --steps 5 \
            --name profile-step-master-b128 --results-dir "$RESULTS" ;;
    profile-step-gelu)  # the kernels of the best steps (bf16-master, compiled, batch 128, our
        # Triton GELU: 245.6 ms against 252.0 without on one H200; and with fc1's bias in it):
        # what GELU and fc1's bias gradient cost now (~35 s each)
        for gelu in triton triton-bias; do
            stage "profile-step-$gelu" 300 python3 -m bench.profile --what step --compile \
                --precision bf16-master --batch-size 128 --gelu "$gelu" --data "$DATA" \
                --steps 5 --name "profile-step-$gelu-b128" --results-dir "$RESULTS"
        done ;;
    profile-step-split)  # the kernels of the step with both new levers (model.gelu=
        # triton-bias, model.qkv=split; bf16-master, compiled, batch 128): no stack copy, the
        # bias gradients where they went (~35 s)
        stage profile-step-split 300 python3 -m bench.profile --what step --compile \
            --precision bf16-master --batch-size 128 --gelu triton-bias --qkv split \
            --data "$DATA" --steps 5 --name profile-step-split-b128 --results-dir "$RESULTS" ;;
    profile-step-fp16)  # fp16 with fused AdamW ran 80.8 ms per eager batch-16 step on an H200,
        # unfused 70.8 (bf16: 64.4 fused, 70.5 unfused): where the fused step's 10 ms go
        for optimizer in fused unfused; do
            flag=$([ "$optimizer" = unfused ] && echo --unfused)
            stage "profile-step-fp16-$optimizer" 240 python3 -m bench.profile --what step \
                --precision fp16 $flag --data "$DATA" --steps 5 \
                --name "profile-step-fp16-$optimizer" --results-dir "$RESULTS"
        done ;;
    step-coordesc)  # inductor's coordinate-descent tuning of the Triton kernels it generates
        # (LayerNorm, GELU, residual adds: the memory-bound quarter of the step) without GEMM
        # autotuning; bf16-master, batch 128, against `step-master`. It ran past 300 s on an
        # H200 (compilation and tuning; the tuning is lost with the machine): a call of its own
        fixed_step step-coordesc 560 --precision bf16-master --batch-size 128 \
            --compile-mode coordinate-descent ;;
    step-coordesc-256)  # the same tuning at batch 256 (an H200's memory), against the
        # 43.5 % MFU of `step-master-256`; a call of its own too
        fixed_step step-coordesc-256 560 --precision bf16-master --batch-size 256 \
            --compile-mode coordinate-descent ;;
    step-gemm-autotune)  # inductor's GEMM autotuning alone (Triton templates against cuBLAS,
        # GELU into fc1's epilogue where a template wins), bf16-master, batch 128, against
        # `step-master`: a call of its own
        fixed_step step-gemm-autotune 560 --precision bf16-master --batch-size 128 \
            --compile-mode gemm-autotune ;;
    step-gemm-autotune-256)  # the same at batch 256 (an H200's memory: 107 GiB), against the
        # 43.5 % MFU of `step-master-256` (45 % there is 459 ms a step): a call of its own
        fixed_step step-gemm-autotune-256 560 --precision bf16-master --batch-size 256 \
            --compile-mode gemm-autotune ;;
    fbank-tests)  # kernels/fbank.py on the GPU: the Triton kernel with IEEE and tf32x3 dots
        # and cuFFT against torchaudio's Kaldi fbank (and the CPU tests of it, ~30 s)
        stage fbank-tests 180 python3 -m pytest -q tests/test_fbank_kernel.py -rs ;;
    fbank-bench)  # the device stage's filterbank alone by backend (Triton IEEE, Triton tf32x3,
        # cuFFT), batches of 16, 64 and 256 ten-second clips: the largest of the stage's kernels,
        # run beside the step in DALI-fed training (its own 64 clips, ~10 s to render)
        stage fbank-bench 180 python3 -m bench.fbank --batch-sizes 16 64 256 \
            --results-dir "$RESULTS" ;;
    e2e-b64-fbank)  # e2e-b64 with the filterbank backend $FBANK (default triton-tf32x3)
        # against e2e-b64's default ("auto": cuFFT for 64 ten-second clips, fbank-h200.json)
        e2e_b64 e2e-b64-fbank --fbank-backend "${FBANK:-triton-tf32x3}" ;;
    e2e-b64-levers)  # e2e-b64 with the step's measured levers, our Triton GELU and split q/k/v
        # (the step alone: MFU 44.4 % at batch 128, 45.5 % at 256 on an H200): does DALI-fed
        # training keep >= 95 % of this faster step, and how near 10x the paper-style loader?
        e2e_b64 e2e-b64-levers --gelu triton --qkv split ;;
    e2e-b16)  # the pretraining presets' step: the paper's batch 16 a GPU, bf16 (not -master),
        # compiled, torch's GELU and packed q/k/v; e2e-b64's set and pinning, 3 + 40 batches,
        # both streams (~3 minutes). With e2e-b16-levers: do the levers and the high-priority
        # stream that met the targets at batch 256 help at the presets' batch too?
        e2e_b64 e2e-b16 --full-batch-size 16 --precision bf16 --steps 40 ;;
    e2e-b16-levers)  # e2e-b16 with our Triton GELU and split q/k/v
        e2e_b64 e2e-b16-levers --full-batch-size 16 --precision bf16 --steps 40 --gelu triton \
            --qkv split ;;
    e2e-b256-levers)  # e2e-b64-levers at batch 256, where the step is fastest (564 samples/s,
        # MFU 45.5 %): 6 timed steps (~2.7 s of steps, as e2e-b64's 20) after 2 untimed ones
        # (~4 minutes: three compilations at batch 256, the paper-style loader's 2048 samples)
        e2e_b256 e2e-b256-levers --gelu triton --qkv split ;;
    float8-tests)  # kernels/float8.py on the GPU: torch._scaled_mm's float8 GEMMs (forward and
        # both gradients) against the CPU's, compiled too (and the CPU tests, ~10 s)
        stage float8-tests 180 python3 -m pytest -q tests/test_float8.py -rs ;;
    step-float8)  # model.linear=float8 (every GEMM of the towers' linears on float8 operands,
        # twice bf16's tensor-core rate; changes the numbers) with our GELU and split q/k/v,
        # batch 128, against `step-qkv-split` (232.5 ms on the 2026-11-27 H200)
        fixed_step step-float8 300 --precision bf16-master --batch-size 128 --gelu triton \
            --qkv split --linear float8 ;;
    step-float8-256)  # the same at batch 256 (an H200's memory), against `step-qkv-split-256`
        fixed_step step-float8-256 360 --precision bf16-master --batch-size 256 --gelu triton \
            --qkv split --linear float8 ;;
    e2e-b256-float8)  # e2e-b256-levers with float8 linears (needs bench-data-b256's set), on
        # the high-priority stream only (96.2 % of step-only there on 2026-11-27, 90.2 % on
        # torch's; ~4.5 minutes). Its first run failed to compile: split q/k/v's bias chunks in
        # _scaled_mm's epilogue, now added after the GEMM (kernels/float8.py)
        e2e_b256 e2e-b256-float8 --gelu triton --qkv split --linear float8 \
            --step-stream high-priority ;;
    stream-tests)  # train.step_stream on the GPU: the stream's priority and ordering, and
        # training on it equals training on torch's stream (the loader's thread hands over)
        stage stream-tests 180 python3 -m pytest -q tests/test_step_stream.py -rs ;;
    gelu-tests)  # kernels/gelu.py on the GPU (fast exp2 and division) and on the interpreter
        stage gelu-tests 180 python3 -m pytest -q tests/test_gelu.py -rs ;;
    step-gelu)  # the towers' GELU as our Triton kernels (model.gelu=triton, kernels/gelu.py:
        # 34 / 40 instructions per element against inductor's 44 / 56), bf16-master, compiled,
        # batch 128, against `step-master` (~75 s on an H200)
        fixed_step step-gelu 300 --precision bf16-master --batch-size 128 --gelu triton ;;
    step-gelu-bias)  # model.gelu=triton-bias: our GELU with fc1's bias add in the forward kernel
        # and its gradient summed in the backward kernel (inductor sums it in a second pass over
        # the 65k x 3072 gradient of each batch-128 audio block), against `step-gelu`
        fixed_step step-gelu-bias 300 --precision bf16-master --batch-size 128 \
            --gelu triton-bias ;;
    step-gelu-bias-256)  # the same at batch 256 (an H200's memory), against `step-gelu-256`
        fixed_step step-gelu-bias-256 360 --precision bf16-master --batch-size 256 \
            --gelu triton-bias ;;
    step-gelu-256)  # the same at batch 256 (an H200's memory), against `step-master-256`
        fixed_step step-gelu-256 360 --precision bf16-master --batch-size 256 --gelu triton ;;
    qkv-tests)  # model.qkv=split on the GPU: compiled, no kernel stacking attention's
        # gradients, the same values as timm's attention (and the CPU tests of it, ~20 s)
        stage qkv-tests 180 python3 -m pytest -q tests/test_model.py -k split -rs ;;
    step-qkv-split)  # model.qkv=split (q, k, v as three GEMMs: no copy of attention's
        # gradients into one (B, N, 3, H, D) gradient, 5.4 ms of `profile-step-master`) with our
        # Triton GELU, bf16-master, compiled, batch 128, against `step-gelu`
        fixed_step step-qkv-split 300 --precision bf16-master --batch-size 128 \
            --gelu triton --qkv split ;;
    step-qkv-split-256)  # the same at batch 256 (an H200's memory), against `step-gelu-256`
        fixed_step step-qkv-split-256 360 --precision bf16-master --batch-size 256 \
            --gelu triton --qkv split ;;
    step-bias-split)  # both: model.gelu=triton-bias and model.qkv=split, batch 128, against
        # `step-gelu`, `step-gelu-bias` and `step-qkv-split`
        fixed_step step-bias-split 300 --precision bf16-master --batch-size 128 \
            --gelu triton-bias --qkv split ;;
    step-bias-split-256)  # the same at batch 256 (an H200's memory), against `step-gelu-256`
        fixed_step step-bias-split-256 360 --precision bf16-master --batch-size 256 \
            --gelu triton-bias --qkv split ;;
    step-autotune-master)  # Triton GEMM templates with fused epilogues (max-autotune without
        # CUDA graphs), bf16-master, batch 128: > 200 s of autotuning, so a call of its own
        fixed_step step-autotune-master 560 --precision bf16-master --batch-size 128 \
            --compile-mode max-autotune-no-cudagraphs ;;
    pack)  # the tool brings back at most 8 files: one archive of every result so far (the
        # results stay outside $OUT, so packing after each stage keeps what a later stage that
        # runs past the call's limit would lose)
        tar czf "$OUT/results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" ;;
    e2e-fast-pretrain)
        stage e2e-fast-pretrain 420 python3 -m bench.end_to_end --mode pretrain --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --compile \
            --results-dir "$RESULTS/fast" ;;
    e2e-fast)  # the configuration the presets now use: source workers, compiled step
        stage e2e-fast 540 python3 -m bench.end_to_end --mode pretrain,finetune --size full \
            --data "$DATA" --cores "$CORES" --py-workers 2 --compile \
            --results-dir "$RESULTS/fast" ;;
    scaling)
        stage scaling 300 python3 -m bench.scaling --procs 1 --backend nccl --device cuda \
            --data "$DATA" --threads "$CORES" --results-dir "$RESULTS" ;;
    demo)
        stage demo 540 python3 -m equiav.demo --config configs/demo.yaml
        cp runs/demo/demo_summary.json "$OUT/" ;;
    *) echo "unknown stage $s" | tee -a "$LOG" ;;
    esac
done
