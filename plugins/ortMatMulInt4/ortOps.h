// What the ops of libqwen_vl_ort_kernels.so share: their domain, ONNX Runtime's parallel-for as the kernels take it,
// and the op objects RegisterCustomOps (ortRegister.cpp) adds to the domain.
// Built against the C/C++ API headers of ONNX Runtime 1.21 (API version 21): any later ONNX Runtime loads it.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstddef>

namespace qwen_vl
{

constexpr char kDomain[] = "qwen_vl";

//! The `runner` of a kernel's ParallelFor (matMulInt4Kernel.h): the context of the kernel's Compute.
struct OrtRunner
{
    const Ort::KernelContext* context;
};

inline void ortParallelFor(void* runner, void (*fn)(void*, size_t), size_t count, void* arg)
{
    static_cast<OrtRunner*>(runner)->context->ParallelFor(fn, count, 0, arg); // 0: ONNX Runtime splits the tasks
}

//! qwen_vl::MatMulInt4 (matMulInt4Op.cpp) and qwen_vl::MatMulF32 (matMulF32Op.cpp).
const OrtCustomOp* matMulInt4Op();
const OrtCustomOp* matMulF32Op();

} // namespace qwen_vl
