// ONNX Runtime custom op qwen_vl::MatMulInt4: MatMulNBits (bits 4, fp32 activations) run by matMulInt4Kernel.h.
//
// Inputs and attributes are MatMulNBits's own (com.microsoft, onnxruntime ContribOperators.md), so a graph's
// MatMulNBits node becomes this op by a change of domain and name (runtime/backends/ort_int4_kernel.py):
//   A           fp32  [..., K]
//   B           uint8 [N, K / block_size, block_size / 2]
//   scales      fp32  [N * K / block_size] (or [N, K / block_size])
//   zero_points uint8 [N * ceil(K / block_size / 2)], optional (absent: 8)
//   Y           fp32  [..., N]
//   attributes  K, N, bits (4), block_size (a multiple of 32 for the vectorized kernel); accuracy_level is ignored:
//               the activations stay fp32.
#include "ortOps.h"

#include "matMulInt4Kernel.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace qwen_vl
{
namespace
{

class MatMulInt4Kernel
{
public:
    MatMulInt4Kernel(const OrtApi& /*api*/, const OrtKernelInfo* info)
    {
        Ort::ConstKernelInfo kernelInfo(info);
        mK = kernelInfo.GetAttribute<int64_t>("K");
        mN = kernelInfo.GetAttribute<int64_t>("N");
        mBlock = kernelInfo.GetAttribute<int64_t>("block_size");
        const int64_t bits = kernelInfo.GetAttribute<int64_t>("bits");
        if (bits != 4 || mBlock < 16 || (mBlock & (mBlock - 1)) != 0 || mK <= 0 || mN <= 0 || mK % mBlock != 0)
        {
            throw std::invalid_argument("qwen_vl::MatMulInt4: needs bits 4, a power-of-two block_size >= 16 and K a "
                                        "multiple of it (K="
                + std::to_string(mK) + ", N=" + std::to_string(mN) + ", bits=" + std::to_string(bits)
                + ", block_size=" + std::to_string(mBlock) + ")");
        }
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
        const Ort::ConstValue scales = context.GetInput(2);
        const Ort::ConstValue zeroPoints
            = context.GetInputCount() > 3 ? context.GetInput(3) : Ort::ConstValue{nullptr};
        std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
        if (shape.empty() || shape.back() != mK)
        {
            throw std::invalid_argument("qwen_vl::MatMulInt4: A's last dimension must be K=" + std::to_string(mK));
        }
        const int64_t blocks = mK / mBlock;
        const size_t packedBytes = static_cast<size_t>(mN * blocks * (mBlock / 2));
        if (b.GetTensorTypeAndShapeInfo().GetElementCount() != packedBytes
            || scales.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(mN * blocks))
        {
            throw std::invalid_argument("qwen_vl::MatMulInt4: B or scales do not match K, N and block_size");
        }
        if (zeroPoints != nullptr
            && zeroPoints.GetTensorTypeAndShapeInfo().GetElementCount()
                != static_cast<size_t>(mN * ((blocks + 1) / 2)))
        {
            throw std::invalid_argument("qwen_vl::MatMulInt4: zero_points must be [N * ceil(K / block_size / 2)]");
        }
        int64_t m = 1;
        for (size_t i = 0; i + 1 < shape.size(); ++i)
        {
            m *= shape[i];
        }
        shape.back() = mN;
        Ort::UnownedValue y = context.GetOutput(0, shape);
        if (m == 0)
        {
            return;
        }
        const Int4Product product{a.GetTensorData<float>(), y.GetTensorMutableData<float>(), m,
            Int4Weight{b.GetTensorData<uint8_t>(), scales.GetTensorData<float>(),
                zeroPoints != nullptr ? zeroPoints.GetTensorData<uint8_t>() : nullptr, mN, mK, mBlock}};
        OrtRunner runner{&context};
        matMulInt4(product, ortParallelFor, &runner);
    }

private:
    int64_t mK{0};
    int64_t mN{0};
    int64_t mBlock{0};
};

struct MatMulInt4Op : Ort::CustomOpBase<MatMulInt4Op, MatMulInt4Kernel, true>
{
    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const
    {
        return createKernel<MatMulInt4Kernel>(api, info, kernel);
    }

    const char* GetName() const
    {
        return "MatMulInt4";
    }

    size_t GetInputTypeCount() const
    {
        return 4;
    }

    ONNXTensorElementDataType GetInputType(size_t index) const
    {
        return (index == 0 || index == 2) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    }

    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const
    {
        return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
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

const OrtCustomOp* matMulInt4Op()
{
    static const MatMulInt4Op op;
    return &op;
}

} // namespace qwen_vl

//! 1 when MatMulInt4 runs its AVX-512 kernels on this CPU, 0 when it falls back to the scalar reference.
extern "C" __attribute__((visibility("default"))) int qwen_vl_matmul_int4_vectorized()
{
    return qwen_vl::matMulInt4Vectorized() ? 1 : 0;
}

//! The kernel without ONNX Runtime, for tests and bench/bench_matmulnbits.py: y [m, n] = x [m, k] @ dequant(W),
//! on the calling thread. zero_points may be null. Returns 0, or -1 for a block size it cannot run.
extern "C" __attribute__((visibility("default"))) int qwen_vl_matmul_int4(const float* x, float* y, int64_t m,
    const uint8_t* packed, const float* scales, const uint8_t* zeroPoints, int64_t n, int64_t k, int64_t block,
    int reference)
{
    if (block < 16 || k % block != 0)
    {
        return -1;
    }
    const qwen_vl::Int4Product product{x, y, m, qwen_vl::Int4Weight{packed, scales, zeroPoints, n, k, block}};
    if (reference != 0)
    {
        qwen_vl::matMulInt4Reference(product);
        return 0;
    }
    qwen_vl::matMulInt4(product, qwen_vl::serialParallelFor, nullptr);
    return 0;
}
