// Types shared by the kernel launchers. No TensorRT types here: launchers take raw pointers and dims.
#pragma once

#include <cstdint>

namespace qwen_vl
{

//! Element type of the floating-point tensors a launcher reads and writes.
enum class DataKind : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
    kBFLOAT16 = 2,
};

//! Launcher status: 0 on success, otherwise the cudaError_t of the failed launch or one of these.
constexpr int32_t kSTATUS_BAD_ARGUMENT = -1;

//! Largest head dim the attention and MRoPE kernels accept (any multiple of 8 up to this).
constexpr int32_t kMAX_HEAD_DIM = 256;

} // namespace qwen_vl
