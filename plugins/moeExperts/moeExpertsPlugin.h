// MoEExperts (qwen_vl::MoEExperts v1): routed MoE experts on stacked FP8 / INT4 weights with block scales.
#pragma once

#include <NvInferRuntime.h>

namespace qwen_vl
{

//! The creator of MoeExpertsPlugin (moeExpertsPlugin.cpp), listed by getCreators.
nvinfer1::IPluginCreatorV3One* moeExpertsPluginCreator();

} // namespace qwen_vl
