// VarlenAttention (qwen_vl::VarlenAttention v1): packed-token attention within cu_seqlens segments, GQA.
#pragma once

#include "common/pluginUtils.h"

namespace qwen_vl
{

class VarlenAttentionPlugin final : public QwenPluginBase
{
public:
    static constexpr char kNAME[] = "VarlenAttention";
    static constexpr int32_t kIN_Q_IDX = 0;          //!< [T, Hq, D]
    static constexpr int32_t kIN_K_IDX = 1;          //!< [T, Hkv, D]
    static constexpr int32_t kIN_V_IDX = 2;          //!< [T, Hkv, D]
    static constexpr int32_t kIN_CU_SEQLENS_IDX = 3; //!< [n + 1] int32
    static constexpr int32_t kNB_INPUTS = 4;
    static constexpr int32_t kOUT_IDX = 0; //!< [T, Hq, D]
    static constexpr int32_t kNB_OUTPUTS = 1;

    VarlenAttentionPlugin(float scale, int32_t causal);

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
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    float mScale;
    int32_t mCausal;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class VarlenAttentionPluginCreator final : public QwenCreatorBase
{
public:
    VarlenAttentionPluginCreator();
    char const* getPluginName() const noexcept override { return VarlenAttentionPlugin::kNAME; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace qwen_vl
