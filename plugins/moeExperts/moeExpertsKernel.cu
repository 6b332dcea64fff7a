// MoEExperts kernels: the assignments sorted by expert (counting sort), then two grouped GEMMs over
// (expert, 32-column tile) blocks that dequantize the weights into shared memory, and a top-k combine.
//
// Design: a block of expert e reads only e's weights (an expert no token selected launches a block that exits at
// once, so a decode step reads exactly the selected experts' bytes), and reads each weight tile once per group of
// 8 of e's assignments (prefill: rows grouped, not once per token). CUDA cores, fp32 accumulation, no tensor
// cores: correctness first; the GPU harness (tests/gpu) measures it.
#include "common/cudaTypes.cuh"
#include "moeExperts/moeExpertsKernel.h"

#include <cuda_fp8.h>

#include <algorithm>

namespace qwen_vl
{
namespace
{

constexpr int32_t kCOLS = 32;   //!< output columns per block
constexpr int32_t kROWS = 8;    //!< assignments per pass (kCOLS * kROWS threads)
constexpr int32_t kKCHUNK = 64; //!< input features staged per step
constexpr int32_t kTHREADS = kCOLS * kROWS;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct Workspace
{
    int32_t* offsets; //!< [E + 1] start of each expert's assignments in `sorted`
    int32_t* cursor;  //!< [E] scatter cursor
    int32_t* sorted;  //!< [A] assignment ids grouped by expert
    float* act;       //!< [A, I] silu(gate) * up
    float* rows;      //!< [A, C] weights[a] * act[a] @ down_e
};

Workspace carve(void* base, MoeExpertsShape const& s)
{
    int64_t const a = s.nTokens * s.topK;
    char* p = static_cast<char*>(base);
    Workspace w;
    w.offsets = reinterpret_cast<int32_t*>(p);
    p += align256(sizeof(int32_t) * (s.nExperts + 1));
    w.cursor = reinterpret_cast<int32_t*>(p);
    p += align256(sizeof(int32_t) * s.nExperts);
    w.sorted = reinterpret_cast<int32_t*>(p);
    p += align256(sizeof(int32_t) * a);
    w.act = reinterpret_cast<float*>(p);
    p += align256(sizeof(float) * a * s.inter);
    w.rows = reinterpret_cast<float*>(p);
    return w;
}

//! Value k, n of expert e of a stacked [E, K, N] weight, times its block scale s[e, k / block, n].
template <WeightKind W, typename T>
__device__ __forceinline__ float dequant(void const* q, T const* scale, int32_t e, int32_t k, int32_t n, int32_t K,
    int32_t N, int32_t block)
{
    int64_t const idx = (static_cast<int64_t>(e) * K + k) * N + n;
    float v;
    if constexpr (W == WeightKind::kFP8_E4M3)
    {
        v = static_cast<float>(static_cast<__nv_fp8_e4m3 const*>(q)[idx]);
    }
    else
    {
        uint8_t const byte = static_cast<uint8_t const*>(q)[idx >> 1];
        int32_t const nib = (idx & 1) ? (byte >> 4) : (byte & 0xF);
        v = static_cast<float>((nib ^ 8) - 8);
    }
    int32_t const kb = (K + block - 1) / block;
    return v * toFloat(scale[(static_cast<int64_t>(e) * kb + k / block) * N + n]);
}

__global__ void countKernel(int32_t const* ids, int64_t nAssign, int32_t nExperts, int32_t* counts)
{
    for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; a < nAssign;
         a += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int32_t const e = ids[a];
        if (e >= 0 && e < nExperts)
        {
            atomicAdd(&counts[e + 1], 1);
        }
    }
}

//! counts (in offsets[1..E]) -> exclusive offsets; one thread (E is at most a few hundred).
__global__ void scanKernel(int32_t* offsets, int32_t* cursor, int32_t nExperts)
{
    offsets[0] = 0;
    for (int32_t e = 0; e < nExperts; ++e)
    {
        offsets[e + 1] += offsets[e];
        cursor[e] = offsets[e];
    }
}

__global__ void scatterKernel(int32_t const* ids, int64_t nAssign, int32_t nExperts, int32_t* cursor, int32_t* sorted)
{
    for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; a < nAssign;
         a += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int32_t const e = ids[a];
        if (e >= 0 && e < nExperts)
        {
            sorted[atomicAdd(&cursor[e], 1)] = static_cast<int32_t>(a);
        }
    }
}

//! Block (e, tile): act[a, j] = silu(x_t . Gu_e[:, j]) * (x_t . Gu_e[:, I + j]) for e's assignments a, j in the tile.
template <typename T, WeightKind W>
__global__ void __launch_bounds__(kTHREADS) gateUpKernel(T const* __restrict__ x, void const* __restrict__ gateUp,
    T const* __restrict__ scale, Workspace ws, MoeExpertsShape s)
{
    __shared__ float sGate[kKCHUNK][kCOLS];
    __shared__ float sUp[kKCHUNK][kCOLS];
    __shared__ float sX[kROWS][kKCHUNK];
    int32_t const e = blockIdx.x;
    int32_t const begin = ws.offsets[e];
    int32_t const end = ws.offsets[e + 1];
    int32_t const col = threadIdx.x % kCOLS;
    int32_t const row = threadIdx.x / kCOLS;
    int32_t const j = blockIdx.y * kCOLS + col;
    int32_t const C = s.hidden, I = s.inter, N = 2 * s.inter;
    for (int32_t first = begin; first < end; first += kROWS)
    {
        float gate = 0.f, up = 0.f;
        for (int32_t k0 = 0; k0 < C; k0 += kKCHUNK)
        {
            for (int32_t i = threadIdx.x; i < kKCHUNK * kCOLS; i += kTHREADS)
            {
                int32_t const kk = i / kCOLS, cc = i % kCOLS, k = k0 + kk, jj = blockIdx.y * kCOLS + cc;
                bool const in = k < C && jj < I;
                sGate[kk][cc] = in ? dequant<W>(gateUp, scale, e, k, jj, C, N, s.gateUpBlock) : 0.f;
                sUp[kk][cc] = in ? dequant<W>(gateUp, scale, e, k, I + jj, C, N, s.gateUpBlock) : 0.f;
            }
            for (int32_t i = threadIdx.x; i < kROWS * kKCHUNK; i += kTHREADS)
            {
                int32_t const rr = i / kKCHUNK, kk = i % kKCHUNK, k = k0 + kk;
                int32_t const a = first + rr < end ? ws.sorted[first + rr] : -1;
                sX[rr][kk] = (a >= 0 && k < C) ? toFloat(x[static_cast<int64_t>(a / s.topK) * C + k]) : 0.f;
            }
            __syncthreads();
#pragma unroll 8
            for (int32_t kk = 0; kk < kKCHUNK; ++kk)
            {
                gate += sX[row][kk] * sGate[kk][col];
                up += sX[row][kk] * sUp[kk][col];
            }
            __syncthreads();
        }
        if (first + row < end && j < I)
        {
            int32_t const a = ws.sorted[first + row];
            ws.act[static_cast<int64_t>(a) * I + j] = gate / (1.f + __expf(-gate)) * up;
        }
    }
}

//! Block (e, tile): rows[a, c] = weights[a] * (act[a] . D_e[:, c]) for e's assignments a, c in the tile.
template <typename T, WeightKind W>
__global__ void __launch_bounds__(kTHREADS) downKernel(T const* __restrict__ weights, void const* __restrict__ down,
    T const* __restrict__ scale, Workspace ws, MoeExpertsShape s)
{
    __shared__ float sW[kKCHUNK][kCOLS];
    __shared__ float sA[kROWS][kKCHUNK];
    int32_t const e = blockIdx.x;
    int32_t const begin = ws.offsets[e];
    int32_t const end = ws.offsets[e + 1];
    int32_t const col = threadIdx.x % kCOLS;
    int32_t const row = threadIdx.x / kCOLS;
    int32_t const c = blockIdx.y * kCOLS + col;
    int32_t const C = s.hidden, I = s.inter;
    for (int32_t first = begin; first < end; first += kROWS)
    {
        float acc = 0.f;
        for (int32_t k0 = 0; k0 < I; k0 += kKCHUNK)
        {
            for (int32_t i = threadIdx.x; i < kKCHUNK * kCOLS; i += kTHREADS)
            {
                int32_t const kk = i / kCOLS, cc = i % kCOLS, k = k0 + kk, n = blockIdx.y * kCOLS + cc;
                sW[kk][cc] = (k < I && n < C) ? dequant<W>(down, scale, e, k, n, I, C, s.downBlock) : 0.f;
            }
            for (int32_t i = threadIdx.x; i < kROWS * kKCHUNK; i += kTHREADS)
            {
                int32_t const rr = i / kKCHUNK, kk = i % kKCHUNK, k = k0 + kk;
                int32_t const a = first + rr < end ? ws.sorted[first + rr] : -1;
                sA[rr][kk] = (a >= 0 && k < I) ? ws.act[static_cast<int64_t>(a) * I + k] : 0.f;
            }
            __syncthreads();
#pragma unroll 8
            for (int32_t kk = 0; kk < kKCHUNK; ++kk)
            {
                acc += sA[row][kk] * sW[kk][col];
            }
            __syncthreads();
        }
        if (first + row < end && c < C)
        {
            int32_t const a = ws.sorted[first + row];
            ws.rows[static_cast<int64_t>(a) * C + c] = toFloat(weights[a]) * acc;
        }
    }
}

//! y[t, c] = sum over j < k (in order) of rows[t*k + j, c]; assignments with an invalid expert id add nothing.
template <typename T>
__global__ void combineKernel(int32_t const* ids, Workspace ws, T* y, MoeExpertsShape s)
{
    int64_t const total = s.nTokens * s.hidden;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const t = i / s.hidden;
        int32_t const c = static_cast<int32_t>(i % s.hidden);
        float sum = 0.f;
        for (int32_t j = 0; j < s.topK; ++j)
        {
            int64_t const a = t * s.topK + j;
            if (ids[a] >= 0 && ids[a] < s.nExperts)
            {
                sum += ws.rows[a * s.hidden + c];
            }
        }
        y[i] = fromFloat<T>(sum);
    }
}

template <typename T, WeightKind W>
int32_t run(void const* x, int32_t const* ids, void const* weights, void const* gateUp, void const* gateUpScale,
    void const* down, void const* downScale, void* y, MoeExpertsShape const& s, void* workspace, cudaStream_t stream)
{
    Workspace ws = carve(workspace, s);
    int64_t const nAssign = s.nTokens * s.topK;
    cudaError_t err = cudaMemsetAsync(ws.offsets, 0, sizeof(int32_t) * (s.nExperts + 1), stream);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    int32_t const blocks = static_cast<int32_t>(std::min<int64_t>((nAssign + 255) / 256, 1024));
    countKernel<<<blocks, 256, 0, stream>>>(ids, nAssign, s.nExperts, ws.offsets);
    scanKernel<<<1, 1, 0, stream>>>(ws.offsets, ws.cursor, s.nExperts);
    scatterKernel<<<blocks, 256, 0, stream>>>(ids, nAssign, s.nExperts, ws.cursor, ws.sorted);
    gateUpKernel<T, W><<<dim3(s.nExperts, (s.inter + kCOLS - 1) / kCOLS), kTHREADS, 0, stream>>>(
        static_cast<T const*>(x), gateUp, static_cast<T const*>(gateUpScale), ws, s);
    downKernel<T, W><<<dim3(s.nExperts, (s.hidden + kCOLS - 1) / kCOLS), kTHREADS, 0, stream>>>(
        static_cast<T const*>(weights), down, static_cast<T const*>(downScale), ws, s);
    int64_t const total = s.nTokens * s.hidden;
    combineKernel<T><<<static_cast<int32_t>(std::min<int64_t>((total + 255) / 256, 65535)), 256, 0, stream>>>(
        ids, ws, static_cast<T*>(y), s);
    return static_cast<int32_t>(cudaGetLastError());
}

template <typename T>
int32_t runWeights(WeightKind wkind, void const* x, int32_t const* ids, void const* weights, void const* gateUp,
    void const* gateUpScale, void const* down, void const* downScale, void* y, MoeExpertsShape const& s,
    void* workspace, cudaStream_t stream)
{
    return wkind == WeightKind::kFP8_E4M3
        ? run<T, WeightKind::kFP8_E4M3>(x, ids, weights, gateUp, gateUpScale, down, downScale, y, s, workspace, stream)
        : run<T, WeightKind::kINT4>(x, ids, weights, gateUp, gateUpScale, down, downScale, y, s, workspace, stream);
}

} // namespace

size_t moeExpertsWorkspaceSize(MoeExpertsShape const& s)
{
    int64_t const a = s.nTokens * s.topK;
    return align256(sizeof(int32_t) * (s.nExperts + 1)) + align256(sizeof(int32_t) * s.nExperts)
        + align256(sizeof(int32_t) * a) + align256(sizeof(float) * a * s.inter)
        + align256(sizeof(float) * a * s.hidden);
}

int32_t launchMoeExperts(void const* x, int32_t const* ids, void const* weights, void const* gateUp,
    void const* gateUpScale, void const* down, void const* downScale, void* y, DataKind dtype, WeightKind wkind,
    MoeExpertsShape const& s, void* workspace, cudaStream_t stream)
{
    if (s.nTokens < 0 || s.topK <= 0 || s.nExperts <= 0 || s.hidden <= 0 || s.inter <= 0 || s.gateUpBlock <= 0
        || s.downBlock <= 0 || (wkind == WeightKind::kINT4 && ((s.hidden * 2 * s.inter) % 2 != 0)))
    {
        return kSTATUS_BAD_ARGUMENT;
    }
    if (s.nTokens == 0)
    {
        return 0;
    }
    switch (dtype)
    {
    case DataKind::kFLOAT32:
        return runWeights<float>(wkind, x, ids, weights, gateUp, gateUpScale, down, downScale, y, s, workspace, stream);
    case DataKind::kFLOAT16:
        return runWeights<__half>(wkind, x, ids, weights, gateUp, gateUpScale, down, downScale, y, s, workspace, stream);
    case DataKind::kBFLOAT16:
        return runWeights<__nv_bfloat16>(
            wkind, x, ids, weights, gateUp, gateUpScale, down, downScale, y, s, workspace, stream);
    }
    return kSTATUS_BAD_ARGUMENT;
}

} // namespace qwen_vl
