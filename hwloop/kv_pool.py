"""One paged KV block pool per unit, shared by every LLM and both phases on it, and its block ids.

MuxServe's unified KV cache (§4.3): the LLMs colocated on a unit draw KV blocks from one pool, and
a prefill process hands a request's KV to the decode process by handing over block ids, not bytes.

- **Block**: `BLOCK_BYTES` bytes, the simulator's unit (`policies.placement`): K and V of one layer
  × one 128-wide KV head × `BLOCK_TOKENS` tokens in 16-bit. A model of another shape or dtype fills
  a block with `BLOCK_BYTES / (2 · BLOCK_TOKENS · dtype bytes)` elements of one layer's K and V per
  token (`PagedLayout`): one head of 128 in bf16, two heads of 64, half a head of 128 in fp32. So
  a request of any model holds `blocks_per_chunk(model)` blocks per 32 tokens, exactly what the
  simulator and the policies count, and LLMs of different shapes share one pool.
- **Storage** (`KVPool`), owned by the runner: on CPU an anonymous `memfd` mapped shared, which
  each worker maps too from the descriptor it inherits (`attach`), as a torch tensor
  (`torch.from_file(..., shared=True)`); it never has a name in /dev/shm, so nothing is left there
  whoever is killed, and the kernel frees it when the last process holding it exits. On NVIDIA the
  pool is one CUDA tensor whose IPC handle (`torch.multiprocessing`'s reduction) workers open.
- **Block ids** (`BlockAllocator`): a free list. It alone owns the count of free blocks.
  `BlockIdPool` puts it behind the unit ledger's KV API (`policies.ledger.BlockPool`): every block
  the ledger charges a request is an id from it, in the request's block table, so the blocks the
  bookkeeping counts (the simulator's, the policies') are the blocks the engines write.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from policies.ledger import BlockPool
from policies.placement import BLOCK_BYTES, BLOCK_TOKENS, blocks_per_chunk
from policies.specs import GiB, ModelSpec
from policies.view import Request

# A paged prefill's packed tokens are padded to a multiple of this
# (`hwloop.torch_engine.TorchEngine.prefill_paged`). On CPU each new row count of a matrix product builds its kernels first (oneDNN's JIT, and fresh
# pages for them and their buffers): a served trace meets a new prompt total nearly every step
# (252 of 324 prefills in a split run at 1.3x saturation), and those builds ran 1.4-2.4x the step
# while a decode worker faulted pages on the other core. Sixteen is the kernels' row block, so the
# padded shape is also the fast one.
PAD_TOKENS = 16


class PoolError(RuntimeError):
    """A pool that cannot be made (does not fit) or a model that cannot use it; one line."""


# ---- layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PagedLayout:
    """How one model's KV lies in pool blocks.

    A block, seen in the model's dtype, is [2 (K, V), BLOCK_TOKENS, width]: `width` elements of one
    layer's K (and V) per token. A layer's K of one token (kv_heads × head_dim elements) spans
    `slices` blocks, so a request holds `num_layers × slices` blocks per BLOCK_TOKENS tokens, its
    chunk, ordered [layer][slice] inside the chunk and chunk after chunk in its block table.
    """

    num_layers: int
    slices: int
    width: int
    dtype_bytes: int

    @property
    def chunk_blocks(self) -> int:
        return self.num_layers * self.slices

    @classmethod
    def of(cls, spec: ModelSpec, dtype_bytes: int, block_bytes: int = BLOCK_BYTES) -> PagedLayout:
        if dtype_bytes != spec.dtype_bytes:
            raise PoolError(f"{spec.name}: engine dtype has {dtype_bytes} bytes, the model spec (and the simulator's "
                            f"block count) {spec.dtype_bytes}")
        width, rest = divmod(block_bytes, 2 * BLOCK_TOKENS * dtype_bytes)
        per_layer = spec.num_kv_heads * spec.head_dim
        if rest or per_layer % width or (width % spec.head_dim and spec.head_dim % width):
            raise PoolError(f"{spec.name}: a layer's K per token ({spec.num_kv_heads} KV heads × {spec.head_dim}) "
                            f"is not a whole number of {width}-element block slices holding whole heads or whole parts "
                            f"of one; the pool cannot page it")
        layout = cls(spec.num_layers, per_layer // width, width, dtype_bytes)
        assert layout.chunk_blocks == blocks_per_chunk(spec), (layout, blocks_per_chunk(spec))
        return layout


# ---- block ids ------------------------------------------------------------------------------------


class BlockAllocator:
    """The unit's free block ids (nano-vllm's block manager, without prefix sharing).

    `can_allocate` / `allocate` / `deallocate` are the only way to change what is free, so the free
    count here is the pool's, and a double free or a foreign id is an error rather than a drift.
    """

    def __init__(self, num_blocks: int) -> None:
        self.total = num_blocks
        self._free: deque[int] = deque(range(num_blocks - 1, -1, -1))  # block 0 first
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """The most recently freed blocks first: their pages are mapped and likely in cache."""
        if not self.can_allocate(n):
            raise PoolError(f"asked for {n} KV blocks, {len(self._free)} of {self.total} free")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def deallocate(self, ids: Iterable[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise PoolError(f"block {i} freed but not allocated")
            self._used.remove(i)
            self._free.append(i)


# ---- storage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolHandle:
    """What a worker needs to map the pool: picklable, sent in its spec.

    CPU: `fd` is the memfd's number inside the worker (inherited through `pass_fds`). CUDA: `cuda`
    is the pool tensor pickled by torch.multiprocessing's reducer (a CUDA IPC handle).
    """

    num_blocks: int
    block_bytes: int
    device: str = "cpu"
    fd: int = -1
    cuda: bytes = b""

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes


def check_fits(nbytes: int, device: str, what: str = "KV pool") -> None:
    """One-line error when `nbytes` does not fit in available host (or GPU) memory."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        where = "GPU memory free"
    else:
        free = host_available_bytes()
        where = "host memory available"
    if nbytes > free:
        raise PoolError(f"{what} of {nbytes / GiB:.2f} GiB does not fit: {free / GiB:.2f} GiB {where}")


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what the kernel can give without swapping (Linux, as memfd is)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise PoolError("/proc/meminfo has no MemAvailable line: cannot check the pool fits in memory")


class KVPool:
    """The runner's end of one unit's pool: it creates the storage and is the only one to free it.

    On CPU it holds a memfd (no name anywhere in the file system); workers map the same pages from
    the descriptor they inherit. `close` drops the runner's descriptor; the pages go when the last
    worker mapping them is gone, whatever killed it.
    """

    def __init__(self, num_blocks: int, device: str = "cpu", block_bytes: int = BLOCK_BYTES,
                 reserve_bytes: int = 0) -> None:
        if num_blocks < 1:
            raise PoolError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_bytes, self.device = num_blocks, block_bytes, device
        check_fits(num_blocks * block_bytes + reserve_bytes, device,
                   f"KV pool of {num_blocks} blocks" + (" plus the engines' weights" if reserve_bytes else ""))
        self.fd = -1
        self._cuda: Any = None
        if device == "cuda":
            import torch

            self._cuda = torch.zeros(num_blocks, block_bytes, dtype=torch.uint8, device="cuda")
        else:
            self.fd = os.memfd_create("muxsim-kv-pool", 0)  # not close-on-exec flags: pass_fds decides
            os.ftruncate(self.fd, num_blocks * block_bytes)

    def handle(self, fd_in_worker: int | None = None) -> PoolHandle:
        if self.device == "cuda":
            return PoolHandle(self.num_blocks, self.block_bytes, "cuda", cuda=_reduce_cuda(self._cuda))
        return PoolHandle(self.num_blocks, self.block_bytes, "cpu", fd=self.fd if fd_in_worker is None else fd_in_worker)

    def tensor(self) -> Any:
        """The pool as a [blocks, block_bytes] uint8 tensor in this process (tests, inspection)."""
        return self._cuda if self._cuda is not None else attach(self.handle())

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the storage: equal in every process that maps the same pages."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._cuda = None

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(handle: PoolHandle) -> Any:
    """The pool as a [blocks, block_bytes] uint8 tensor over the shared storage (no copy)."""
    import torch

    if handle.device == "cuda":
        import torch.multiprocessing  # registers the CUDA IPC reductions

        return pickle.loads(handle.cuda)
    return torch.from_file(f"/proc/self/fd/{handle.fd}", shared=True, size=handle.nbytes,
                           dtype=torch.uint8).view(handle.num_blocks, handle.block_bytes)


def storage_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _reduce_cuda(tensor: Any) -> bytes:
    """Pickle a CUDA tensor as an IPC handle (torch.multiprocessing's reduction), not its bytes."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  registers the reductions with ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(tensor)
    return buf.getvalue()


class BlockIdPool(BlockPool):
    """The unit ledger's KV pool (`policies.ledger.BlockPool`) handing out block ids.

    The ledger asks it to `resize` a request whenever the blocks it holds change (admission, a
    decode step entering a new block, a preemption, a finish); here that grows or shrinks the
    request's block table from the free list (`BlockAllocator`), whose length is the pool's free
    count. So the blocks the ledger counts are the ids the engines write, and no second count exists.
    """

    def __init__(self, total: int, llms: Iterable[str]) -> None:  # no super().__init__: `free` is the free list's
        self.total = total
        self.ids = BlockAllocator(total)
        self.used = {name: 0 for name in llms}
        self.tables: dict[int, list[int]] = {}  # request id → its block ids, in table order

    @property  # type: ignore[override]
    def free(self) -> int:
        return self.ids.free

    def resize(self, r: Request, blocks: int) -> None:
        table = self.tables.pop(r.request_id, [])
        if len(table) != r.blocks:
            raise PoolError(f"request {r.request_id} holds {r.blocks} blocks but has {len(table)} ids")
        if blocks > len(table):
            try:
                table += self.ids.allocate(blocks - len(table))
            finally:
                if table:
                    self.tables[r.request_id] = table
        else:
            self.ids.deallocate(table[blocks:])
            del table[blocks:]
            if table:
                self.tables[r.request_id] = table
        self.used[r.llm] += blocks - r.blocks
        r.blocks = blocks

    def table(self, request_id: int) -> tuple[int, ...]:
        return tuple(self.tables.get(request_id, ()))
