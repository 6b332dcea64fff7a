// KVCacheAttention (qwen_vl::KVCacheAttention v1): one decoder step (prefill or decode) with an in-place KV cache.
#pragma once

#include "common/pluginUtils.h"

namespace qwen_vl
{

class KvCacheAttentionPlugin final : public QwenPluginBase
{
public:
    static constexpr char kNAME[] = "KVCacheAttention";
    static constexpr int32_t kIN_Q_IDX = 0;            //!< [B, S, Hq, D]
    static constexpr int32_t kIN_K_IDX = 1;            //!< [B, S, Hkv, D]
    static constexpr int32_t kIN_V_IDX = 2;            //!< [B, S, Hkv, D]
    static constexpr int32_t kIN_PAST_KEY_IDX = 3;     //!< [B, Hkv, C, D]
    static constexpr int32_t kIN_PAST_VALUE_IDX = 4;   //!< [B, Hkv, C, D]
    static constexpr int32_t kIN_PAST_LENGTHS_IDX = 5; //!< [B] int32
    static constexpr int32_t kNB_INPUTS = 6;
    static constexpr int32_t kOUT_IDX = 0;               //!< [B, S, Hq, D]
    static constexpr int32_t kOUT_PRESENT_KEY_IDX = 1;   //!< [B, Hkv, C, D], aliases past_key
    static constexpr int32_t kOUT_PRESENT_VALUE_IDX = 2; //!< [B, Hkv, C, D], aliases past_value
    static constexpr int32_t kNB_OUTPUTS = 3;

    explicit KvCacheAttentionPlugin(float scale);

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override { return kNAME; }
    int32_t getNbOutputs() const noexcept override { return kNB_OUTPUTS; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    //! present_key / present_value alias past_key / past_value: the cache is updated in place.
    int32_t getAliasedInput(int32_t outputIndex) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    float mScale;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class KvCacheAttentionPluginCreator final : public QwenCreatorBase
{
public:
    KvCacheAttentionPluginCreator();
    char const* getPluginName() const noexcept override { return KvCacheAttentionPlugin::kNAME; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace qwen_vl
