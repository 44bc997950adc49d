"""Triton kernels of `simcrop::cross_granularity_attention`: flash attention of text queries over image tokens
plus the instance-level pooled image token (SimCroP fusion, steps 2-3).

Semantics: simcrop.ops.reference.cross_granularity_attention. Launch code and autograd: simcrop/ops/.
Per (b, h), with q [L, Dh], k, v [N, Dh], g [Dh], real[l] = q_mask[b, l], c = scale * log2(e):
    out[l] = real[l] * (sum_i p[l, i] v[i] + g),   p[l, i] = 2^(c q_l.k_i - lse[l]),  lse[l] = log2 sum_i 2^(c q_l.k_i)
Forward (one program per (block of BLOCK_L queries, b*h)): online softmax over key tiles of BLOCK_N,
    m' = max(m, max_i s_i),  l' = l 2^(m - m') + sum_i 2^(s_i - m'),  acc' = acc 2^(m - m') + P V;
    stores out and lse (base 2) [B, H, L]; the [L, N] scores never leave registers. A query block with no real
    query skips the key loop.
Backward (FlashAttention-2), with dO'[l] = real[l] dO[l] (padded queries give and get nothing):
    preprocess (one program per b*h):  delta[l] = sum_d dO'[l, d] (out[l, d] - g[d]),  dg = sum_l dO'[l]
    dk/dv (one program per (block of BLOCK_N keys, b*h), loop over query blocks):
        dv += P^T dO',  dS = P * (dO' V^T - delta),  dk += scale dS^T Q
    dq (one program per (block of BLOCK_L queries, b*h), loop over key blocks):  dq += scale dS K
UPCAST (a constexpr) casts the dot operands to fp32: the interpreter's bf16/fp16 tl.dot is wrong. fp32 operands use
input_precision="ieee" (no TF32), so fp32 results match the fp32 reference.
"""
import triton
import triton.language as tl


@triton.jit
def cga_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr,  # q [B, H, L, Dh], k, v [B, H, N, Dh], g [B, H, Dh], q_mask [B, L] (u8)
    out_ptr, lse_ptr,  # out [B, H, L, Dh], lse [B, H, L] fp32 (contiguous)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gd,
    stride_mb, stride_ml,
    H, L, N, Dh,
    qk_scale,  # scale * log2(e)
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] query ids
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    d_ok = offs_d < Dh
    real = tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_ok, other=0) != 0  # [BLOCK_L]
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=l_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_L, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_L], float("-inf"), tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros([BLOCK_L], tl.float32)  # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)  # running sum of 2^(s - m) v
    n_hi = tl.where(tl.max(real.to(tl.int32), axis=0) > 0, N, 0)
    for start in range(0, n_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key ids
        n_ok = offs_n < N
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :], other=0.0,
        )  # [BLOCK_D, BLOCK_N] = K^T tile
        vt = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [BLOCK_L, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # [BLOCK_L] rescales the old partial sums
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_L, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m_i = m_new

    g = tl.load(g_ptr + b * stride_gb + h * stride_gh + offs_d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None] + g[None, :]  # [BLOCK_L, BLOCK_D]
    out = tl.where(real[:, None], out, 0.0)  # padded queries: exact zeros
    row = (b * H + h) * L + offs_l  # [BLOCK_L] rows of [B*H*L]
    tl.store(out_ptr + row[:, None] * Dh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=l_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, tl.where(real, m_i + tl.log2(l_safe), 0.0), mask=l_ok)


@triton.jit
def cga_bwd_preprocess_kernel(
    out_ptr, do_ptr, g_ptr, mask_ptr,  # out [B, H, L, Dh] (contiguous), dO [B, H, L, Dh], g [B, H, Dh], q_mask
    delta_ptr, dg_ptr,  # out: delta [B, H, L] fp32, dg [B, H, Dh] (contiguous)
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gd,
    stride_mb, stride_ml,
    H, L, Dh,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    g = tl.load(g_ptr + b * stride_gb + h * stride_gh + offs_d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        real = tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_ok, other=0) != 0
        ld_ok = l_ok[:, None] & d_ok[None, :]
        o = tl.load(out_ptr + ((b * H + h) * L + offs_l[:, None]) * Dh + offs_d[None, :], mask=ld_ok,
                    other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_D]
        do = tl.load(do_ptr + b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                     mask=ld_ok, other=0.0).to(tl.float32)
        do = tl.where(real[:, None], do, 0.0)  # dO'
        delta = tl.sum((o - g[None, :]) * do, axis=1)  # [BLOCK_L] = rowsum(dO' * attention output)
        tl.store(delta_ptr + (b * H + h) * L + offs_l, delta, mask=l_ok)
        dg += tl.sum(do, axis=0)
    tl.store(dg_ptr + (b * H + h) * Dh + offs_d, dg.to(dg_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def cga_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,  # lse, delta [B, H, L] fp32 (contiguous)
    dk_ptr, dv_ptr,  # out: dk, dv [B, H, N, Dh] (contiguous)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_ml,
    H, L, N, Dh,
    qk_scale, sm_scale,  # scale * log2(e), scale
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key ids
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < Dh
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)  # [BLOCK_L] query ids
        l_ok = offs_l < L
        real = tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_ok, other=0) != 0
        if tl.max(real.to(tl.int32), axis=0) > 0:  # a block of padded queries contributes nothing
            qt = tl.load(q_base + offs_l[None, :] * stride_ql + offs_d[:, None] * stride_qd,
                         mask=d_ok[:, None] & l_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_L] = Q^T tile
            do = tl.load(do_base + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                         mask=l_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_L, BLOCK_D]
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            do = tl.where(real[:, None], do, 0.0).to(do.dtype)  # dO'
            l_rows = (b * H + h) * L + offs_l
            lse = tl.load(lse_ptr + l_rows, mask=l_ok, other=0.0)  # [BLOCK_L]
            delta = tl.load(delta_ptr + l_rows, mask=l_ok, other=0.0)
            s_t = tl.dot(k, qt, input_precision="ieee") * qk_scale  # [BLOCK_N, BLOCK_L] = S^T (base 2)
            p_t = tl.exp2(s_t - lse[None, :])
            p_t = tl.where(n_ok[:, None] & real[None, :], p_t, 0.0)  # P^T
            dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")  # [BLOCK_N, BLOCK_D]
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # [BLOCK_N, BLOCK_L] = (dO' V^T)^T
            ds_t = p_t * (dp_t - delta[None, :])  # dS^T
            dk += tl.dot(ds_t.to(qt.dtype), tl.trans(qt), input_precision="ieee")  # [BLOCK_N, BLOCK_D]
    dk = dk * sm_scale
    row = (b * H + h) * N + offs_n
    tl.store(dk_ptr + row[:, None] * Dh + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=nd_ok)
    tl.store(dv_ptr + row[:, None] * Dh + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=nd_ok)


@triton.jit
def cga_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr,  # out: dq [B, H, L, Dh] (contiguous)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_ml,
    H, L, N, Dh,
    qk_scale, sm_scale,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] query ids
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    d_ok = offs_d < Dh
    ld_ok = l_ok[:, None] & d_ok[None, :]
    real = tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_ok, other=0) != 0
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=ld_ok, other=0.0)  # [BLOCK_L, BLOCK_D]
    do = tl.load(do_ptr + b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                 mask=ld_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    do = tl.where(real[:, None], do, 0.0).to(do.dtype)  # dO'
    row = (b * H + h) * L + offs_l
    lse = tl.load(lse_ptr + row, mask=l_ok, other=0.0)  # [BLOCK_L]
    delta = tl.load(delta_ptr + row, mask=l_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    n_hi = tl.where(tl.max(real.to(tl.int32), axis=0) > 0, N, 0)
    for start in range(0, n_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=dn_ok, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=dn_ok, other=0.0)
        if UPCAST:  # [BLOCK_D, BLOCK_N] = K^T, V^T tiles
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [BLOCK_L, BLOCK_N] (base 2)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(real[:, None] & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision="ieee")  # [BLOCK_L, BLOCK_N] = dO' V^T
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")  # [BLOCK_L, BLOCK_D]
    dq = dq * sm_scale
    tl.store(dq_ptr + row[:, None] * Dh + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=ld_ok)
