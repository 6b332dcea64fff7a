// What the ops of libqwen_vl_ort_kernels.so share: their domain, ONNX Runtime's parallel-for as the kernels take it,
// and the op objects RegisterCustomOps (ortRegister.cpp) adds to the domain.
// Built against the C/C++ API headers of ONNX Runtime 1.21 (API version 21): any later ONNX Runtime loads it.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstddef>
#include <exception>

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

//! The parallel-for of a kernel called without ONNX Runtime (the libraries' C entry points for tests): every task on
//! the calling thread, in order.
inline void serialParallelFor(void* /*runner*/, void (*fn)(void*, size_t), size_t count, void* arg)
{
    for (size_t i = 0; i < count; ++i)
    {
        fn(arg, i);
    }
}

//! An op's CreateKernelV2: a new Kernel(api, info), or its constructor's exception as ORT_INVALID_ARGUMENT.
template <typename Kernel>
OrtStatusPtr createKernel(const OrtApi& api, const OrtKernelInfo* info, void** kernel)
{
    try
    {
        *kernel = new Kernel(api, info);
        return nullptr;
    }
    catch (const std::exception& e)
    {
        return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
}

//! A kernel's ComputeV2: compute(context), or its exception as ORT_RUNTIME_EXCEPTION.
template <typename Kernel>
OrtStatusPtr computeStatus(const Kernel& kernel, OrtKernelContext* context)
{
    try
    {
        kernel.compute(context);
        return nullptr;
    }
    catch (const std::exception& e)
    {
        return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
}

//! qwen_vl::MatMulInt4 (matMulInt4Op.cpp) and qwen_vl::MatMulF32 (matMulF32Op.cpp).
const OrtCustomOp* matMulInt4Op();
const OrtCustomOp* matMulF32Op();

} // namespace qwen_vl
