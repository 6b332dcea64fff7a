// KVCacheAttention (qwen_vl::KVCacheAttention v1): one decoder step (prefill or decode) with an in-place KV cache.
#pragma once

#include <NvInferRuntime.h>

namespace qwen_vl
{

//! The creator of KvCacheAttentionPlugin (kvCacheAttentionPlugin.cpp), listed by getCreators.
nvinfer1::IPluginCreatorV3One* kvCacheAttentionPluginCreator();

} // namespace qwen_vl
