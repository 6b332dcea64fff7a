// Tensor-core (mma.sync m16n8k16, sm_80+) tile loop for VarlenAttention and KVCacheAttention, fp16 / bf16,
// in the FlashAttention-2 shape: one block = kBQ = 64 query rows of one query head, 4 warps of 16 rows each;
// keys stream through shared memory in tiles of kBK = 64 (cp.async, double buffered); scores and the output
// accumulate in fp32; online softmax in fp32 in the exp2 domain (scale * log2 e). P is rounded to the input
// dtype for the P.V product (as FlashAttention-2 does); its normaliser l sums the fp32 P.
// Same contract as attentionTile (attentionCore.cuh) apart from kBQ; dispatch: common/attentionMma.h.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k16"); lane = 0..31, g = lane >> 2 (group), t = lane & 3 (thread in group); a
// register holding 2 x 16-bit keeps the lower column / k index in its low half:
//   A 16x16 (row-major, M x K), 4 regs: a0 = (row g,   k 2t..2t+1)   a1 = (row g+8, k 2t..2t+1)
//                                       a2 = (row g,   k 2t+8..2t+9) a3 = (row g+8, k 2t+8..2t+9)
//   B 16x8  (K x N, "col"),    2 regs: b0 = (k 2t..2t+1, col g)     b1 = (k 2t+8..2t+9, col g)
//   C 16x8  (fp32),            4 regs: c0, c1 = (row g, cols 2t, 2t+1)  c2, c3 = (row g+8, cols 2t, 2t+1)
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the 8 row addresses of matrix i; result reg i holds matrix i's
// (row lane>>2, cols 2(lane&3), +1) -- or with .trans its (rows 2(lane&3), +1; col lane>>2).
// Hence, with sQ/sK/sV row-major [row][dim] in shared memory:
//   Q (A of S = Q K^T): x4 at row 16w + (lane & 15), dim 16kk + 8(lane >> 4)       -> a0 a1 a2 a3.
//   K (B of S; B[k][n] = K[key n][dim k], i.e. K rows as stored): x4 at key 16jp + (lane & 7) + 8(lane >> 4),
//     dim 16kk + 8((lane >> 3) & 1) -> b0, b1 of key tile 2jp, then b0, b1 of key tile 2jp+1.
//   V (B of O = P V; B[k][n] = V[key k][dim n], transposed): x4.trans at key 16kk + (lane & 7)
//     + 8((lane >> 3) & 1), dim 16dp + 8(lane >> 4) -> b0, b1 of dim tile 2dp, then of dim tile 2dp+1.
//   P (A of O): the C fragments of key tiles 2kk, 2kk+1 are already A's layout: a0 = tile 2kk (c0, c1),
//     a1 = tile 2kk (c2, c3), a2 = tile 2kk+1 (c0, c1), a3 = tile 2kk+1 (c2, c3).
// Head dims: D % 8 == 0; shared memory pads D to kDP = roundup(D, 16) with zero columns (written once, never
// touched by the loads), so the K-dim of Q K^T and the output tiles run over kDP; columns >= D are not stored.
#pragma once

#include "common/cudaTypes.cuh"

#include <cstdint>
#include <math_constants.h>

namespace qwen_vl
{
namespace attn
{
namespace mma
{

constexpr int32_t kWARPS = 4;
constexpr int32_t kBQ = 16 * kWARPS; //!< query rows per block (16 per warp)
constexpr int32_t kBK = 64;          //!< keys per shared-memory tile
constexpr int32_t kTHREADS = 32 * kWARPS;

template <int32_t D>
struct Dims
{
    static_assert(D % 8 == 0 && D >= 16 && D <= 128, "MMA path head dim");
    static constexpr int32_t kDP = (D + 15) / 16 * 16; //!< padded head dim (MMA K granularity)
    static constexpr int32_t kLD = kDP + 8;            //!< shared row stride (+16 B: conflict-free ldmatrix rows)
    static constexpr int32_t kTILE = kBQ * kLD;        //!< elements of one 64-row tile (kBQ == kBK)
    static constexpr int32_t kCHUNKS = D / 8;          //!< 16-byte chunks per row in global memory
};
static_assert(kBQ == kBK, "Q and K/V tiles share one shared-memory tile shape");

//! Dynamic shared memory: K and V, double buffered (4 tiles of [64][kLD] elements); Q is staged in the
//! second V buffer before the loop starts (it lives in registers afterwards).
template <int32_t D>
constexpr size_t sharedBytes()
{
    return sizeof(uint16_t) * 4 * static_cast<size_t>(Dims<D>::kTILE);
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half>
{
    //! d += a * b for one m16n8k16 tile (fp16 inputs, fp32 accumulators).
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 const h = __floats2half2_rn(lo, hi); // .x (low half) = lo
        return *reinterpret_cast<uint32_t const*>(&h);
    }
};

template <>
struct MmaOp<__nv_bfloat16>
{
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 const h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t const*>(&h);
    }
};

__device__ __forceinline__ uint32_t smemAddr(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrixX4(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrixX4Trans(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

//! 16-byte global -> shared copy; valid == false zero-fills the destination and reads nothing (src-size 0).
__device__ __forceinline__ void cpAsync16(uint32_t dst, void const* src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cpAsyncCommit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int32_t N>
__device__ __forceinline__ void cpAsyncWait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

//! Stages rows [0, 64) of `src` (row j at src + j*stride, valid iff j < nValid) into the [64][kLD] tile at
//! `dst`; invalid rows become zeros and are never read. Columns >= D are left alone (zero padding).
template <typename T, int32_t D>
__device__ __forceinline__ void loadTile(T* dst, T const* src, int64_t stride, int32_t nValid)
{
    using Dm = Dims<D>;
    for (int32_t idx = threadIdx.x; idx < kBK * Dm::kCHUNKS; idx += kTHREADS)
    {
        int32_t const j = idx / Dm::kCHUNKS;
        int32_t const c = idx - j * Dm::kCHUNKS;
        bool const valid = j < nValid;
        T const* g = valid ? src + j * stride + c * 8 : src; // src itself is a valid address (no read when !valid)
        cpAsync16(smemAddr(dst + j * Dm::kLD + c * 8), g, valid);
    }
}

//! Per-warp key range summary of the warp's 16 rows: any-row bounds (skip a tile no row sees) and
//! all-row bounds (no masking needed inside them).
struct WarpRange
{
    int32_t anyLo; //!< min rowLo over rows with a non-empty range (INT32_MAX if none)
    int32_t anyHi; //!< max rowHi over rows with a non-empty range (0 if none)
    int32_t allLo; //!< max rowLo over all 16 rows (rows >= nRows count as empty)
    int32_t allHi; //!< min rowHi over all 16 rows
};

__device__ __forceinline__ WarpRange warpRange(int32_t lo, int32_t hi)
{
    bool const any = hi > lo;
    WarpRange w{any ? lo : INT32_MAX, any ? hi : 0, any ? lo : INT32_MAX, any ? hi : 0};
#pragma unroll
    for (int32_t s = 8; s > 0; s >>= 1) // lanes 0..15 hold the warp's rows; 16..31 mirror them
    {
        w.anyLo = min(w.anyLo, __shfl_xor_sync(0xffffffffu, w.anyLo, s));
        w.anyHi = max(w.anyHi, __shfl_xor_sync(0xffffffffu, w.anyHi, s));
        w.allLo = max(w.allLo, __shfl_xor_sync(0xffffffffu, w.allLo, s));
        w.allHi = min(w.allHi, __shfl_xor_sync(0xffffffffu, w.allHi, s));
    }
    return w;
}

//! Attention for the block's kBQ rows; arguments as attentionTile (attentionCore.cuh): q/o row r at
//! q + r*qStride (rows >= nRows neither read nor written), key j at k + j*kvStride, rowLo/rowHi (shared,
//! kBQ entries) the keys row r may see, [blockLo, blockHi) covering all of them, scaleLog2 = scale * log2 e.
//! Pointers and strides must be 16-byte aligned (launcher-checked). All kTHREADS threads must call it.
template <typename T, int32_t D>
__device__ void attentionTileMma(T const* __restrict__ q, int64_t qStride, T* __restrict__ o, int64_t oStride,
    int32_t nRows, T const* __restrict__ k, T const* __restrict__ v, int64_t kvStride, int32_t const* rowLo,
    int32_t const* rowHi, int32_t blockLo, int32_t blockHi, float scaleLog2, T* smem)
{
    using Dm = Dims<D>;
    constexpr int32_t kKSTEPS = Dm::kDP / 16; //!< k-steps of Q K^T
    constexpr int32_t kNT = Dm::kDP / 8;      //!< 8-column output tiles (padding columns computed, not stored)
    // Tiles: K buffers 0, 1 at smem + {0, 1} * kTILE, V buffers 0, 1 at smem + {2, 3} * kTILE.
    T* const sQ = smem + 3 * Dm::kTILE; // V buffer 1, staging only: read into registers before the loop loads it
    int32_t const warp = threadIdx.x >> 5;
    int32_t const lane = threadIdx.x & 31;
    int32_t const g = lane >> 2;
    int32_t const t = lane & 3;

    if constexpr (Dm::kDP != D) // zero the padding columns of all four tiles once
    {
        for (int32_t idx = threadIdx.x; idx < 4 * kBK * (Dm::kDP - D); idx += kTHREADS)
        {
            int32_t const row = idx / (Dm::kDP - D); // row over the 4 stacked tiles
            int32_t const c = D + idx - row * (Dm::kDP - D);
            smem[row * Dm::kLD + c] = fromFloat<T>(0.f);
        }
    }
    loadTile<T, D>(sQ, q, qStride, nRows);
    if (blockLo < blockHi)
    {
        loadTile<T, D>(smem, k + blockLo * kvStride, kvStride, blockHi - blockLo);
        loadTile<T, D>(smem + 2 * Dm::kTILE, v + blockLo * kvStride, kvStride, blockHi - blockLo);
    }
    cpAsyncCommit();
    cpAsyncWait<0>();
    __syncthreads();

    uint32_t qFrag[kKSTEPS][4];
#pragma unroll
    for (int32_t kk = 0; kk < kKSTEPS; ++kk)
    {
        ldmatrixX4(qFrag[kk], smemAddr(sQ + (16 * warp + (lane & 15)) * Dm::kLD + 16 * kk + 8 * (lane >> 4)));
    }
    WarpRange const wr = warpRange(rowLo[16 * warp + (lane & 15)], rowHi[16 * warp + (lane & 15)]);
    int32_t const row0 = 16 * warp + g; // this thread's rows: row0 and row0 + 8
    int32_t const lo0 = rowLo[row0];
    int32_t const hi0 = rowHi[row0];
    int32_t const lo1 = rowLo[row0 + 8];
    int32_t const hi1 = rowHi[row0 + 8];
    __syncthreads(); // sQ (= V buffer 1) fully read before the loop loads into it

    float m[2] = {-CUDART_INF_F, -CUDART_INF_F}; // running max (log2 domain) of rows row0, row0 + 8
    float l[2] = {0.f, 0.f};                     // this thread's partial row sums (reduced over the group at the end)
    float acc[kNT][4];
#pragma unroll
    for (int32_t n = 0; n < kNT; ++n)
    {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    }

    int32_t buf = 0;
    for (int32_t kt = blockLo; kt < blockHi; kt += kBK, buf ^= 1)
    {
        if (kt + kBK < blockHi) // prefetch the next tile into the other buffer, then wait for this one
        {
            int32_t const next = kt + kBK;
            loadTile<T, D>(smem + (buf ^ 1) * Dm::kTILE, k + next * kvStride, kvStride, blockHi - next);
            loadTile<T, D>(smem + (2 + (buf ^ 1)) * Dm::kTILE, v + next * kvStride, kvStride, blockHi - next);
            cpAsyncCommit();
            cpAsyncWait<1>();
        }
        else
        {
            cpAsyncWait<0>();
        }
        __syncthreads();
        T const* const sK = smem + buf * Dm::kTILE;
        T const* const sV = smem + (2 + buf) * Dm::kTILE;

        bool const skip = kt >= wr.anyHi || kt + kBK <= wr.anyLo; // no row of this warp sees this tile
        if (!skip)
        {
            // S = Q K^T: s[n] is the C fragment of keys kt + 8n .. kt + 8n + 7.
            float s[kBK / 8][4];
#pragma unroll
            for (int32_t n = 0; n < kBK / 8; ++n)
            {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            }
#pragma unroll
            for (int32_t kk = 0; kk < kKSTEPS; ++kk)
            {
#pragma unroll
                for (int32_t jp = 0; jp < kBK / 16; ++jp)
                {
                    uint32_t b[4];
                    ldmatrixX4(b, smemAddr(sK + (16 * jp + (lane & 7) + 8 * (lane >> 4)) * Dm::kLD + 16 * kk
                                      + 8 * ((lane >> 3) & 1)));
                    MmaOp<T>::run(s[2 * jp], qFrag[kk], b[0], b[1]);
                    MmaOp<T>::run(s[2 * jp + 1], qFrag[kk], b[2], b[3]);
                }
            }

            // Scale into the log2 domain; mask keys a row may not see (warp-uniform test: whole tile visible).
            bool const full = kt >= wr.allLo && kt + kBK <= wr.allHi;
#pragma unroll
            for (int32_t n = 0; n < kBK / 8; ++n)
            {
#pragma unroll
                for (int32_t e = 0; e < 4; ++e)
                {
                    int32_t const key = kt + 8 * n + 2 * t + (e & 1);
                    bool const visible = e < 2 ? key >= lo0 && key < hi0 : key >= lo1 && key < hi1;
                    s[n][e] = full || visible ? s[n][e] * scaleLog2 : -CUDART_INF_F;
                }
            }

            // Online softmax per row (the 4 threads of a group share a row). mUse is finite: no (-inf) - (-inf).
            float alpha[2];
#pragma unroll
            for (int32_t r = 0; r < 2; ++r)
            {
                float mx = m[r];
#pragma unroll
                for (int32_t n = 0; n < kBK / 8; ++n)
                {
                    mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float const mUse = mx == -CUDART_INF_F ? 0.f : mx;
                alpha[r] = exp2f(m[r] - mUse);
                m[r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int32_t n = 0; n < kBK / 8; ++n)
                {
                    s[n][2 * r] = exp2f(s[n][2 * r] - mUse);
                    s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - mUse);
                    sum += s[n][2 * r] + s[n][2 * r + 1];
                }
                l[r] = l[r] * alpha[r] + sum;
            }
#pragma unroll
            for (int32_t n = 0; n < kNT; ++n)
            {
                acc[n][0] *= alpha[0];
                acc[n][1] *= alpha[0];
                acc[n][2] *= alpha[1];
                acc[n][3] *= alpha[1];
            }

            // O += P V, 16 keys per k-step; P's A fragment comes straight from the C fragments of S.
#pragma unroll
            for (int32_t kk = 0; kk < kBK / 16; ++kk)
            {
                uint32_t const p[4] = {MmaOp<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                    MmaOp<T>::pack(s[2 * kk][2], s[2 * kk][3]), MmaOp<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    MmaOp<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int32_t dp = 0; dp < kNT / 2; ++dp)
                {
                    uint32_t b[4];
                    ldmatrixX4Trans(b, smemAddr(sV + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * Dm::kLD
                                           + 16 * dp + 8 * (lane >> 4)));
                    MmaOp<T>::run(acc[2 * dp], p, b[0], b[1]);
                    MmaOp<T>::run(acc[2 * dp + 1], p, b[2], b[3]);
                }
            }
        }
        __syncthreads(); // this buffer fully read before the next iteration's prefetch overwrites it
    }

    // Normalise and store: thread holds rows row0 / row0 + 8, columns 8n + 2t, +1 (a 4-byte pair).
#pragma unroll
    for (int32_t r = 0; r < 2; ++r)
    {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        float const inv = sum > 0.f ? 1.f / sum : 0.f;
        int32_t const row = row0 + 8 * r;
        if (row < nRows)
        {
#pragma unroll
            for (int32_t n = 0; n < kNT; ++n)
            {
                int32_t const col = 8 * n + 2 * t;
                if (col < D)
                {
                    *reinterpret_cast<uint32_t*>(o + row * oStride + col)
                        = MmaOp<T>::pack(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
                }
            }
        }
    }
}

} // namespace mma
} // namespace attn
} // namespace qwen_vl
