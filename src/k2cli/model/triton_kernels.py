"""The Triton kernels of `triton_attention.py` (read that module's docstring first).

Imported on first use only: `triton.jit` decides at decoration time whether a kernel is compiled
for the GPU or run by the interpreter (`TRITON_INTERPRET=1`), so importing the model must not
define them before a test has chosen.

Tiles: rows of BLOCK_M queries or BLOCK_N keys. The q/k width d is split into two column chunks
of power-of-two widths, BLOCK_D1 + BLOCK_D2 (MLA's 192 = 128 + 64: no padding to 256; a chunk's
columns past d are masked to zero), with HAS_D2 = False when one chunk covers d. Values are one
chunk of BLOCK_DV >= dv columns. All index arithmetic is per (batch, head) via the strides.
"""

import triton
import triton.language as tl


@triton.jit
def _load(ptr, rows, n_rows, stride, col0, width, BLOCK: tl.constexpr):
    """[len(rows), BLOCK] tile of columns col0 .. col0 + BLOCK; rows >= n_rows and columns >= width read 0."""
    cols = col0 + tl.arange(0, BLOCK)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=(rows[:, None] < n_rows) & (cols[None, :] < width),
                   other=0.0)


@triton.jit
def _store(ptr, rows, n_rows, stride, col0, width, value, BLOCK: tl.constexpr):
    cols = col0 + tl.arange(0, BLOCK)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < width))


@triton.jit
def fwd_kernel(Q, K, V, Out, Lse, BlockMax,
               sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
               H, T, S, d, dv, n_mblocks, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
               HAS_D2: tl.constexpr, BLOCK_DV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    q1 = _load(Q, rows, T, sqt, 0, d, BLOCK_D1).to(DOT)
    if HAS_D2:
        q2 = _load(Q, rows, T, sqt, BLOCK_D1, d, BLOCK_D2).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end = tl.minimum(S, offset + (pid_m + 1) * BLOCK_M)  # the last row sees keys 0 .. offset + last row
    for start in range(0, end, BLOCK_N):
        keys = start + cols
        s = tl.dot(q1, tl.trans(_load(K, keys, S, skt, 0, d, BLOCK_D1).to(DOT)), input_precision=PREC)  # [BM, BN]
        if HAS_D2:
            s += tl.dot(q2, tl.trans(_load(K, keys, S, skt, BLOCK_D1, d, BLOCK_D2).to(DOT)), input_precision=PREC)
        s = tl.where((keys[None, :] <= rows[:, None] + offset) & (keys[None, :] < S), s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in the first block
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V, keys, S, svt, 0, dv, BLOCK_DV).to(DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m_i = m_new
    _store(Out + b * sob + h * soh, rows, T, sot, 0, dv, acc / l_i[:, None], BLOCK_DV)
    tl.store(Lse + bh * T + rows, m_i + tl.log(l_i), mask=rows < T)
    # QK-Clip's statistic: the largest logit of this block's real rows (m_i is each row's max)
    tl.store(BlockMax + bh * n_mblocks + pid_m, tl.max(tl.where(rows < T, m_i, float("-inf")), 0))


@triton.jit
def bwd_kv_kernel(Q, K, V, DO, Lse, Delta, DK, DV,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                  H, T, S, d, dv, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
                  HAS_D2: tl.constexpr, BLOCK_DV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of one block of BLOCK_N keys: a pass over the query rows that see them.
    DK and DV share K's and V's strides (the wrapper makes the inputs contiguous)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_M)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DK += b * skb + h * skh
    DV += b * svb + h * svh
    k1 = _load(K, keys, S, skt, 0, d, BLOCK_D1).to(DOT)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
    if HAS_D2:
        k2 = _load(K, keys, S, skt, BLOCK_D1, d, BLOCK_D2).to(DOT)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    v = _load(V, keys, S, svt, 0, dv, BLOCK_DV).to(DOT)
    dvv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # the first query row that sees this block's first key: row + offset >= key
    lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for start in range(lo, T, BLOCK_M):
        rows = start + rr
        q1 = _load(Q, rows, T, sqt, 0, d, BLOCK_D1).to(DOT)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)  # [BM, BN]
        if HAS_D2:
            q2 = _load(Q, rows, T, sqt, BLOCK_D1, d, BLOCK_D2).to(DOT)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        do = _load(DO, rows, T, sdt, 0, dv, BLOCK_DV).to(DOT)
        lse = tl.load(Lse + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
        seen = (keys[None, :] <= rows[:, None] + offset) & (rows[:, None] < T) & (keys[None, :] < S)
        p = tl.where(seen, tl.exp(s * scale - lse[:, None]), 0.0)
        dvv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC)
        ds = (p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])).to(DOT)  # dS = p (dP - D)
        dk1 += tl.dot(tl.trans(ds), q1, input_precision=PREC)
        if HAS_D2:
            dk2 += tl.dot(tl.trans(ds), q2, input_precision=PREC)
    _store(DK, keys, S, skt, 0, d, dk1 * scale, BLOCK_D1)
    if HAS_D2:
        _store(DK, keys, S, skt, BLOCK_D1, d, dk2 * scale, BLOCK_D2)
    _store(DV, keys, S, svt, 0, dv, dvv, BLOCK_DV)


@triton.jit
def bwd_q_kernel(Q, K, V, DO, Lse, Delta, DQ,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                 H, T, S, d, dv, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
                 HAS_D2: tl.constexpr, BLOCK_DV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """dQ of one block of BLOCK_M query rows: a pass over the keys they see. DQ shares Q's strides."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    Q += b * sqb + h * sqh
    DQ += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    q1 = _load(Q, rows, T, sqt, 0, d, BLOCK_D1).to(DOT)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
    if HAS_D2:
        q2 = _load(Q, rows, T, sqt, BLOCK_D1, d, BLOCK_D2).to(DOT)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    do = _load(DO + b * sdb + h * sdh, rows, T, sdt, 0, dv, BLOCK_DV).to(DOT)
    lse = tl.load(Lse + bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
    end = tl.minimum(S, offset + (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        keys = start + cols
        k1 = _load(K, keys, S, skt, 0, d, BLOCK_D1).to(DOT)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        if HAS_D2:
            k2 = _load(K, keys, S, skt, BLOCK_D1, d, BLOCK_D2).to(DOT)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        seen = (keys[None, :] <= rows[:, None] + offset) & (rows[:, None] < T) & (keys[None, :] < S)
        p = tl.where(seen, tl.exp(s * scale - lse[:, None]), 0.0)
        v = _load(V, keys, S, svt, 0, dv, BLOCK_DV).to(DOT)
        ds = (p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])).to(DOT)
        dq1 += tl.dot(ds, k1, input_precision=PREC)
        if HAS_D2:
            dq2 += tl.dot(ds, k2, input_precision=PREC)
    _store(DQ, rows, T, sqt, 0, d, dq1 * scale, BLOCK_D1)
    if HAS_D2:
        _store(DQ, rows, T, sqt, BLOCK_D1, d, dq2 * scale, BLOCK_D2)
