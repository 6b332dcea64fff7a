// ONNX Runtime custom op qwen_vl::MatMulF32: a dense fp32 MatMul (B 2-D) or Gemm (transB = 1, no C, alpha 1) run by
// matMulF32Kernel.h on B as ONNX Runtime holds it (memory-mapped, not prepacked). A graph's node becomes this op by a
// change of domain and name, and for a Gemm the attribute transB (runtime/backends/ort_f32_kernel.py):
//   A      fp32 [..., K]                  (transB = 1: [M, K])
//   B      fp32 [K, N] (transB = 0)       or [N, K] (transB = 1)
//   Y      fp32 [..., N]
//   attributes  transB (0 or 1, default 0); Gemm's transA, alpha and beta must be their defaults (0, 1, any: no C).
#include "ortOps.h"

#include "matMulF32Kernel.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace qwen_vl
{
namespace
{

class MatMulF32Kernel
{
public:
    MatMulF32Kernel(const OrtApi& /*api*/, const OrtKernelInfo* info)
    {
        Ort::ConstKernelInfo kernelInfo(info);
        int64_t transB = 0;
        try
        {
            transB = kernelInfo.GetAttribute<int64_t>("transB");
        }
        catch (const Ort::Exception&) // absent: a MatMul
        {
            transB = 0;
        }
        if (transB != 0 && transB != 1)
        {
            throw std::invalid_argument("qwen_vl::MatMulF32: transB must be 0 or 1, not " + std::to_string(transB));
        }
        mTransposed = transB == 1;
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* rawContext)
    {
        return computeStatus(*this, rawContext);
    }

    void compute(OrtKernelContext* rawContext) const
    {
        Ort::KernelContext context(rawContext);
        const Ort::ConstValue a = context.GetInput(0);
        const Ort::ConstValue b = context.GetInput(1);
        std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
        const std::vector<int64_t> bShape = b.GetTensorTypeAndShapeInfo().GetShape();
        if (bShape.size() != 2 || shape.empty() || (mTransposed && shape.size() != 2))
        {
            throw std::invalid_argument("qwen_vl::MatMulF32: B must be 2-D, and A 2-D with transB = 1");
        }
        const int64_t k = mTransposed ? bShape[1] : bShape[0];
        const int64_t n = mTransposed ? bShape[0] : bShape[1];
        if (shape.back() != k)
        {
            throw std::invalid_argument("qwen_vl::MatMulF32: A's last dimension " + std::to_string(shape.back())
                + " does not match B's K=" + std::to_string(k));
        }
        int64_t m = 1;
        for (size_t i = 0; i + 1 < shape.size(); ++i)
        {
            m *= shape[i];
        }
        shape.back() = n;
        Ort::UnownedValue y = context.GetOutput(0, shape);
        if (m == 0 || n == 0)
        {
            return;
        }
        float* out = y.GetTensorMutableData<float>();
        if (k == 0)
        {
            std::fill(out, out + m * n, 0.0F);
            return;
        }
        const F32Product product{a.GetTensorData<float>(), out, m, b.GetTensorData<float>(), k, n, mTransposed};
        OrtRunner runner{&context};
        matMulF32(product, ortParallelFor, &runner);
    }

private:
    bool mTransposed{false};
};

struct MatMulF32Op : Ort::CustomOpBase<MatMulF32Op, MatMulF32Kernel, true>
{
    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const
    {
        return createKernel<MatMulF32Kernel>(api, info, kernel);
    }

    const char* GetName() const
    {
        return "MatMulF32";
    }

    size_t GetInputTypeCount() const
    {
        return 2;
    }

    ONNXTensorElementDataType GetInputType(size_t /*index*/) const
    {
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }

    size_t GetOutputTypeCount() const
    {
        return 1;
    }

    ONNXTensorElementDataType GetOutputType(size_t /*index*/) const
    {
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
};

} // namespace

const OrtCustomOp* matMulF32Op()
{
    static const MatMulF32Op op;
    return &op;
}

} // namespace qwen_vl

//! The kernel without ONNX Runtime, for tests: y [m, n] = x [m, k] @ W (W [k, n], or [n, k] when transposed), on the
//! calling thread; reference = 1 runs the scalar definition.
extern "C" __attribute__((visibility("default"))) void qwen_vl_matmul_f32(const float* x, float* y, int64_t m,
    const float* w, int64_t k, int64_t n, int transposed, int reference)
{
    const qwen_vl::F32Product product{x, y, m, w, k, n, transposed != 0};
    if (reference != 0)
    {
        qwen_vl::matMulF32Reference(product);
        return;
    }
    qwen_vl::matMulF32(product, qwen_vl::serialParallelFor, nullptr);
}
