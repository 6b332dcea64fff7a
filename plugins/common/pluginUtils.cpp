#include "common/pluginUtils.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <initializer_list>

using namespace nvinfer1;

namespace qwen_vl
{

PluginField const* findField(PluginFieldCollection const* fc, char const* name)
{
    if (fc == nullptr)
    {
        return nullptr;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, name) == 0)
        {
            return &fc->fields[i];
        }
    }
    return nullptr;
}

namespace
{

//! Element i of `f`, stored as one of the numeric field types, cast to T.
template <typename T>
T element(PluginField const& f, int32_t i)
{
    switch (f.type)
    {
    case PluginFieldType::kFLOAT32: return static_cast<T>(static_cast<float const*>(f.data)[i]);
    case PluginFieldType::kFLOAT64: return static_cast<T>(static_cast<double const*>(f.data)[i]);
    case PluginFieldType::kFLOAT16: return static_cast<T>(__half2float(static_cast<__half const*>(f.data)[i]));
    case PluginFieldType::kINT32: return static_cast<T>(static_cast<int32_t const*>(f.data)[i]);
    case PluginFieldType::kINT64: return static_cast<T>(static_cast<int64_t const*>(f.data)[i]);
    case PluginFieldType::kINT8: return static_cast<T>(static_cast<int8_t const*>(f.data)[i]);
    default: return T{};
    }
}

//! The values of `f` as T when its type is one of `accepted`; otherwise throws "field <name>: expected <what>".
template <typename T>
std::vector<T> readValues(PluginField const& f, std::initializer_list<PluginFieldType> accepted, char const* what)
{
    std::vector<T> v(static_cast<size_t>(f.length));
    for (int32_t i = 0; i < f.length; ++i)
    {
        if (std::find(accepted.begin(), accepted.end(), f.type) == accepted.end())
        {
            throw PluginError(std::string("field ") + f.name + ": expected " + what);
        }
        v[i] = element<T>(f, i);
    }
    return v;
}

} // namespace

std::vector<float> readFloats(PluginField const& f)
{
    return readValues<float>(f, {PluginFieldType::kFLOAT32, PluginFieldType::kFLOAT64, PluginFieldType::kFLOAT16},
        "floats");
}

std::vector<int32_t> readInts(PluginField const& f)
{
    return readValues<int32_t>(f, {PluginFieldType::kINT32, PluginFieldType::kINT64, PluginFieldType::kINT8}, "ints");
}

float readFloatScalar(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* f = findField(fc, name);
    QWEN_VALIDATE(f != nullptr && f->length >= 1, std::string("missing float field ") + name);
    return readFloats(*f)[0];
}

int32_t readIntScalar(PluginFieldCollection const* fc, char const* name, int32_t defaultValue)
{
    PluginField const* f = findField(fc, name);
    if (f == nullptr || f->length < 1)
    {
        return defaultValue;
    }
    return readInts(*f)[0];
}

DataKind toDataKind(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return DataKind::kFLOAT32;
    case DataType::kHALF: return DataKind::kFLOAT16;
    case DataType::kBF16: return DataKind::kBFLOAT16;
    default: throw PluginError("unsupported data type (expected float32, float16 or bfloat16)");
    }
}

bool isAttentionFloat(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

int64_t volume(Dims const& d, int32_t begin, int32_t end)
{
    int64_t v = 1;
    for (int32_t i = begin; i < end; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

} // namespace qwen_vl
