#include "common/attentionCore.cuh"
#include "common/attentionMma.cuh"
#include "common/attentionMma.h"
#include "kvCacheAttention/kvCacheAttentionKernel.h"

#include <algorithm>
#include <type_traits>

namespace qwen_vl
{
namespace
{

using namespace attn;

//! present[b, hk, pastLengths[b] + s, :] = new[b, s, hk, :] for K and V. Rows are clamped to the cache, so a
//! bad pastLengths can never write outside [0, capacity).
template <typename T>
__global__ void kvCacheWriteKernel(T const* __restrict__ k, T const* __restrict__ v, int32_t const* __restrict__ pastLengths,
    T* __restrict__ presentKey, T* __restrict__ presentValue, int32_t batch, int32_t seqLen, int32_t nHeadsKv,
    int32_t capacity, int32_t headDim)
{
    int64_t const total = static_cast<int64_t>(batch) * seqLen * nHeadsKv * headDim;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int32_t const d = static_cast<int32_t>(i % headDim);
        int64_t rest = i / headDim;
        int32_t const hk = static_cast<int32_t>(rest % nHeadsKv);
        rest /= nHeadsKv;
        int32_t const s = static_cast<int32_t>(rest % seqLen);
        int32_t const b = static_cast<int32_t>(rest / seqLen);
        int32_t const row = pastLengths[b] + s;
        if (row >= 0 && row < capacity)
        {
            int64_t const dst = ((static_cast<int64_t>(b) * nHeadsKv + hk) * capacity + row) * headDim + d;
            presentKey[dst] = k[i];
            presentValue[dst] = v[i];
        }
    }
}

//! Grid (ceil(S / kBQ), Hq, B): query row s of batch b sees cache rows [0, pastLengths[b] + s].
template <typename T>
__global__ void __launch_bounds__(kTHREADS) kvCacheAttentionKernel(T const* __restrict__ q,
    T const* __restrict__ presentKey, T const* __restrict__ presentValue, int32_t const* __restrict__ pastLengths,
    T* __restrict__ o, int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, int32_t headDim,
    float scaleLog2)
{
    extern __shared__ float smem[];
    __shared__ int32_t sLo[kBQ];
    __shared__ int32_t sHi[kBQ];
    int32_t const h = blockIdx.y;
    int32_t const b = blockIdx.z;
    int32_t const hk = h / (nHeadsQ / nHeadsKv);
    int32_t const s0 = blockIdx.x * kBQ;
    int32_t const nRows = min(kBQ, seqLen - s0);
    int32_t const past = pastLengths[b];
    if (threadIdx.x < kBQ)
    {
        sLo[threadIdx.x] = 0;
        sHi[threadIdx.x] = max(0, min(capacity, past + s0 + static_cast<int32_t>(threadIdx.x) + 1));
    }
    __syncthreads();
    int32_t const blockHi = max(0, min(capacity, past + s0 + nRows));

    int64_t const qOffset = ((static_cast<int64_t>(b) * seqLen + s0) * nHeadsQ + h) * headDim;
    int64_t const kvOffset = (static_cast<int64_t>(b) * nHeadsKv + hk) * capacity * headDim;
    attentionTile<T>(q + qOffset, static_cast<int64_t>(nHeadsQ) * headDim, o + qOffset,
        static_cast<int64_t>(nHeadsQ) * headDim, nRows, presentKey + kvOffset, presentValue + kvOffset, headDim, sLo,
        sHi, 0, blockHi, headDim, scaleLog2, smem);
}

//! The tensor-core variant (attentionMma.cuh) for prefill (seqLen >= 16): grid (ceil(S / 64), Hq, B), head dim
//! D fixed at compile time; same row ranges as kvCacheAttentionKernel (rows >= nRows see nothing).
template <typename T, int32_t D>
__global__ void __launch_bounds__(mma::kTHREADS) kvCacheAttentionMmaKernel(T const* __restrict__ q,
    T const* __restrict__ presentKey, T const* __restrict__ presentValue, int32_t const* __restrict__ pastLengths,
    T* __restrict__ o, int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, float scaleLog2)
{
    extern __shared__ __align__(16) unsigned char mmaSmem[];
    __shared__ int32_t sLo[mma::kBQ];
    __shared__ int32_t sHi[mma::kBQ];
    int32_t const h = blockIdx.y;
    int32_t const b = blockIdx.z;
    int32_t const hk = h / (nHeadsQ / nHeadsKv);
    int32_t const s0 = blockIdx.x * mma::kBQ;
    int32_t const nRows = min(mma::kBQ, seqLen - s0);
    int32_t const past = pastLengths[b];
    if (threadIdx.x < mma::kBQ)
    {
        int32_t const r = threadIdx.x;
        sLo[r] = 0;
        sHi[r] = r < nRows ? max(0, min(capacity, past + s0 + r + 1)) : 0;
    }
    __syncthreads();
    int32_t const blockHi = max(0, min(capacity, past + s0 + nRows));

    int64_t const qOffset = ((static_cast<int64_t>(b) * seqLen + s0) * nHeadsQ + h) * D;
    int64_t const kvOffset = (static_cast<int64_t>(b) * nHeadsKv + hk) * capacity * D;
    mma::attentionTileMma<T, D>(q + qOffset, static_cast<int64_t>(nHeadsQ) * D, o + qOffset,
        static_cast<int64_t>(nHeadsQ) * D, nRows, presentKey + kvOffset, presentValue + kvOffset, D, sLo, sHi, 0,
        blockHi, scaleLog2, reinterpret_cast<T*>(mmaSmem));
}

template <typename T, int32_t D>
int32_t launchAttentionMma(T const* q, T const* presentKey, T const* presentValue, int32_t const* pastLengths, T* o,
    int32_t batch, int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, float scale,
    cudaStream_t stream)
{
    constexpr size_t bytes = mma::sharedBytes<D>();
    cudaError_t const err = prepareSharedMemory(kvCacheAttentionMmaKernel<T, D>, bytes);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    dim3 const grid((seqLen + mma::kBQ - 1) / mma::kBQ, nHeadsQ, batch);
    kvCacheAttentionMmaKernel<T, D><<<grid, mma::kTHREADS, bytes, stream>>>(
        q, presentKey, presentValue, pastLengths, o, seqLen, nHeadsQ, nHeadsKv, capacity, scale * kLOG2E);
    return static_cast<int32_t>(cudaGetLastError());
}

//! Head-dim dispatch of the MMA path (fp16/bf16 and mmaSupportsHeadDim(headDim) only).
template <typename T>
int32_t launchAttentionMmaTyped(T const* q, T const* presentKey, T const* presentValue, int32_t const* pastLengths,
    T* o, int32_t batch, int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, int32_t headDim,
    float scale, cudaStream_t stream)
{
    if constexpr (std::is_same_v<T, float>)
    {
        return kSTATUS_BAD_ARGUMENT;
    }
    else
    {
#define QWEN_KV_MMA_ARGS q, presentKey, presentValue, pastLengths, o, batch, seqLen, nHeadsQ, nHeadsKv, capacity, \
                         scale, stream
        switch (headDim)
        {
        case 64: return launchAttentionMma<T, 64>(QWEN_KV_MMA_ARGS);
        case 72: return launchAttentionMma<T, 72>(QWEN_KV_MMA_ARGS);
        case 80: return launchAttentionMma<T, 80>(QWEN_KV_MMA_ARGS);
        case 128: return launchAttentionMma<T, 128>(QWEN_KV_MMA_ARGS);
        default: return kSTATUS_BAD_ARGUMENT;
        }
#undef QWEN_KV_MMA_ARGS
    }
}

template <typename T>
int32_t launchTyped(void const* q, void const* k, void const* v, void const* pastKey, void const* pastValue,
    int32_t const* pastLengths, void* o, void* presentKey, void* presentValue, int32_t batch, int32_t seqLen,
    int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, int32_t headDim, float scale, bool useMma, cudaStream_t stream)
{
    size_t const cacheBytes = sizeof(T) * static_cast<size_t>(batch) * nHeadsKv * capacity * headDim;
    cudaError_t err = cudaSuccess;
    if (presentKey != pastKey) // not aliased: present starts as a copy of past
    {
        err = cudaMemcpyAsync(presentKey, pastKey, cacheBytes, cudaMemcpyDeviceToDevice, stream);
    }
    if (err == cudaSuccess && presentValue != pastValue)
    {
        err = cudaMemcpyAsync(presentValue, pastValue, cacheBytes, cudaMemcpyDeviceToDevice, stream);
    }
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    int64_t const total = static_cast<int64_t>(batch) * seqLen * nHeadsKv * headDim;
    int64_t const writeBlocks = std::min<int64_t>((total + 255) / 256, 65535);
    kvCacheWriteKernel<T><<<static_cast<unsigned>(writeBlocks), 256, 0, stream>>>(static_cast<T const*>(k),
        static_cast<T const*>(v), pastLengths, static_cast<T*>(presentKey), static_cast<T*>(presentValue), batch,
        seqLen, nHeadsKv, capacity, headDim);
    if ((err = cudaGetLastError()) != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    if (useMma)
    {
        return launchAttentionMmaTyped<T>(static_cast<T const*>(q), static_cast<T const*>(presentKey),
            static_cast<T const*>(presentValue), pastLengths, static_cast<T*>(o), batch, seqLen, nHeadsQ, nHeadsKv,
            capacity, headDim, scale, stream);
    }
    size_t const bytes = sharedBytes(headDim);
    if ((err = prepareSharedMemory(kvCacheAttentionKernel<T>, bytes)) != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    dim3 const grid((seqLen + kBQ - 1) / kBQ, nHeadsQ, batch);
    kvCacheAttentionKernel<T><<<grid, kTHREADS, bytes, stream>>>(static_cast<T const*>(q),
        static_cast<T const*>(presentKey), static_cast<T const*>(presentValue), pastLengths, static_cast<T*>(o), seqLen,
        nHeadsQ, nHeadsKv, capacity, headDim, scale * kLOG2E);
    return static_cast<int32_t>(cudaGetLastError());
}

} // namespace

int32_t launchKvCacheAttention(void const* q, void const* k, void const* v, void const* pastKey, void const* pastValue,
    int32_t const* pastLengths, void* o, void* presentKey, void* presentValue, DataKind dtype, int32_t batch,
    int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, int32_t headDim, float scale,
    cudaStream_t stream)
{
    if (headDim < 8 || headDim % 8 != 0 || headDim > kMAX_HEAD_DIM || nHeadsKv < 1 || nHeadsQ % nHeadsKv != 0
        || batch < 0 || seqLen < 0 || capacity < 0 || nHeadsQ > 65535 || batch > 65535)
    {
        return kSTATUS_BAD_ARGUMENT;
    }
    if (batch == 0 || seqLen == 0)
    {
        return 0;
    }
    // Decode (seqLen < 16) stays on the CUDA-core kernel: a 64-row MMA tile would be almost all padding.
    bool const useMma = seqLen >= 16 && useMmaAttention(dtype, headDim, {q, o, presentKey, presentValue});
#define QWEN_KV_ARGS q, k, v, pastKey, pastValue, pastLengths, o, presentKey, presentValue, batch, seqLen, nHeadsQ, \
                     nHeadsKv, capacity, headDim, scale, useMma, stream
    switch (dtype)
    {
    case DataKind::kFLOAT32: return launchTyped<float>(QWEN_KV_ARGS);
    case DataKind::kFLOAT16: return launchTyped<__half>(QWEN_KV_ARGS);
    case DataKind::kBFLOAT16: return launchTyped<__nv_bfloat16>(QWEN_KV_ARGS);
    }
#undef QWEN_KV_ARGS
    return kSTATUS_BAD_ARGUMENT;
}

} // namespace qwen_vl
