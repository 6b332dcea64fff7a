#include "tensor.h"

#include "errors.h"

#include <cstring>
#include <numeric>
#include <sstream>
#include <type_traits>

namespace qvl
{
namespace
{
struct DTypeRow
{
    DType t;
    size_t size;
    char const* st;
    char const* contract;
};
DTypeRow const kDTypes[] = {{DType::kF32, 4, "F32", "float32"}, {DType::kF16, 2, "F16", "float16"},
    {DType::kBF16, 2, "BF16", "bfloat16"}, {DType::kF64, 8, "F64", "float64"}, {DType::kI64, 8, "I64", "int64"},
    {DType::kI32, 4, "I32", "int32"}, {DType::kBOOL, 1, "BOOL", "bool"}, {DType::kU8, 1, "U8", "uint8"}};

DTypeRow const& row(DType t)
{
    for (auto const& r : kDTypes)
        if (r.t == t)
            return r;
    throw std::logic_error("unknown dtype");
}

template <typename T>
DType dtypeOf()
{
    if (std::is_same<T, float>::value)
        return DType::kF32;
    if (std::is_same<T, double>::value)
        return DType::kF64;
    if (std::is_same<T, int64_t>::value)
        return DType::kI64;
    if (std::is_same<T, int32_t>::value)
        return DType::kI32;
    if (std::is_same<T, uint8_t>::value)
        return DType::kU8;
    throw std::logic_error("no dtype for this C++ type");
}
} // namespace

size_t dtypeSize(DType t)
{
    return row(t).size;
}

std::string safetensorsName(DType t)
{
    return row(t).st;
}

std::string contractName(DType t)
{
    return row(t).contract;
}

DType fromSafetensorsName(std::string const& s)
{
    for (auto const& r : kDTypes)
        if (s == r.st)
            return r.t;
    throw UserError("unsupported safetensors dtype " + s);
}

DType fromContractName(std::string const& s)
{
    for (auto const& r : kDTypes)
        if (s == r.contract)
            return r.t;
    throw UserError("unsupported dtype " + s);
}

Tensor Tensor::zeros(DType dtype, std::vector<int64_t> shape)
{
    Tensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.bytes.assign(static_cast<size_t>(t.numel()) * dtypeSize(dtype), 0);
    return t;
}

int64_t Tensor::numel() const
{
    return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

std::string Tensor::describe() const
{
    std::ostringstream os;
    os << contractName(dtype) << " [";
    for (size_t i = 0; i < shape.size(); ++i)
        os << (i ? ", " : "") << shape[i];
    os << "]";
    return os.str();
}

template <typename T>
T* Tensor::as()
{
    if (dtype != dtypeOf<T>())
        throw std::logic_error("tensor accessed as the wrong type: " + describe());
    return reinterpret_cast<T*>(bytes.data());
}

template <typename T>
T const* Tensor::as() const
{
    if (dtype != dtypeOf<T>())
        throw std::logic_error("tensor accessed as the wrong type: " + describe());
    return reinterpret_cast<T const*>(bytes.data());
}

template <typename T>
Tensor fromVector(std::vector<T> const& values, std::vector<int64_t> shape)
{
    Tensor t = Tensor::zeros(dtypeOf<T>(), std::move(shape));
    if (static_cast<size_t>(t.numel()) != values.size())
        throw std::logic_error("fromVector: shape does not match the number of values");
    std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
    return t;
}

#define QVL_INSTANTIATE(T)                                                                                             \
    template T* Tensor::as<T>();                                                                                       \
    template T const* Tensor::as<T>() const;                                                                           \
    template Tensor fromVector<T>(std::vector<T> const&, std::vector<int64_t>);
QVL_INSTANTIATE(float)
QVL_INSTANTIATE(double)
QVL_INSTANTIATE(int64_t)
QVL_INSTANTIATE(int32_t)
QVL_INSTANTIATE(uint8_t)
#undef QVL_INSTANTIATE

Tensor concat(std::vector<Tensor const*> const& parts, int axis)
{
    if (parts.empty())
        throw std::logic_error("concat of nothing");
    Tensor out;
    out.dtype = parts[0]->dtype;
    out.shape = parts[0]->shape;
    out.shape[axis] = 0;
    for (auto const* p : parts)
        out.shape[axis] += p->shape[axis];
    out.bytes.resize(static_cast<size_t>(out.numel()) * dtypeSize(out.dtype));
    // outer = product of dims before `axis`; each part contributes a contiguous chunk per outer index
    int64_t outer = 1;
    for (int i = 0; i < axis; ++i)
        outer *= out.shape[i];
    size_t offset = 0;
    for (int64_t o = 0; o < outer; ++o)
    {
        for (auto const* p : parts)
        {
            size_t chunk = p->bytes.size() / static_cast<size_t>(outer);
            std::memcpy(out.bytes.data() + offset, p->bytes.data() + o * chunk, chunk);
            offset += chunk;
        }
    }
    return out;
}

} // namespace qvl
