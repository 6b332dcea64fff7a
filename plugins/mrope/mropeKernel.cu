#include "common/cudaTypes.cuh"
#include "mrope/mropeKernel.h"

namespace qwen_vl
{
namespace
{

constexpr int32_t kMAX_PAIRS = kMAX_HEAD_DIM / 2;
constexpr int32_t kTHREADS = 128;

//! The rotary tables, passed by value (kMAX_PAIRS * 5 bytes = 640 B of kernel parameters).
struct MropeTables
{
    float invFreq[kMAX_PAIRS];
    uint8_t axis[kMAX_PAIRS];
};

//! One block per token (grid-stride): cos/sin of the token's D/2 angles go to shared memory once and
//! are applied to every head. Angles and rotation in fp32 (HF computes cos/sin in fp32).
template <typename T>
__global__ void mropeKernel(T const* __restrict__ x, int32_t const* __restrict__ positions, T* __restrict__ y,
    int64_t nTokens, int32_t nHeads, int32_t half, int32_t nAxes, __grid_constant__ MropeTables const tables)
{
    __shared__ float sCos[kMAX_PAIRS];
    __shared__ float sSin[kMAX_PAIRS];
    for (int64_t n = blockIdx.x; n < nTokens; n += gridDim.x)
    {
        for (int32_t i = threadIdx.x; i < half; i += blockDim.x)
        {
            float const angle = static_cast<float>(positions[n * nAxes + tables.axis[i]]) * tables.invFreq[i];
            sincosf(angle, &sSin[i], &sCos[i]); // accurate sincos: positions reach 1e5+, fast __sinf would not do
        }
        __syncthreads();
        int64_t const base = n * nHeads * 2 * half;
        for (int32_t idx = threadIdx.x; idx < nHeads * half; idx += blockDim.x)
        {
            int32_t const h = idx / half;
            int32_t const i = idx - h * half;
            int64_t const o = base + static_cast<int64_t>(h) * 2 * half + i;
            float const x1 = toFloat(x[o]);
            float const x2 = toFloat(x[o + half]);
            float const c = sCos[i];
            float const s = sSin[i];
            y[o] = fromFloat<T>(x1 * c - x2 * s);        // first half:  x1*cos + (-x2)*sin
            y[o + half] = fromFloat<T>(x2 * c + x1 * s); // second half: x2*cos + x1*sin
        }
        __syncthreads();
    }
}

template <typename T>
int32_t launchTyped(void const* x, int32_t const* positions, void* y, int64_t nTokens, int32_t nHeads, int32_t half,
    int32_t nAxes, MropeTables const& tables, cudaStream_t stream)
{
    int64_t const grid = nTokens < (1LL << 30) ? nTokens : (1LL << 30);
    mropeKernel<T><<<static_cast<unsigned>(grid), kTHREADS, 0, stream>>>(
        static_cast<T const*>(x), positions, static_cast<T*>(y), nTokens, nHeads, half, nAxes, tables);
    return static_cast<int32_t>(cudaGetLastError());
}

} // namespace

int32_t launchMrope(void const* x, int32_t const* positions, void* y, DataKind dtype, int64_t nTokens,
    int32_t nHeads, int32_t headDim, int32_t nAxes, float const* invFreq, int32_t const* axis, cudaStream_t stream)
{
    int32_t const half = headDim / 2;
    if (headDim % 2 != 0 || half > kMAX_PAIRS || half < 1 || nAxes < 1 || nAxes > 255 || nHeads < 1)
    {
        return kSTATUS_BAD_ARGUMENT;
    }
    if (nTokens == 0)
    {
        return 0;
    }
    MropeTables tables{};
    for (int32_t i = 0; i < half; ++i)
    {
        if (axis[i] < 0 || axis[i] >= nAxes)
        {
            return kSTATUS_BAD_ARGUMENT;
        }
        tables.invFreq[i] = invFreq[i];
        tables.axis[i] = static_cast<uint8_t>(axis[i]);
    }
    switch (dtype)
    {
    case DataKind::kFLOAT32: return launchTyped<float>(x, positions, y, nTokens, nHeads, half, nAxes, tables, stream);
    case DataKind::kFLOAT16: return launchTyped<__half>(x, positions, y, nTokens, nHeads, half, nAxes, tables, stream);
    case DataKind::kBFLOAT16:
        return launchTyped<__nv_bfloat16>(x, positions, y, nTokens, nHeads, half, nAxes, tables, stream);
    }
    return kSTATUS_BAD_ARGUMENT;
}

} // namespace qwen_vl
