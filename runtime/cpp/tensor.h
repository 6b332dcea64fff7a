// Host tensors: a dtype, a shape and the raw little-endian bytes (row-major). The runtime moves tensors of the
// export dtype (float32 / float16 / bfloat16) between graphs without looking inside them, so the element type is a
// tag, not a template parameter; typed access is checked (`as<T>()` throws on a dtype mismatch).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qvl
{

enum class DType
{
    kF32,
    kF16,
    kBF16,
    kF64,
    kI64,
    kI32,
    kBOOL,
    kU8
};

size_t dtypeSize(DType t);
std::string safetensorsName(DType t);          // "F32", "BF16", "I64", ...
DType fromSafetensorsName(std::string const& s); // throws UserError on an unknown name
std::string contractName(DType t);             // "float32", "bfloat16", "int64", ... (manifest / contracts)
DType fromContractName(std::string const& s);

struct Tensor
{
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;

    static Tensor zeros(DType dtype, std::vector<int64_t> shape);
    int64_t numel() const;
    std::string describe() const; // "int64 [2, 17]"

    template <typename T>
    T* as();
    template <typename T>
    T const* as() const;
};

using TensorMap = std::map<std::string, Tensor>;

template <typename T>
Tensor fromVector(std::vector<T> const& values, std::vector<int64_t> shape);

// Concatenate along `axis` (all other dims equal, same dtype; at least one part).
Tensor concat(std::vector<Tensor const*> const& parts, int axis);

} // namespace qvl
