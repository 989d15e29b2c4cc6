"""The Triton kernels of `triton_attention.py` (read that module's docstring first).

Imported on first use only: `triton.jit` decides at decoration time whether a kernel is compiled
for the GPU or run by the interpreter (`TRITON_INTERPRET=1`), so importing the model must not
define them before a test has chosen.
"""

import triton
import triton.language as tl


@triton.jit
def fwd_kernel(Q, K, V, Out, Lse, BlockMax,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                H, T, S, d, dv, n_mblocks, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd, ee = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    q = tl.load(Q + rows[:, None] * sqt + dd[None, :], mask=(rows[:, None] < T) & (dd[None, :] < d), other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end = tl.minimum(S, offset + (pid_m + 1) * BLOCK_M)  # the last row sees keys 0 .. offset + last row
    for start in range(0, end, BLOCK_N):
        keys = start + cols
        k = tl.load(K + keys[:, None] * skt + dd[None, :], mask=(keys[:, None] < S) & (dd[None, :] < d), other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BM, BN]
        s = tl.where((keys[None, :] <= rows[:, None] + offset) & (keys[None, :] < S), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in the first block
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + keys[:, None] * svt + ee[None, :], mask=(keys[:, None] < S) & (ee[None, :] < dv), other=0.0).to(DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None] * sot + ee[None, :], out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < T) & (ee[None, :] < dv))
    tl.store(Lse + bh * T + rows, m_i + tl.log(l_i), mask=rows < T)
    # QK-Clip's statistic: the largest logit of this block's real rows (m_i is each row's max)
    tl.store(BlockMax + bh * n_mblocks + pid_m, tl.max(tl.where(rows < T, m_i, float("-inf")), 0))

@triton.jit
def bwd_kv_kernel(Q, K, V, DO, Lse, Delta, DK, DV,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   H, T, S, d, dv, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of one block of BLOCK_N keys: a pass over the query rows that see them.
    Q/DQ, K/DK, V/DV share strides (the wrapper makes the gradients like their inputs)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_M)
    dd, ee = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    k_mask = (keys[:, None] < S) & (dd[None, :] < d)
    v_mask = (keys[:, None] < S) & (ee[None, :] < dv)
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skt + dd[None, :], mask=k_mask, other=0.0).to(DOT)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svt + ee[None, :], mask=v_mask, other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # the first query row that sees this block's first key: row + offset >= key
    lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for start in range(lo, T, BLOCK_M):
        rows = start + rr
        q = tl.load(Q + rows[:, None] * sqt + dd[None, :], mask=(rows[:, None] < T) & (dd[None, :] < d), other=0.0).to(DOT)
        do = tl.load(DO + rows[:, None] * sdt + ee[None, :], mask=(rows[:, None] < T) & (ee[None, :] < dv), other=0.0).to(DOT)
        lse = tl.load(Lse + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BM, BN]
        seen = (keys[None, :] <= rows[:, None] + offset) & (rows[:, None] < T) & (keys[None, :] < S)
        p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
        dvv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision=PREC)
    tl.store(DK + b * skb + h * skh + keys[:, None] * skt + dd[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + b * svb + h * svh + keys[:, None] * svt + ee[None, :], dvv.to(DV.dtype.element_ty), mask=v_mask)

@triton.jit
def bwd_q_kernel(Q, K, V, DO, Lse, Delta, DQ,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                  H, T, S, d, dv, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr):
    """dQ of one block of BLOCK_M query rows: a pass over the keys they see."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd, ee = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    K += b * skb + h * skh
    V += b * svb + h * svh
    q_mask = (rows[:, None] < T) & (dd[None, :] < d)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :], mask=q_mask, other=0.0).to(DOT)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + ee[None, :],
                 mask=(rows[:, None] < T) & (ee[None, :] < dv), other=0.0).to(DOT)
    lse = tl.load(Lse + bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(S, offset + (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        keys = start + cols
        k = tl.load(K + keys[:, None] * skt + dd[None, :], mask=(keys[:, None] < S) & (dd[None, :] < d), other=0.0).to(DOT)
        v = tl.load(V + keys[:, None] * svt + ee[None, :], mask=(keys[:, None] < S) & (ee[None, :] < dv), other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        seen = (keys[None, :] <= rows[:, None] + offset) & (rows[:, None] < T) & (keys[None, :] < S)
        p = tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
