"""A decode step's attention for one new query row in one Triton kernel split over the keys (flash-decoding).

The step's attention in torch (:func:`capture.decode_attention`) is three products and a softmax, each run over
few rows: a CT's full layers have one row of 22,500 keys per head, and the softmax and the values' product then
run on a handful of the card's 132 multiprocessors (run CR, an H100: 0.62 ms of a CT's 4.36 ms step against
0.25 ms for a film's, where reading a CT's keys and values once takes about 0.15 ms). Here each program takes one
chunk of one KV head's keys and both of its query heads (grouped-query attention reads each key once), so the
card's multiprocessors all read; it writes the chunk's running maximum, sum and weighted values, and torch
combines the chunks (a few kernels over (batch, heads, chunks) numbers).

The scores are those of the torch path (the query scaled in its own dtype first, products accumulated in
float32, the mask's unseen keys -inf); with ``scores`` the kernel also writes them, so that a recorded layer's
rows are the same softmax that made its output (``exp(score - lse)``): they differ from torch's by the order of
the scores' sums only. The values are weighted by each chunk's weights before their normalisation, rounded to the
model's dtype (torch's path rounds the normalised ones), with float32 sums: the output is torch's to the model's
precision (the tests: within 8e-4 of its largest value in float16).

Measured on an H100 (run CZ, ``bench/decode_attention.py``): a CT's full layer 0.054 ms against the torch path's
0.067 (its keys and values read at 1.7 TB/s, half the card's rate), a sliding ring's the same, a film's layer slower
(0.012 against 0.0086), so it runs from 4,096 keys (a CT's full layers); the CT's decode 4.34 against 4.41-4.46 ms
a token. On by default since runs DB and DC (with the deepest voxels on the GPU: the readings shorter in every
round). Its keys a program make one wave on the card (:func:`chunk_for`; ``bench/decode_attention.py --chunks``).

Imported only where it runs (a GPU's decode step with :data:`capture.DECODE_KERNEL_FROM` set); Triton compiles
the kernel on its first call, a decoder's warm-up steps. ``TRITON_INTERPRET=1`` runs it on the CPU (the tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # keys a loop step
ROWS = 16  # the query heads of a KV head padded to the smallest product the tensor cores take
# launch options: compiled for sm_90a with 256-wide heads (Triton's ptxas -v, no GPU needed), eight warps of
# BLOCK_N 32 use 128 registers a thread, no spills: two programs a multiprocessor; four warps of 64 keys spilled
OPTIONS = {"num_warps": 8}


PROGRAMS_A_MULTIPROCESSOR = 2  # what OPTIONS' eight warps at 128 registers a thread leave room for


def chunk_for(length: int, heads: int = 4, multiprocessors: int | None = None) -> int:
    """Keys a program takes over ``length`` keys for ``heads`` (batch rows x KV heads). Over a long cache (more than
    4,096 keys: a CT's full layers) the fewest, a multiple of :data:`BLOCK_N`, with which the programs make one wave
    of two a multiprocessor on a card of ``multiprocessors`` (None: not known, 256). On an H100's 132 a CT's
    22,784 slots take 352 keys a program in 260 programs: its full layer 0.049 ms against 0.055 with 256 keys in
    356 programs (1.35 waves); at 11,008 and 4,352 slots (CTs of about 40 and 16 slices) the rule's 192 and 96 were
    also the fastest of five sizes (runs DE, DG). Over a sliding window's ring (about 1,100 keys) 64."""
    if length <= 4096:
        return 64
    if not multiprocessors:
        return 256
    per_head = max(1, PROGRAMS_A_MULTIPROCESSOR * multiprocessors // heads)
    return BLOCK_N * -(-length // (BLOCK_N * per_head))


def multiprocessors(device: torch.device) -> int | None:
    """The card's multiprocessors (a constant to ``torch.compile``); None off CUDA (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@triton.jit
def _partials(q_ptr, k_ptr, v_ptr, seen_ptr, m_ptr, l_ptr, acc_ptr, scores_ptr, length, kv_heads,
              GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SCORES: tl.constexpr):
    bk = tl.program_id(0).to(tl.int64)  # batch row * kv_heads + kv head
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    b = bk // kv_heads
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, D)
    heads = bk * GROUP + rows  # the query heads of this KV head, flat over (batch, heads)
    q = tl.load(q_ptr + heads[:, None] * D + dims[None, :], mask=rows[:, None] < GROUP, other=0.0)
    base = bk * length * D
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for n0 in range(0, CHUNK, BLOCK_N):
        keys = chunk * CHUNK + n0 + tl.arange(0, BLOCK_N)
        inside = keys < length
        k = tl.load(k_ptr + base + keys[:, None] * D + dims[None, :], mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))  # (ROWS, BLOCK_N), float32 sums of the model dtype's products
        ok = inside
        if MASKED:
            ok = ok & (tl.load(seen_ptr + b * length + keys, mask=inside, other=0) != 0)
        s = tl.where(ok[None, :], s, float("-inf"))
        if SCORES:
            tl.store(scores_ptr + heads[:, None] * length + keys[None, :], s,
                     mask=(rows[:, None] < GROUP) & inside[None, :])
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN from -inf - -inf
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(v_ptr + base + keys[:, None] * D + dims[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        m = m_new
    out = heads * chunks + chunk
    here = rows < GROUP
    tl.store(m_ptr + out, m, mask=here)
    tl.store(l_ptr + out, s_sum, mask=here)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc, mask=here[:, None])


def supported(query: torch.Tensor, key: torch.Tensor, attention_mask) -> bool:
    """The kernel takes this step: one query row, half-precision types (float32 would make tensor-core products
    of TF32), a power-of-two head size the tensor cores take, query heads a multiple of the KV heads, at most
    :data:`ROWS` a KV head, and no mask or a boolean one (the decode step's)."""
    b, h, m, d = query.shape
    kvh = key.shape[1]
    return (m == 1 and query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype
            and d >= 16 and d & (d - 1) == 0 and h % kvh == 0 and h // kvh <= ROWS
            and (attention_mask is None or attention_mask.dtype == torch.bool))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, scaling: float,
              scores: bool = False, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's output laid out as ``sdpa_attention_forward`` returns it (B, 1, H, D), and with ``scores`` its
    weights (B, H, 1, S) in float32 (the softmax that made the output; None without). ``query`` (B, H, 1, D),
    ``key`` and ``value`` (B, KVH, S, D) contiguous, ``attention_mask`` None or bool, broadcast as (B, 1, 1, S).
    ``chunk``: keys a program takes, a multiple of :data:`BLOCK_N` (:func:`chunk_for`'s for this card by default)."""
    b, h, _, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    group = h // kvh
    chunk = chunk or chunk_for(length, b * kvh, multiprocessors(query.device))
    chunks = triton.cdiv(length, chunk)
    q = (query * scaling).contiguous()  # rounded to the model's dtype first, as capture.scores_f32 does
    key, value = key.contiguous(), value.contiguous()
    f32 = dict(dtype=torch.float32, device=query.device)
    m = torch.empty(b, h, chunks, **f32)
    s_sum = torch.empty(b, h, chunks, **f32)
    acc = torch.empty(b, h, chunks, d, **f32)
    raw = torch.empty(b, h, length, **f32) if scores else m  # (a pointer the kernel does not use without)
    masked = attention_mask is not None
    # converted, not viewed as bytes: Inductor cannot lower a view of bool as uint8 (run CY: the compile failed)
    seen = attention_mask.expand(b, 1, 1, length).reshape(b, length).to(torch.uint8) if masked else m
    _partials[(b * kvh, chunks)](q, key, value, seen, m, s_sum, acc, raw, length, kvh, GROUP=group, ROWS=ROWS,
                                 D=d, CHUNK=chunk, BLOCK_N=BLOCK_N, MASKED=masked, SCORES=scores, **OPTIONS)
    top = m.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(m - top)  # (B, H, chunks): each chunk's share, 0 for a chunk with nothing seen
    total = (weight * s_sum).sum(-1)
    out = (weight[..., None] * acc).sum(-2) / total[..., None]
    weights = None
    if scores:
        lse = top + torch.log(total)[..., None]
        weights = torch.exp(raw - lse)[:, :, None, :]
    return out.to(value.dtype)[:, None], weights
