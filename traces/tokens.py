"""Token counts for text-only traces (ShareGPT, LMSYS), which ship words rather than token counts.

An exact count needs the served model's tokenizer, which is large and not always at hand, so an
approximate counter is the fallback. The Workload records which one was used (meta["tokenizer"]),
because lengths from the two are not interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from traces.schema import WorkloadError

# The usual rule of thumb for English text under BPE tokenizers (LLaMA, GPT): about 4 characters
# per token. It undercounts code and non-Latin scripts, so prefer a real tokenizer for those.
CHARS_PER_TOKEN = 4
APPROX_NAME = f"approx:chars/{CHARS_PER_TOKEN}"


@dataclass(frozen=True)
class TokenCounter:
    """A named function from texts to token counts; the name goes into Workload metadata."""

    name: str
    count: Callable[[Sequence[str]], np.ndarray]


def approx_count(texts: Sequence[str]) -> np.ndarray:
    """ceil(characters / 4): 0 only for empty text, so empty turns are still detectable."""
    chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return -(-chars // CHARS_PER_TOKEN)


def token_counter(tokenizer: str | None = None) -> TokenCounter:
    """A Hugging Face tokenizer (local path or cached name, never downloaded) or the approximation."""
    if tokenizer is None:
        return TokenCounter(APPROX_NAME, approx_count)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except ImportError:
        raise WorkloadError(
            f"tokenizer {tokenizer!r}: transformers is not installed (pip install 'muxsim[tokenize]')"
        ) from None
    except Exception as e:  # transformers raises OSError, ValueError, … for missing/broken files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkloadError(
            f"tokenizer {tokenizer!r}: cannot load it locally: not a tokenizer directory and not in the "
            f"Hugging Face cache ({reason})"
        ) from None

    def count(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, dtype=np.int64)
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    return TokenCounter(f"hf:{tokenizer}", count)
