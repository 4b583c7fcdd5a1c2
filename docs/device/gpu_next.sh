#!/usr/bin/env bash
# Prepared for the next GPU session (not run yet): the CUDA tests with the CPU reference, the
# new-shape cost, then the split validation on the GPU, which now reports the runs that finished
# when its `timeout` stops it. Carry `.carry` (pure-Python simpy, hydra-core, omegaconf, antlr4).
set -u
export PYTHONPATH=$PWD/.carry/site:$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - T0 )) s"; }
stamp pytest
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_split_cuda.py 2>&1 | tee $OUT/pytest.log | tail -15
stamp shapes
timeout 90 python3 docs/device/gpu_shapes.py cuda 2>&1 | tee $OUT/shapes.log | tail -6
stamp validate
M='{name:l32-h4096-gqa8,num_layers:32,hidden_size:4096,num_heads:32,num_kv_heads:8,intermediate_size:14336,vocab_size:32000,max_context:512}'
timeout ${VALIDATE_S:-300} python3 -m experiments.validate device=cuda mode=split systems=[muxserve] "shapes=[$M]" \
  split_pool_mib=16384 cluster.gpu.name=H200 cluster.gpu.memory_bytes=150000000000 \
  profile.batches=[1,4,16,64,128] profile.seq_lens=[16,64,128,256] profile.dir=/tmp/profiles profile.recheck=ends \
  report.progress=false load.repeats=1 workload.duration_s=8 hydra.run.dir=/tmp/val 2>&1 | tee $OUT/validate.log | tail -40
cp /tmp/val/validation.md /tmp/val/summary.csv $OUT/ 2>/dev/null
tar czf $OUT/val.tgz -C /tmp val profiles 2>/dev/null
stamp done
