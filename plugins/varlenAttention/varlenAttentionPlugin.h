// VarlenAttention (qwen_vl::VarlenAttention v1): packed-token attention within cu_seqlens segments, GQA.
#pragma once

#include <NvInferRuntime.h>

namespace qwen_vl
{

//! The creator of VarlenAttentionPlugin (varlenAttentionPlugin.cpp), listed by getCreators.
nvinfer1::IPluginCreatorV3One* varlenAttentionPluginCreator();

} // namespace qwen_vl
