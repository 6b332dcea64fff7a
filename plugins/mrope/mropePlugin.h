// MRoPE (qwen_vl::MRoPE v1): multi-axis rotary embedding, one position axis per rotary frequency.
#pragma once

#include <NvInferRuntime.h>

namespace qwen_vl
{

//! The creator of MropePlugin (mropePlugin.cpp), listed by getCreators.
nvinfer1::IPluginCreatorV3One* mropePluginCreator();

} // namespace qwen_vl
