// Shared flash-attention-style tile loop (online softmax, fp32 accumulation) used by VarlenAttention and
// KVCacheAttention. One block = kBQ query rows of one query head; each of the kWARPS warps owns kROWS rows.
// Keys stream through shared memory in tiles of kBK; each row r may use only keys in [rowLo[r], rowHi[r]).
#pragma once

#include "common/cudaTypes.cuh"
#include "common/kernelTypes.h"

#include <cstdint>
#include <math_constants.h>

namespace qwen_vl
{
namespace attn
{

constexpr int32_t kWARPS = 4;
constexpr int32_t kROWS = 4;                   //!< query rows per warp
constexpr int32_t kBQ = kWARPS * kROWS;        //!< query rows per block
constexpr int32_t kBK = 32;                    //!< keys per shared-memory tile (one per lane for the scores)
constexpr int32_t kTHREADS = kWARPS * 32;
constexpr int32_t kDPL = kMAX_HEAD_DIM / 32;   //!< output columns per lane (d = lane + 32 * c)
constexpr float kLOG2E = 1.4426950408889634f;

//! Dynamic shared memory for head dim D: Q tile [kBQ][D], K tile [kBK][D+1] (padded: lane j reads row j
//! without bank conflicts), V tile [kBK][D], all fp32.
inline size_t sharedBytes(int32_t headDim)
{
    return sizeof(float) * (static_cast<size_t>(kBQ) * headDim + static_cast<size_t>(kBK) * (headDim + 1)
                               + static_cast<size_t>(kBK) * headDim);
}

__device__ __forceinline__ float warpMax(float v)
{
#pragma unroll
    for (int32_t o = 16; o > 0; o >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int32_t o = 16; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

//! Attention for the block's rows. q/o: row r at q + r*qStride (its D contiguous values); rows >= nRows are
//! neither read nor written. k/v: key j at k + j*kvStride. rowLo/rowHi (shared, kBQ entries): the keys row r
//! may see; [blockLo, blockHi) must cover all of them. scaleLog2 = scale * log2(e) (softmax via exp2).
//! A row with no visible key writes zeros. Must be called by all kTHREADS threads of the block.
template <typename T>
__device__ void attentionTile(T const* __restrict__ q, int64_t qStride, T* __restrict__ o, int64_t oStride,
    int32_t nRows, T const* __restrict__ k, T const* __restrict__ v, int64_t kvStride, int32_t const* rowLo,
    int32_t const* rowHi, int32_t blockLo, int32_t blockHi, int32_t headDim, float scaleLog2, float* smem)
{
    int32_t const D = headDim;
    float* sQ = smem;                 // [kBQ][D]
    float* sK = sQ + kBQ * D;         // [kBK][D + 1]
    float* sV = sK + kBK * (D + 1);   // [kBK][D]
    int32_t const tid = threadIdx.x;
    int32_t const warp = tid >> 5;
    int32_t const lane = tid & 31;

    for (int32_t idx = tid; idx < kBQ * D; idx += kTHREADS)
    {
        int32_t const r = idx / D;
        int32_t const d = idx - r * D;
        sQ[idx] = r < nRows ? toFloat(q[r * qStride + d]) * scaleLog2 : 0.f;
    }

    float m[kROWS];
    float l[kROWS];
    float acc[kROWS][kDPL];
#pragma unroll
    for (int32_t r = 0; r < kROWS; ++r)
    {
        m[r] = -CUDART_INF_F;
        l[r] = 0.f;
#pragma unroll
        for (int32_t c = 0; c < kDPL; ++c)
        {
            acc[r][c] = 0.f;
        }
    }

    for (int32_t kt = blockLo; kt < blockHi; kt += kBK)
    {
        __syncthreads(); // previous tile fully consumed (and, on the first pass, sQ written)
        for (int32_t idx = tid; idx < kBK * D; idx += kTHREADS)
        {
            int32_t const j = idx / D;
            int32_t const d = idx - j * D;
            bool const inRange = kt + j < blockHi;
            int64_t const off = static_cast<int64_t>(kt + j) * kvStride + d;
            sK[j * (D + 1) + d] = inRange ? toFloat(k[off]) : 0.f;
            sV[j * D + d] = inRange ? toFloat(v[off]) : 0.f;
        }
        __syncthreads();

        // Scores: lane = key (kt + lane); kROWS rows share each K element read.
        float s[kROWS];
#pragma unroll
        for (int32_t r = 0; r < kROWS; ++r)
        {
            s[r] = 0.f;
        }
        float const* kRow = sK + lane * (D + 1);
        for (int32_t d = 0; d < D; ++d)
        {
            float const kd = kRow[d];
#pragma unroll
            for (int32_t r = 0; r < kROWS; ++r)
            {
                s[r] = fmaf(sQ[(warp * kROWS + r) * D + d], kd, s[r]);
            }
        }

        // Online softmax update (log2 domain). mUse is finite, so no (-inf) - (-inf).
        float p[kROWS];
#pragma unroll
        for (int32_t r = 0; r < kROWS; ++r)
        {
            int32_t const row = warp * kROWS + r;
            int32_t const key = kt + lane;
            bool const visible = row < nRows && key >= rowLo[row] && key < rowHi[row];
            float const sr = visible ? s[r] : -CUDART_INF_F;
            float const mNew = fmaxf(m[r], warpMax(sr));
            float const mUse = mNew == -CUDART_INF_F ? 0.f : mNew;
            float const alpha = exp2f(m[r] - mUse);
            p[r] = exp2f(sr - mUse);
            l[r] = l[r] * alpha + warpSum(p[r]);
            m[r] = mNew;
#pragma unroll
            for (int32_t c = 0; c < kDPL; ++c)
            {
                acc[r][c] *= alpha;
            }
        }

        // acc += P V: lane owns columns d = lane + 32c; p_j is broadcast from lane j.
        int32_t const nKeys = min(kBK, blockHi - kt);
        for (int32_t j = 0; j < nKeys; ++j)
        {
            float pj[kROWS];
#pragma unroll
            for (int32_t r = 0; r < kROWS; ++r)
            {
                pj[r] = __shfl_sync(0xffffffffu, p[r], j);
            }
#pragma unroll
            for (int32_t c = 0; c < kDPL; ++c)
            {
                int32_t const d = lane + 32 * c;
                if (d < D)
                {
                    float const vd = sV[j * D + d];
#pragma unroll
                    for (int32_t r = 0; r < kROWS; ++r)
                    {
                        acc[r][c] = fmaf(pj[r], vd, acc[r][c]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int32_t r = 0; r < kROWS; ++r)
    {
        int32_t const row = warp * kROWS + r;
        if (row < nRows)
        {
            float const inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
            for (int32_t c = 0; c < kDPL; ++c)
            {
                int32_t const d = lane + 32 * c;
                if (d < D)
                {
                    o[row * oStride + d] = fromFloat<T>(acc[r][c] * inv);
                }
            }
        }
    }
}

//! Raises the dynamic shared-memory limit of `kernel` when `bytes` exceeds the 48 KiB default (enqueue time).
template <typename Kernel>
inline cudaError_t prepareSharedMemory(Kernel kernel, size_t bytes)
{
    if (bytes <= 48 * 1024)
    {
        return cudaSuccess;
    }
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

} // namespace attn
} // namespace qwen_vl
