// MRoPE launcher: y = x*cos + rotate_half(x)*sin with angle[n, i] = positions[n, axis[i]] * invFreq[i].
#pragma once

#include "common/kernelTypes.h"

#include <cuda_runtime_api.h>
#include <cstdint>

namespace qwen_vl
{

//! x, y: [nTokens, nHeads, headDim] of `dtype` (any leading dims flattened into nTokens).
//! positions: [nTokens, nAxes] int32. invFreq (fp32) and axis (int32, each in [0, nAxes)) are HOST arrays of
//! headDim/2 entries; they travel to the kernel as a by-value parameter, so no device table is needed.
//! Returns 0 or a cudaError_t / kSTATUS_BAD_ARGUMENT.
int32_t launchMrope(void const* x, int32_t const* positions, void* y, DataKind dtype, int64_t nTokens,
    int32_t nHeads, int32_t headDim, int32_t nAxes, float const* invFreq, int32_t const* axis, cudaStream_t stream);

} // namespace qwen_vl
