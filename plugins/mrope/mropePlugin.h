// MRoPE (qwen_vl::MRoPE v1): multi-axis rotary embedding, one position axis per rotary frequency.
#pragma once

#include "common/pluginUtils.h"

#include <vector>

namespace qwen_vl
{

class MropePlugin final : public QwenPluginBase
{
public:
    static constexpr char kNAME[] = "MRoPE";
    static constexpr int32_t kIN_X_IDX = 0;         //!< [N..., H, D] fp32/fp16/bf16
    static constexpr int32_t kIN_POSITIONS_IDX = 1; //!< [N..., A] int32
    static constexpr int32_t kNB_INPUTS = 2;
    static constexpr int32_t kOUT_Y_IDX = 0; //!< [N..., H, D], dtype of x
    static constexpr int32_t kNB_OUTPUTS = 1;

    MropePlugin(std::vector<float> invFreq, std::vector<int32_t> axis);

    // IPluginV3
    nvinfer1::IPluginV3* clone() noexcept override;
    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kNAME; }
    // IPluginV3OneBuild (no CUDA calls in any of these)
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
    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    std::vector<float> mInvFreq; //!< [D/2] frequency of each rotary pair
    std::vector<int32_t> mAxis;  //!< [D/2] position axis feeding each frequency
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MropePluginCreator final : public QwenCreatorBase
{
public:
    MropePluginCreator();
    char const* getPluginName() const noexcept override { return MropePlugin::kNAME; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace qwen_vl
