"""Device diagnostic for the H200 prefill gap: a paged prefill at a token count this process never ran
against the same prefill repeated (the GPU counterpart of `hwloop.terms shapes`), one process."""
import sys
import time

import numpy as np

from hwloop.kv_pool import PAD_TOKENS
from hwloop.torch_engine import PagedStepEngine, TorchEngine
from policies.specs import ModelSpec

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
spec = (ModelSpec("l32-h4096-gqa8", 32, 4096, 32, 8, 14336, 32000, max_context=2048) if dev == "cuda"
        else ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=2048))
t = time.time()
step = PagedStepEngine(TorchEngine(spec, dtype="bfloat16", device=dev, seed=0))
print(f"built in {time.time() - t:.1f} s", flush=True)
for target in (64, 256, 1024):
    novel, cached = [], []
    for k in range(6):
        n = target + (k + 1) * PAD_TOKENS + 1  # a count (and a padded count) this process never ran
        novel.append(1e3 * step.prefill(1, n))
        cached.append(1e3 * step.prefill(1, n))
    diff = np.subtract(novel, cached)
    print(f"prefill of ~{target} tokens: novel {np.median(novel):7.1f} ms  cached {np.median(cached):7.1f} ms  "
          f"extra {np.median(diff):6.1f} ms (min {diff.min():.1f}, max {diff.max():.1f})", flush=True)
