#include "varlenAttention/varlenAttentionPlugin.h"
#include "varlenAttention/varlenAttentionKernel.h"

using namespace nvinfer1;

namespace qwen_vl
{

VarlenAttentionPlugin::VarlenAttentionPlugin(float scale, int32_t causal)
    : mScale(scale)
    , mCausal(causal != 0 ? 1 : 0)
{
}

IPluginV3* VarlenAttentionPlugin::clone() noexcept
{
    try
    {
        return new VarlenAttentionPlugin(mScale, mCausal);
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

int32_t VarlenAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    outputTypes[kOUT_IDX] = inputTypes[kIN_Q_IDX];
    return 0;
}

int32_t VarlenAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    try
    {
        QWEN_VALIDATE(nbInputs == kNB_INPUTS && nbOutputs == kNB_OUTPUTS, "VarlenAttention: expects 4 inputs, 1 output");
        QWEN_VALIDATE(inputs[kIN_Q_IDX].nbDims == 3 && inputs[kIN_K_IDX].nbDims == 3 && inputs[kIN_V_IDX].nbDims == 3,
            "VarlenAttention: q, k, v must be [T, H, D]");
        QWEN_VALIDATE(inputs[kIN_CU_SEQLENS_IDX].nbDims == 1, "VarlenAttention: cu_seqlens must be 1-D");
        outputs[kOUT_IDX] = inputs[kIN_Q_IDX];
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

bool VarlenAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kIN_Q_IDX: return isAttentionFloat(d.type);
    case kIN_K_IDX:
    case kIN_V_IDX:
    case kNB_INPUTS + kOUT_IDX: return d.type == inOut[kIN_Q_IDX].desc.type;
    case kIN_CU_SEQLENS_IDX: return d.type == DataType::kINT32;
    default: return false;
    }
}

int32_t VarlenAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        Dims const& q = in[kIN_Q_IDX].desc.dims;
        Dims const& k = in[kIN_K_IDX].desc.dims;
        int64_t const headDim = q.d[2];
        QWEN_VALIDATE(headDim == -1 || (headDim % 8 == 0 && headDim <= kMAX_HEAD_DIM),
            "VarlenAttention: head dim must be a multiple of 8 up to 256");
        QWEN_VALIDATE(q.d[1] == -1 || k.d[1] == -1 || (k.d[1] > 0 && q.d[1] % k.d[1] == 0),
            "VarlenAttention: Hq must be a multiple of Hkv");
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

int32_t VarlenAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims const& q = inputDesc[kIN_Q_IDX].dims;
        Dims const& k = inputDesc[kIN_K_IDX].dims;
        int32_t const nSegments = static_cast<int32_t>(inputDesc[kIN_CU_SEQLENS_IDX].dims.d[0]) - 1;
        int32_t const status = launchVarlenAttention(inputs[kIN_Q_IDX], inputs[kIN_K_IDX], inputs[kIN_V_IDX],
            static_cast<int32_t const*>(inputs[kIN_CU_SEQLENS_IDX]), nSegments, outputs[kOUT_IDX],
            toDataKind(inputDesc[kIN_Q_IDX].type), static_cast<int32_t>(q.d[0]), static_cast<int32_t>(q.d[1]),
            static_cast<int32_t>(k.d[1]), static_cast<int32_t>(q.d[2]), mScale, mCausal != 0, stream);
        QWEN_VALIDATE(status == 0, "VarlenAttention: kernel launch failed with status " + std::to_string(status));
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

PluginFieldCollection const* VarlenAttentionPlugin::getFieldsToSerialize() noexcept
{
    mFields = {PluginField("scale", &mScale, PluginFieldType::kFLOAT32, 1),
        PluginField("causal", &mCausal, PluginFieldType::kINT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

VarlenAttentionPluginCreator::VarlenAttentionPluginCreator()
{
    mFields = {PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("causal", nullptr, PluginFieldType::kINT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* VarlenAttentionPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        return new VarlenAttentionPlugin(readFloatScalar(fc, "scale"), readIntScalar(fc, "causal", 0));
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

} // namespace qwen_vl
