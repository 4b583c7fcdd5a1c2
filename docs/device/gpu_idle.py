"""Device diagnostic: a paged prefill / decode step back to back against after an idle gap (one process)."""
import sys
import time

import torch

from hwloop.torch_engine import PagedStepEngine, TorchEngine
from policies.specs import ModelSpec

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
spec = (ModelSpec("l32-h4096-gqa8", 32, 4096, 32, 8, 14336, 32000, max_context=512) if dev == "cuda"
        else ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512))
t = time.time()
step = PagedStepEngine(TorchEngine(spec, dtype="bfloat16", device=dev, seed=0))
print(f"built in {time.time() - t:.1f} s", flush=True)


def clock() -> str:
    try:
        return f"{torch.cuda.clock_rate()} MHz"
    except Exception as e:
        return f"? ({type(e).__name__})"


for phase, cell in (("prefill", (1, 80)), ("prefill", (8, 128)), ("decode", (32, 128))):
    run = (lambda c=cell: step.prefill(*c)) if phase == "prefill" else (lambda c=cell: step.decode(c[0], c[1], 1)[0])
    for _ in range(3):
        run()
    for gap in (0.0, 0.02, 0.2, 1.0):
        ms = []
        for _ in range(6):
            time.sleep(gap)
            ms.append(1e3 * run())
        ms.sort()
        print(f"{phase} {cell} after {gap * 1e3:5.0f} ms idle: median {ms[3]:7.1f} ms  min {ms[0]:7.1f}  max {ms[-1]:7.1f}  clock {clock()}",
              flush=True)
