"""A step on core 0 beside a neighbour engine on core 1 that (a) decodes a batch of 32 non-stop
(what `hwloop.terms beside` uses), (b) prefills 256-token prompts non-stop, (c) runs mixed steps
(its batch of 32 decoding while admitting a 128-token prompt each step). Rounds alternate."""
import tempfile
import threading
from pathlib import Path

from hwloop.engine import prompt_lengths
from hwloop.terms import Pair, measure_beside
from policies.specs import ModelSpec

spec = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
work = Path(tempfile.mkdtemp(prefix="beside-kind-"))


class Busy:
    def __init__(self, fn):
        self.fn, self.on, self._stop = fn, threading.Event(), threading.Event()
        self.pair = other
        self._t = threading.Thread(target=self._work, daemon=True)

    def _work(self):
        while not self._stop.is_set():
            if self.on.wait(0.01):
                self.fn()

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._t.join()


with Pair(spec, (0,), work / "me", 4, 64, 240, workers=1) as me, \
        Pair(spec, (1,), work / "other", 32, 64, 240, workers=1) as other:
    me.step(0)
    other.step(0)
    longest = spec.max_context - 2
    kinds = {
        "decode32": lambda: other.step(0),
        "prefill256": lambda: other.prefill(0, prompt_lengths(256, longest)),
        "mixed32+128": lambda: other.mixed(0, prompt_lengths(128, longest)),
    }
    for r in range(2):
        for name in (kinds if r % 2 == 0 else reversed(list(kinds))):
            with Busy(kinds[name]) as busy:
                res = measure_beside(me, busy, 15)
            print(r, name, "  ".join(f"{x['kind']}{x['tokens']}: {x['alone_ms']:.2f}->{x['beside_ms']:.2f} x{x['factor']:.3f}"
                                    for x in res["sizes"]), flush=True)
