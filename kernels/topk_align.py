"""Triton kernels of `simcrop::topk_align`: similarity-driven top-K patch selection and pooling per sentence.

Semantics: simcrop.ops.reference.topk_align. Launch code, validation and autograd: simcrop/ops/topk_align.py.

Forward, one program per (batch b, block of BLOCK_M sentences j):
    sim[j, i] = <s_j, v_i> / (max(|s_j|, eps) max(|v_i|, eps))               fp32, i = 0..N-1 tiled by BLOCK_N
    key[j, i] = ord32(sim[j, i]) * 2^32 + (N_PAD - 1 - i)                    int64, unique within a row
      ord32 maps fp32 to int32 with the same order (-0.0 folded onto +0.0), so "larger key" is exactly the
      stable descending sort of the reference: larger sim first, equal sims by the LOWER patch index.
    for r < k_j:  best = max_i key[j, i]                                     one register max-reduction per rank
                  idx[j, r] = N_PAD - 1 - low32(best),  sim[j, r] = ord32^-1(high32(best))
                  key[j, idx[j, r]] = -inf                                   (take it out)
    a[j] = (1 / k_j) sum_{r < k_j} v[idx[j, r]]                              gather, fp32 accumulation
  The [M, N] similarity matrix only ever exists as a [BLOCK_M, N_PAD] register tile, never in global memory.
  Selecting by repeated arg-max over unique keys gives the selection AND its rank order at once; a threshold
  search (count >= t, then ties by index) would cost about as many reductions and still need a sort for the order.

Backward (a -> v only; the selection is not differentiated), one program per (b, block of BLOCK_N patches i):
    k_j = #{r : idx[j, r] >= 0},   W[i, j] = #{r : idx[j, r] == i} / k_j
    dv[i] = sum_j W[i, j] da[j]                                              [BLOCK_N, M_PAD] x [M_PAD, BLOCK_D]
  Deterministic (no atomics); rows that no sentence selected get exact zeros.
"""
import triton
import triton.language as tl

KEY_NONE: tl.constexpr = tl.constexpr(-(2**63))  # int64 minimum: "no patch here" (padding, or already taken)


@triton.jit
def _ordered_int32(x):
    """fp32 [...] -> int32 [...] with the same order for every non-NaN x (-0.0 maps to the key of +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse the magnitude order


@triton.jit
def _float_of_ordered(key):
    """Inverse of _ordered_int32: int32 [...] -> fp32 [...]."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def topk_align_fwd_kernel(
    v_ptr, s_ptr, mask_ptr, kps_ptr,  # v [B, N, D], s [B, M, D], sent_mask [B, M] (u8), k_per_sentence [B, M]
    a_ptr, idx_ptr, sim_ptr,  # out: a [B, M, D] (contiguous), idx [B, M, K] int64, sim [B, M, K] fp32
    N, M, D, K, eps,
    stride_vb, stride_vn, stride_vd,
    stride_sb, stride_sm, stride_sd,
    stride_mb, stride_mm,
    stride_kb, stride_km,
    HAS_KPS: tl.constexpr,  # k_per_sentence given (else every real sentence takes K)
    BLOCK_M: tl.constexpr,  # sentences per program
    BLOCK_N: tl.constexpr,  # patches per similarity tile
    N_TILES: tl.constexpr,  # N_PAD = N_TILES * BLOCK_N >= N patches held in registers
    BLOCK_D: tl.constexpr,  # feature chunk of the similarity dot products
    K_PAD: tl.constexpr,  # >= K, power of two
    POOL_D: tl.constexpr,  # feature chunk of the pooling gather
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    N_PAD: tl.constexpr = N_TILES * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] sentence ids
    m_ok = offs_m < M
    v_base = v_ptr + b * stride_vb
    s_base = s_ptr + b * stride_sb

    # k_j: patches to select per sentence (0 for padding sentences); K_max ranks are written either way
    real = tl.load(mask_ptr + b * stride_mb + offs_m * stride_mm, mask=m_ok, other=0) != 0  # [BLOCK_M]
    if HAS_KPS:
        k_j = tl.load(kps_ptr + b * stride_kb + offs_m * stride_km, mask=m_ok, other=0)
        k_j = tl.minimum(tl.maximum(k_j, 0), K).to(tl.int32)  # as the reference: rank < k_j and rank < K
    else:
        k_j = tl.zeros([BLOCK_M], tl.int32) + K
    k_j = tl.where(real, k_j, 0)  # [BLOCK_M]
    k_blk = tl.max(k_j, axis=0)  # a block of padding sentences skips all the work below

    # 1 / max(|s_j|, eps)
    s_sq = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        s_t = tl.load(
            s_base + offs_m[:, None] * stride_sm + offs_d[None, :] * stride_sd,
            mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
        s_sq += tl.sum(s_t * s_t, axis=1)
    inv_s = 1.0 / tl.maximum(tl.sqrt(s_sq), eps)  # [BLOCK_M]

    # keys of every (sentence, patch) pair, built tile by tile into registers: [BLOCK_M, N_TILES, BLOCK_N]
    tile_ids = tl.arange(0, N_TILES)
    keys = tl.full([BLOCK_M, N_TILES, BLOCK_N], KEY_NONE, tl.int64)
    n_tiles = tl.where(k_blk > 0, tl.cdiv(N, BLOCK_N), 0)
    for t in range(0, n_tiles):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] patch ids
        n_ok = offs_n < N
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # <s_j, v_i>
        v_sq = tl.zeros([BLOCK_N], tl.float32)  # |v_i|^2
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            v_t = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            s_t = tl.load(
                s_base + offs_m[:, None] * stride_sm + offs_d[None, :] * stride_sd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
            dots += tl.sum(s_t[:, None, :] * v_t[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
            v_sq += tl.sum(v_t * v_t, axis=1)
        inv_v = 1.0 / tl.maximum(tl.sqrt(v_sq), eps)  # [BLOCK_N]
        sim = dots * inv_s[:, None] * inv_v[None, :]  # [BLOCK_M, BLOCK_N] cosine
        key = (_ordered_int32(sim).to(tl.int64) << 32) | (N_PAD - 1 - offs_n).to(tl.int64)
        key = tl.where(n_ok[None, :], key, KEY_NONE)
        keys = tl.where((tile_ids == t)[None, :, None], key[:, None, :], keys)  # put tile t in place
    keys = tl.reshape(keys, [BLOCK_M, N_PAD])  # [BLOCK_M, N_PAD], patch i at column i

    # rank r = the r-th largest key: one max-reduction per rank, then that patch is taken out
    offs_k = tl.arange(0, K_PAD)
    idx = tl.full([BLOCK_M, K_PAD], -1, tl.int64)  # [BLOCK_M, K_PAD]
    sims = tl.zeros([BLOCK_M, K_PAD], tl.float32)
    for r in range(0, k_blk):
        best = tl.max(keys, axis=1)  # [BLOCK_M]
        best_i = ((N_PAD - 1) - best.to(tl.int32)).to(tl.int64)  # patch id (int64 -> int32 keeps the low word)
        best_sim = _float_of_ordered((best >> 32).to(tl.int32))
        put = (offs_k[None, :] == r) & (r < k_j)[:, None]  # [BLOCK_M, K_PAD]
        idx = tl.where(put, best_i[:, None], idx)
        sims = tl.where(put, best_sim[:, None], sims)
        keys = tl.where(keys == best[:, None], KEY_NONE, keys)
    out_mk = b * M * K + offs_m[:, None] * K + offs_k[None, :]  # [BLOCK_M, K_PAD] into [B, M, K]
    mk_ok = m_ok[:, None] & (offs_k < K)[None, :]
    tl.store(idx_ptr + out_mk, idx, mask=mk_ok)
    tl.store(sim_ptr + out_mk, sims, mask=mk_ok)

    # a_j = (1 / k_j) sum_r v[idx[j, r]]
    inv_k = tl.where(k_j > 0, 1.0 / tl.maximum(k_j, 1).to(tl.float32), 0.0)  # [BLOCK_M]
    taken = idx >= 0
    rows = tl.maximum(idx, 0)  # [BLOCK_M, K_PAD]
    for d0 in range(0, D, POOL_D):
        offs_d = d0 + tl.arange(0, POOL_D)
        d_ok = offs_d < D
        picked = tl.load(
            v_base + rows[:, :, None] * stride_vn + offs_d[None, None, :] * stride_vd,
            mask=taken[:, :, None] & d_ok[None, None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_M, K_PAD, POOL_D]
        a_t = tl.sum(picked, axis=1) * inv_k[:, None]  # [BLOCK_M, POOL_D]
        tl.store(
            a_ptr + b * M * D + offs_m[:, None] * D + offs_d[None, :],
            a_t.to(a_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def topk_align_bwd_kernel(
    ga_ptr, idx_ptr, gv_ptr,  # grad_a [B, M, D] (strided), idx [B, M, K] int64 (contiguous), out: grad_v [B, N, D]
    N, M, D, K,
    stride_gb, stride_gm, stride_gd,
    BLOCK_N: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,  # all >= 16 (tl.dot)
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] patch ids
    offs_m = tl.arange(0, M_PAD)  # [M_PAD] sentence ids
    m_ok = offs_m < M

    # W[i, j] = #{r : idx[j, r] == i} / k_j
    w = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    k_j = tl.zeros([M_PAD], tl.float32)
    for r in range(0, K):
        col = tl.load(idx_ptr + b * M * K + offs_m * K + r, mask=m_ok, other=-1)  # [M_PAD] = idx[b, :, r]
        k_j += (col >= 0).to(tl.float32)
        w += (col[None, :] == offs_n[:, None]).to(tl.float32)
    w = w / tl.maximum(k_j, 1.0)[None, :]

    # dv[i] = sum_j W[i, j] da[j]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        ga = tl.load(
            ga_ptr + b * stride_gb + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
            mask=m_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(tl.float32)  # [M_PAD, BLOCK_D]
        gv = tl.dot(w, ga, input_precision="ieee")  # [BLOCK_N, BLOCK_D]
        tl.store(
            gv_ptr + b * N * D + offs_n[:, None] * D + offs_d[None, :],
            gv.to(gv_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & d_ok[None, :],
        )
