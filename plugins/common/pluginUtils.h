// Helpers for the IPluginV3 adapters: plugin identity, field parsing, dtype mapping (the base classes: pluginBase.h).
#pragma once

#include "common/checkMacros.h"
#include "common/kernelTypes.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

namespace qwen_vl
{

constexpr char kPLUGIN_NAMESPACE[] = "qwen_vl";
constexpr char kPLUGIN_VERSION[] = "1";

//! The field named `name` in `fc`, or nullptr.
nvinfer1::PluginField const* findField(nvinfer1::PluginFieldCollection const* fc, char const* name);
//! A float field as fp32 values (accepts kFLOAT32 / kFLOAT64 / kFLOAT16 as the ONNX parser or Python may send).
std::vector<float> readFloats(nvinfer1::PluginField const& f);
//! An integer field as int32 values (accepts kINT32 / kINT64 / kINT8).
std::vector<int32_t> readInts(nvinfer1::PluginField const& f);
//! Scalar fields: the float one is required, the int one falls back to `defaultValue` when absent or empty.
float readFloatScalar(nvinfer1::PluginFieldCollection const* fc, char const* name);
int32_t readIntScalar(nvinfer1::PluginFieldCollection const* fc, char const* name, int32_t defaultValue);

//! fp32 / fp16 / bf16 -> DataKind; throws for anything else.
DataKind toDataKind(nvinfer1::DataType t);
bool isAttentionFloat(nvinfer1::DataType t);

//! Product of dims [begin, end) of `d` (all dims must be known, as they are at enqueue time).
int64_t volume(nvinfer1::Dims const& d, int32_t begin, int32_t end);

} // namespace qwen_vl
