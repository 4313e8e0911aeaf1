#!/usr/bin/env bash
# Every GPU check of the project, prepared for a session that has a device machine (15 min of device time,
# 10 min per command): run it as two calls so each stays under 10 minutes (the timeouts below are caps),
#
#   CHECKS="tests ncmi aggregators natural" bench/gpu_checks.sh    # <= 7.5 min
#   CHECKS="training extract" bench/gpu_checks.sh                  # <= 4.5 min
#   CHECKS="fitplain milbench" bench/gpu_checks.sh                 # <= 9 min
#   CHECKS="readcpu multigpu" bench/gpu_checks.sh                  # <= 6 min
#   CHECKS="milfull" bench/gpu_checks.sh                           # <= 10 min (issue #23, --full)
#   CHECKS="gpudecode" bench/gpu_checks.sh                         # <= 7 min (--jpeg-decode device, nvJPEG)
#
# from the repository root. Results land in ${OUT:-bench/out/gpu}/ as text files, to be copied into
# bench/results/*.md with the date and the card.
#
# The machine needs torch, timm, lightning, h5py, scikit-learn, pandas, tifffile, matplotlib (the lent machines
# have them) plus openslide-python, openslide-bin, jsonargparse, imagecodecs, opencv-python-headless,
# safetensors: put their wheels in .whl/ and set WHEELS=.whl (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
CHECKS=${CHECKS:-"tests ncmi aggregators training natural extract readcpu multigpu"}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  case " $CHECKS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*" | tee "$OUT_DIR/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT_DIR/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT_DIR/$name.txt"
}

# GPU-marked tests: bf16 autocast and torch.compile of every aggregator, plus the CUDA paths of the core.
run tests 150 "$PY" -m pytest -q -m gpu tests/test_models_contract.py -p no:cacheprovider
# NCMI loss vs a linear CE head (goal at (1024, 1000, 2048): <= 5x the CE time, ~100 MB extra).
run ncmi 60 "$PY" bench/ncmi_loss.py --device cuda --repeats 30
# Aggregators: bags/s and peak memory at N = 1k, 10k, 50k, inference at 100k (ABMIL >= 2,000 bags/s at 10k).
run aggregators 150 "$PY" bench/aggregators.py --device cuda --n 1000 10000 50000 --infer-n 100000 \
    --repeats 5 --warmup 2 --out "$OUT_DIR/aggregators.md"
# Training epochs CE vs NCMI per aggregator (goal NCMI/CE <= 1.05); 60 bags keeps it inside the budget.
run training 120 "$PY" bench/training.py --bags 60 --instances 8000 --dim 1024 --epochs 1
# wsi-ncmi fit (bags cached on the GPU, data.cache auto) vs a plain loop, N = 10k, 400 bags, bf16 (#14: fit / plain
# >= 1.0, ABMIL >= 2,000 bags/s); 100 val bags, epochs 1 and 2 so start-up cancels.
run fitplain 240 "$PY" bench/training.py --fit --bags 400 --val-bags 100 --instances 10000 --dim 1024 \
    --models abmil --fit-epochs 1 2 --precision bf16-mixed
# CE vs NCMI on the witness benchmark (#13), short GPU confirmation of the CPU table.
run milbench 300 "$PY" bench/mil_benchmark.py --jobs 1 --families digits4 --draws 0 --seeds 0 1 2 --models abmil aem \
    --objectives ce ce_lr ncmi
# Issue #23 at paper scale (scale 1: bags of thousands of tiles, 50 epochs) on one tuning draw of the two cohorts;
# far longer than one device call on CPU-sized leases: run it alone (CHECKS=milfull), with a lease of its own.
run milfull 580 "$PY" bench/mil_benchmark.py --full --jobs 1 --families c17 bracs:3class --draws 0 --seeds 0 \
    --models abmil --objectives ce ncmi
# ResNet-50 bs256 224² bf16 step: CE vs NCMI vs focal vs SupCon (goal NCMI/CE <= 1.02).
run natural 90 "$PY" bench/natural_step.py --device cuda --repeats 10
# Preprocessing pipeline vs the bare-encoder ceiling (goals: >= 85% ViT-B/L, >= 70% resnet50_trunc).
run extract 150 "$PY" bench/extract.py --device cuda --precision bf16 --workers 12 --tiles 6000 \
    --encoders resnet50_trunc vit_base_patch16_224 vit_large_patch16_224
# Read+tissue on the GPU node's CPUs (#26): --read-path fast vs exact at 0.25 -> 0.5 µm/px, 15 workers, 3 repeats,
# tiles/s and tiles per CPU second (goal >= 1,000 per busy core with the fast path).
run readcpu 150 "$PY" bench/extract.py --device cpu --encoders --tiles 12000 --tiles-per-slide 1500 --workers 15 \
    --batch-size 256 --read-path both --repeats 3
# --devices (#26): the pipeline on GPU 0 alone, then on every GPU (one encoder process each, workers split):
# tiles/s per GPU, GPU busy share (nvidia-smi utilization.gpu sampled every 0.5 s), same bags as one GPU.
run multigpu 200 "$PY" bench/multi_gpu.py --runs 0 all --workers 15 --encoder vit_base_patch16_224 \
    --tiles 20000 --tiles-per-slide 1250 --batch-size 256 --precision bf16
# --jpeg-decode device (#26): JPEG tiles decoded by nvJPEG in the encoder process. The GPU tests (nvJPEG vs
# libjpeg-turbo pixels on YCbCr and RGB slides: the Adobe RGB marker; CUDA bags vs the CPU decode, printed with -s),
# then read+tissue and the ViT-B pipeline with --jpeg-decode cpu vs device (tiles/s, tiles per busy core of main +
# workers and of the workers alone), then nvJPEG's pixel / feature change against the exact path (real CMU SVS too).
run gpudecode 420 bash -c "$PY -m pytest -q -s -m gpu tests/test_preprocessing_devicedecode.py -p no:cacheprovider; \
    $PY bench/extract.py --device cuda --precision bf16 --encoders vit_base_patch16_224 --tiles 12000 \
    --tiles-per-slide 1500 --workers 15 --batch-size 256 --read-path fast --jpeg-decode both --repeats 3; \
    $PY bench/read_path_diff.py --device cuda --tiles 64"
echo "results in $OUT_DIR"
