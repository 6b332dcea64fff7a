#include "common/attentionCore.cuh"
#include "common/attentionMma.cuh"
#include "common/attentionMma.h"
#include "varlenAttention/varlenAttentionKernel.h"

namespace qwen_vl
{
namespace
{

using namespace attn;

//! Row r < nRows of a block (token t0 + r) sees the keys [sLo[r], sHi[r]) of its segment (limited to <= t0 + r
//! if causal); rows without one get [0, 0). sBlock = [lo, hi): the union over the rows. kRows <= blockDim.x.
template <int32_t kRows>
__device__ void segmentRanges(int32_t const* __restrict__ cuSeqlens, int32_t nSegments, int32_t t0, int32_t nRows,
    int32_t causal, int32_t* sLo, int32_t* sHi, int32_t* sBlock)
{
    if (threadIdx.x < kRows)
    {
        int32_t const r = threadIdx.x;
        int32_t const t = t0 + r;
        int32_t lo = 0;
        int32_t hi = 0;
        if (r < nRows && nSegments > 0 && t < cuSeqlens[nSegments])
        {
            int32_t a = 0; // largest i in [0, nSegments) with cu[i] <= t (skips empty segments)
            int32_t b = nSegments - 1;
            while (a < b)
            {
                int32_t const mid = (a + b + 1) >> 1;
                if (cuSeqlens[mid] <= t)
                {
                    a = mid;
                }
                else
                {
                    b = mid - 1;
                }
            }
            lo = cuSeqlens[a];
            hi = causal ? min(cuSeqlens[a + 1], t + 1) : cuSeqlens[a + 1];
        }
        sLo[r] = lo;
        sHi[r] = hi;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int32_t lo = INT32_MAX;
        int32_t hi = 0;
        for (int32_t r = 0; r < nRows; ++r)
        {
            if (sHi[r] > sLo[r])
            {
                lo = min(lo, sLo[r]);
                hi = max(hi, sHi[r]);
            }
        }
        sBlock[0] = lo == INT32_MAX ? 0 : lo;
        sBlock[1] = hi;
    }
    __syncthreads();
}

//! Grid (ceil(T / kBQ), Hq). A block's rows may straddle segments: each row finds its own segment and the
//! block streams the union of their key ranges, masking per row.
template <typename T>
__global__ void __launch_bounds__(kTHREADS) varlenAttentionKernel(T const* __restrict__ q, T const* __restrict__ k,
    T const* __restrict__ v, int32_t const* __restrict__ cuSeqlens, int32_t nSegments, T* __restrict__ o,
    int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, int32_t headDim, float scaleLog2, int32_t causal)
{
    extern __shared__ float smem[];
    __shared__ int32_t sLo[kBQ];
    __shared__ int32_t sHi[kBQ];
    __shared__ int32_t sBlock[2];
    int32_t const h = blockIdx.y;
    int32_t const hk = h / (nHeadsQ / nHeadsKv);
    int32_t const t0 = blockIdx.x * kBQ;
    int32_t const nRows = min(kBQ, nTokens - t0);
    segmentRanges<kBQ>(cuSeqlens, nSegments, t0, nRows, causal, sLo, sHi, sBlock);

    int64_t const qOffset = (static_cast<int64_t>(t0) * nHeadsQ + h) * headDim;
    int64_t const kvOffset = static_cast<int64_t>(hk) * headDim;
    attentionTile<T>(q + qOffset, static_cast<int64_t>(nHeadsQ) * headDim, o + qOffset,
        static_cast<int64_t>(nHeadsQ) * headDim, nRows, k + kvOffset, v + kvOffset,
        static_cast<int64_t>(nHeadsKv) * headDim, sLo, sHi, sBlock[0], sBlock[1], headDim, scaleLog2, smem);
}

template <typename T>
int32_t launchTyped(void const* q, void const* k, void const* v, int32_t const* cu, int32_t nSegments, void* o,
    int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, int32_t headDim, float scale, bool causal, cudaStream_t stream)
{
    size_t const bytes = sharedBytes(headDim);
    cudaError_t err = prepareSharedMemory(varlenAttentionKernel<T>, bytes);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    dim3 const grid((nTokens + kBQ - 1) / kBQ, nHeadsQ);
    varlenAttentionKernel<T><<<grid, kTHREADS, bytes, stream>>>(static_cast<T const*>(q), static_cast<T const*>(k),
        static_cast<T const*>(v), cu, nSegments, static_cast<T*>(o), nTokens, nHeadsQ, nHeadsKv, headDim,
        scale * kLOG2E, causal ? 1 : 0);
    return static_cast<int32_t>(cudaGetLastError());
}

//! The tensor-core variant (attentionMma.cuh): grid (ceil(T / 64), Hq), head dim D fixed at compile time.
template <typename T, int32_t D>
__global__ void __launch_bounds__(mma::kTHREADS) varlenAttentionMmaKernel(T const* __restrict__ q,
    T const* __restrict__ k, T const* __restrict__ v, int32_t const* __restrict__ cuSeqlens, int32_t nSegments,
    T* __restrict__ o, int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, float scaleLog2, int32_t causal)
{
    extern __shared__ __align__(16) unsigned char mmaSmem[];
    __shared__ int32_t sLo[mma::kBQ];
    __shared__ int32_t sHi[mma::kBQ];
    __shared__ int32_t sBlock[2];
    int32_t const h = blockIdx.y;
    int32_t const hk = h / (nHeadsQ / nHeadsKv);
    int32_t const t0 = blockIdx.x * mma::kBQ;
    int32_t const nRows = min(mma::kBQ, nTokens - t0);
    segmentRanges<mma::kBQ>(cuSeqlens, nSegments, t0, nRows, causal, sLo, sHi, sBlock);

    int64_t const qOffset = (static_cast<int64_t>(t0) * nHeadsQ + h) * D;
    int64_t const kvOffset = static_cast<int64_t>(hk) * D;
    mma::attentionTileMma<T, D>(q + qOffset, static_cast<int64_t>(nHeadsQ) * D, o + qOffset,
        static_cast<int64_t>(nHeadsQ) * D, nRows, k + kvOffset, v + kvOffset, static_cast<int64_t>(nHeadsKv) * D, sLo,
        sHi, sBlock[0], sBlock[1], scaleLog2, reinterpret_cast<T*>(mmaSmem));
}

template <typename T, int32_t D>
int32_t launchMma(void const* q, void const* k, void const* v, int32_t const* cu, int32_t nSegments, void* o,
    int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, float scale, bool causal, cudaStream_t stream)
{
    constexpr size_t bytes = mma::sharedBytes<D>();
    cudaError_t const err = prepareSharedMemory(varlenAttentionMmaKernel<T, D>, bytes);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    dim3 const grid((nTokens + mma::kBQ - 1) / mma::kBQ, nHeadsQ);
    varlenAttentionMmaKernel<T, D><<<grid, mma::kTHREADS, bytes, stream>>>(static_cast<T const*>(q),
        static_cast<T const*>(k), static_cast<T const*>(v), cu, nSegments, static_cast<T*>(o), nTokens, nHeadsQ,
        nHeadsKv, scale * kLOG2E, causal ? 1 : 0);
    return static_cast<int32_t>(cudaGetLastError());
}

//! Head-dim dispatch of the MMA path (only called for mmaSupportsHeadDim(headDim)).
template <typename T>
int32_t launchMmaTyped(void const* q, void const* k, void const* v, int32_t const* cu, int32_t nSegments, void* o,
    int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, int32_t headDim, float scale, bool causal, cudaStream_t stream)
{
    switch (headDim)
    {
    case 64: return launchMma<T, 64>(q, k, v, cu, nSegments, o, nTokens, nHeadsQ, nHeadsKv, scale, causal, stream);
    case 72: return launchMma<T, 72>(q, k, v, cu, nSegments, o, nTokens, nHeadsQ, nHeadsKv, scale, causal, stream);
    case 80: return launchMma<T, 80>(q, k, v, cu, nSegments, o, nTokens, nHeadsQ, nHeadsKv, scale, causal, stream);
    case 128: return launchMma<T, 128>(q, k, v, cu, nSegments, o, nTokens, nHeadsQ, nHeadsKv, scale, causal, stream);
    default: return kSTATUS_BAD_ARGUMENT;
    }
}

} // namespace

int32_t launchVarlenAttention(void const* q, void const* k, void const* v, int32_t const* cuSeqlens,
    int32_t nSegments, void* o, DataKind dtype, int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, int32_t headDim,
    float scale, bool causal, cudaStream_t stream)
{
    if (headDim < 8 || headDim % 8 != 0 || headDim > kMAX_HEAD_DIM || nHeadsKv < 1 || nHeadsQ % nHeadsKv != 0
        || nSegments < 0 || nTokens < 0 || nHeadsQ > 65535)
    {
        return kSTATUS_BAD_ARGUMENT;
    }
    if (nTokens == 0)
    {
        return 0;
    }
    if (useMmaAttention(dtype, headDim, {q, k, v, o}))
    {
        return dtype == DataKind::kFLOAT16
            ? launchMmaTyped<__half>(q, k, v, cuSeqlens, nSegments, o, nTokens, nHeadsQ, nHeadsKv, headDim, scale,
                causal, stream)
            : launchMmaTyped<__nv_bfloat16>(
                q, k, v, cuSeqlens, nSegments, o, nTokens, nHeadsQ, nHeadsKv, headDim, scale, causal, stream);
    }
    switch (dtype)
    {
    case DataKind::kFLOAT32:
        return launchTyped<float>(q, k, v, cuSeqlens, nSegments, o, nTokens, nHeadsQ, nHeadsKv, headDim, scale, causal, stream);
    case DataKind::kFLOAT16:
        return launchTyped<__half>(q, k, v, cuSeqlens, nSegments, o, nTokens, nHeadsQ, nHeadsKv, headDim, scale, causal, stream);
    case DataKind::kBFLOAT16:
        return launchTyped<__nv_bfloat16>(
            q, k, v, cuSeqlens, nSegments, o, nTokens, nHeadsQ, nHeadsKv, headDim, scale, causal, stream);
    }
    return kSTATUS_BAD_ARGUMENT;
}

} // namespace qwen_vl
