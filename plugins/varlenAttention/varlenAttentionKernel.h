// VarlenAttention launcher: attention within each segment [cu[i], cu[i+1]) of packed tokens, GQA.
#pragma once

#include "common/kernelTypes.h"

#include <cuda_runtime_api.h>
#include <cstdint>

namespace qwen_vl
{

//! q, o: [nTokens, nHeadsQ, headDim]; k, v: [nTokens, nHeadsKv, headDim], all of `dtype`.
//! cuSeqlens: [nSegments + 1] int32 on the device, non-decreasing, cu[0] = 0, cu[nSegments] = nTokens
//! (tokens at or past cu[nSegments] see no key and get zeros). Query head h reads kv head
//! h / (nHeadsQ / nHeadsKv). causal != 0 additionally limits token t to keys <= t. Softmax in fp32.
//! headDim: a multiple of 8 up to kMAX_HEAD_DIM. Returns 0 or a cudaError_t / kSTATUS_BAD_ARGUMENT.
int32_t launchVarlenAttention(void const* q, void const* k, void const* v, int32_t const* cuSeqlens,
    int32_t nSegments, void* o, DataKind dtype, int32_t nTokens, int32_t nHeadsQ, int32_t nHeadsKv, int32_t headDim,
    float scale, bool causal, cudaStream_t stream);

} // namespace qwen_vl
