#include "common/pluginUtils.h"

#include <cuda_fp16.h>

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

std::vector<float> readFloats(PluginField const& f)
{
    std::vector<float> v(static_cast<size_t>(f.length));
    for (int32_t i = 0; i < f.length; ++i)
    {
        switch (f.type)
        {
        case PluginFieldType::kFLOAT32: v[i] = static_cast<float const*>(f.data)[i]; break;
        case PluginFieldType::kFLOAT64: v[i] = static_cast<float>(static_cast<double const*>(f.data)[i]); break;
        case PluginFieldType::kFLOAT16: v[i] = __half2float(static_cast<__half const*>(f.data)[i]); break;
        default: throw PluginError(std::string("field ") + f.name + ": expected floats");
        }
    }
    return v;
}

std::vector<int32_t> readInts(PluginField const& f)
{
    std::vector<int32_t> v(static_cast<size_t>(f.length));
    for (int32_t i = 0; i < f.length; ++i)
    {
        switch (f.type)
        {
        case PluginFieldType::kINT32: v[i] = static_cast<int32_t const*>(f.data)[i]; break;
        case PluginFieldType::kINT64: v[i] = static_cast<int32_t>(static_cast<int64_t const*>(f.data)[i]); break;
        case PluginFieldType::kINT8: v[i] = static_cast<int8_t const*>(f.data)[i]; break;
        default: throw PluginError(std::string("field ") + f.name + ": expected ints");
        }
    }
    return v;
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

IPluginCapability* QwenPluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

} // namespace qwen_vl
