#!/usr/bin/env bash
# The main job on a fresh machine, CPU only: installs megassm into .venv, builds the built-in corpus
# (Python's standard library documentation, generated here: no download), trains a sentencepiece
# tokenizer on it, tokenizes it into data/builtin, and pretrains the tiny Mamba-2 of
# configs/debug.toml with tp=2 x cp=2 on 4 CPU processes under torchrun, with checkpoints, metrics
# and a plot. Extra arguments go to the trainer, e.g. --train.steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh ""  # no extras; sourced without arguments, setup.sh would read the trainer's

if [ ! -f data/builtin/meta.json ]; then
  python tools/make_corpus.py --out data/stdlib.jsonl
  python tools/train_tokenizer.py --input data/stdlib.jsonl --vocab-size 512 --out data/tokenizer
  python tools/prepare_data.py --input data/stdlib.jsonl --tokenizer data/tokenizer --out data/builtin --num-proc "$(nproc)" --val-fraction 0.02
fi

run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
NPROC_PER_NODE=4 OMP_NUM_THREADS=1 \
  bash launch/torchrun.sh --config configs/debug.toml --run.dir="$run_dir" "$@"
python tools/plot_metrics.py "$run_dir" --out "$run_dir/metrics.png"

echo
echo "metrics:     $run_dir/metrics.jsonl"
echo "checkpoint:  $(ls -d "$run_dir"/checkpoints/step_* | sort -V | tail -n 1)"
echo "plot:        $run_dir/metrics.png"
echo "config:      $run_dir/config.toml"
