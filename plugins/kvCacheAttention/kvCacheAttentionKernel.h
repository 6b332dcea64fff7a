// KVCacheAttention launcher: write one step's K/V into the cache, then causal GQA attention over it.
#pragma once

#include "common/kernelTypes.h"

#include <cuda_runtime_api.h>
#include <cstdint>

namespace qwen_vl
{

//! q, o: [batch, seqLen, nHeadsQ, headDim]; k, v: [batch, seqLen, nHeadsKv, headDim];
//! pastKey/pastValue, presentKey/presentValue: [batch, nHeadsKv, capacity, headDim]; pastLengths: [batch]
//! int32 on the device, with pastLengths[b] + seqLen <= capacity (the caller guarantees it).
//! present may be the same buffer as past (in place, TensorRT aliasing); otherwise past is copied first.
//! Rows pastLengths[b] + s (s < seqLen) of present receive the new k/v; then
//! o[b, s] = softmax_j<=pastLengths[b]+s(q.k_j * scale) v_j in fp32. Returns 0 or a cudaError_t.
int32_t launchKvCacheAttention(void const* q, void const* k, void const* v, void const* pastKey, void const* pastValue,
    int32_t const* pastLengths, void* o, void* presentKey, void* presentValue, DataKind dtype, int32_t batch,
    int32_t seqLen, int32_t nHeadsQ, int32_t nHeadsKv, int32_t capacity, int32_t headDim, float scale,
    cudaStream_t stream);

} // namespace qwen_vl
