// Which attention kernel a launch uses: the CUDA-core tile loop (attentionCore.cuh, every dtype and head dim)
// or the tensor-core path (attentionMma.cuh: sm_80+, fp16/bf16, head dims 64/72/80/128).
// Choice: qwen_vl_set_attention_kernel(n) if called with n != 0, else $QWEN_VL_ATTENTION_KERNEL read once per
// process (`simt` | `mma` | unset = auto). auto and `mma` both take the MMA path only where it is supported;
// everything else (fp32, other head dims, sm < 80, unaligned pointers) runs the CUDA-core kernels.
#pragma once

#include "common/kernelTypes.h"

#include <cstdint>
#include <initializer_list>

namespace qwen_vl
{

enum class AttentionKernel : int32_t
{
    kAUTO = 0,
    kSIMT = 1,
    kMMA = 2,
};

//! Head dims the MMA path is compiled for.
constexpr bool mmaSupportsHeadDim(int32_t headDim)
{
    return headDim == 64 || headDim == 72 || headDim == 80 || headDim == 128;
}

//! True when this launch takes the MMA path: the choice is not simt, dtype is fp16/bf16, the head dim is
//! supported, the current device is sm_80+ (queried once per process) and every pointer is 16-byte aligned.
//! Enqueue time only (may make CUDA calls on first use).
bool useMmaAttention(DataKind dtype, int32_t headDim, std::initializer_list<void const*> pointers) noexcept;

} // namespace qwen_vl

//! Overrides $QWEN_VL_ATTENTION_KERNEL for the whole process: 0 = back to the environment's choice, 1 = simt,
//! 2 = mma (where supported). Exported for tests and benchmarks (ctypes); no TensorRT API involved.
extern "C" __attribute__((visibility("default"))) void qwen_vl_set_attention_kernel(int32_t kernel);
