#!/usr/bin/env bash
# One device call: probe, the CUDA split tests, then experiments.validate in split mode on GPU 0.
set -u
export PYTHONPATH=$PWD/.carry/site:$PWD PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
T0=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - T0 )) s"; }
stamp probe
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_mode --format=csv
command -v nvidia-cuda-mps-control || echo "no MPS control"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
python3 -c "import simpy, hydra, omegaconf, pandas, pyarrow, scipy, psutil; print('imports ok')"
nproc; free -g | head -2
stamp pytest
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_split_cuda.py 2>&1 | tee $OUT/pytest.log
if command -v nvidia-cuda-mps-control >/dev/null; then PART="gpu.partition=mps gpu.shares=[30,50,70,100]"; else PART="gpu.partition=none gpu.shares=[100]"; fi
M7='{name:l32-h4096-gqa8,num_layers:32,hidden_size:4096,num_heads:32,num_kv_heads:8,intermediate_size:14336,vocab_size:32000,max_context:512}'
run_validate() {
  stamp "validate $*"
  timeout ${VALIDATE_S:-400} python3 -m experiments.validate device=cuda mode=split "systems=${SYSTEMS:-[muxserve]}" \
    "shapes=[$M7]" split_pool_mib=16384 cluster.gpu.name=H200 cluster.gpu.memory_bytes=150000000000 profile.batches=[1,4,16,64,128] profile.seq_lens=[16,64,128,256] \
    profile.dir=/tmp/profiles profile.recheck=ends report.progress=false load.repeats=${REPEATS:-2} \
    workload.duration_s=${DURATION:-8} hydra.run.dir=/tmp/val "$@" 2>&1 | tee $OUT/validate.log
  return ${PIPESTATUS[0]}
}
S=$(date +%s)
run_validate $PART; rc=$?
if [ $rc -ne 0 ] && [ $(( $(date +%s) - S )) -lt 90 ] && [[ $PART == *mps* ]]; then
  echo "validate with MPS failed fast (rc $rc): again without a partition"
  mv $OUT/validate.log $OUT/validate_mps.log; rm -rf /tmp/val
  run_validate gpu.partition=none gpu.shares=[100]; rc=$?
fi
stamp "validate rc=$rc"
nvidia-smi --query-gpu=memory.used --format=csv
tar czf $OUT/val.tgz -C /tmp val profiles 2>/dev/null
ls -la $OUT
stamp done
