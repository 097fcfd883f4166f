#!/usr/bin/env bash
# megassm under torchrun, one node or many. Arguments go to the trainer:
#   bash launch/torchrun.sh --config configs/mamba2-130m.toml [--section.key=value ...]
# The config is checked for the world size (NNODES x NPROC_PER_NODE) before any process starts, and a
# failure ends with the trainer's one line (python -m megassm.torchrun: torchrun without its traceback).
# Environment (defaults for one node):
#   NPROC_PER_NODE  processes per node (default: the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi lists, else 1)
#   NNODES                          number of nodes (1); the rendezvous numbers them itself
#   MASTER_ADDR, MASTER_PORT        the rendezvous host, one of the nodes, and port (29500); needed with
#                                   NNODES > 1. One node: 127.0.0.1 and a port the kernel picks as torchrun
#                                   binds it (as torchrun --standalone does): runs on one host never meet
#   RDZV_ID                         a job id shared by all nodes (megassm)
#   MAX_RESTARTS                    restart all processes this often after a failure (0); the
#                                   trainer resumes from the newest complete checkpoint (not
#                                   after a config, data or checkpoint mistake: exit code 2)
#   PYTHON                          the interpreter megassm is installed in (default: python on PATH where it
#                                   has megassm and torch, else this checkout's .venv, as launch/setup.sh makes it)
# Several nodes write one run: run.dir must be on a filesystem all of them see at the same path.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun's own default, without its four-line warning about it
for name in NPROC_PER_NODE NNODES MAX_RESTARTS MASTER_PORT; do
  minimum=$(case "${name}" in MAX_RESTARTS | MASTER_PORT) echo 0 ;; *) echo 1 ;; esac)
  if [ -n "${!name:-}" ] && ! { [[ "${!name}" =~ ^[0-9]+$ ]] && [ "${!name}" -ge "${minimum}" ]; }; then
    echo "launch/torchrun.sh: ${name}=${!name} must be a whole number of at least ${minimum}" >&2
    exit 2
  fi
done
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "launch/torchrun.sh: NNODES=${NNODES} needs MASTER_ADDR, the host name of one of the nodes, set alike on every node" >&2
  exit 2
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(tr ',' '\n' <<< "${CUDA_VISIBLE_DEVICES}" | grep -c .)
else
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
fi
checkout="$(cd "$(dirname "$0")/.." && pwd)"
has_megassm() {  # with torch: from the checkout's root any python finds its megassm folder
  "$1" -c "import importlib.util, sys; sys.exit(not all(importlib.util.find_spec(m) for m in ('megassm', 'torch')))" 2>/dev/null
}
python="${PYTHON:-$(command -v python || true)}"
if [ -z "${PYTHON:-}" ] && ! has_megassm "${python:-false}"; then
  python="${checkout}/.venv/bin/python"
fi
if ! has_megassm "${python}"; then
  echo "launch/torchrun.sh: ${python} has no megassm: activate the environment it is installed in (source .venv/bin/activate" \
       "after launch/quickstart.sh or launch/setup.sh) or set PYTHON=/path/to/its/python" >&2
  exit 2
fi
# How the trainer says to resume this run after a stop: this script, with the variables it read set as they were.
variables=""
for name in NPROC_PER_NODE NNODES MASTER_ADDR MASTER_PORT RDZV_ID MAX_RESTARTS PYTHON; do
  if [ -n "${!name:-}" ]; then variables+="${name}=$(printf %q "${!name}") "; fi
done
export MEGASSM_LAUNCH="${MEGASSM_LAUNCH:-${variables}bash launch/torchrun.sh}"
exec "${python}" -m megassm.torchrun \
  --nnodes "${NNODES:-1}" \
  --nproc-per-node "${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-$(( ${NNODES:-1} > 1 ? 29500 : 0 ))}" \
  --rdzv-id "${RDZV_ID:-megassm}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m megassm.train "$@"
