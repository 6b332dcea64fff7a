#include "kvCacheAttention/kvCacheAttentionPlugin.h"
#include "kvCacheAttention/kvCacheAttentionKernel.h"

using namespace nvinfer1;

namespace qwen_vl
{

KvCacheAttentionPlugin::KvCacheAttentionPlugin(float scale)
    : mScale(scale)
{
}

IPluginV3* KvCacheAttentionPlugin::clone() noexcept
{
    try
    {
        return new KvCacheAttentionPlugin(mScale);
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

int32_t KvCacheAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    outputTypes[kOUT_IDX] = inputTypes[kIN_Q_IDX];
    outputTypes[kOUT_PRESENT_KEY_IDX] = inputTypes[kIN_PAST_KEY_IDX];
    outputTypes[kOUT_PRESENT_VALUE_IDX] = inputTypes[kIN_PAST_VALUE_IDX];
    return 0;
}

int32_t KvCacheAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* shapeInputs, int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        QWEN_VALIDATE(nbInputs == kNB_INPUTS && nbOutputs == kNB_OUTPUTS, "KVCacheAttention: expects 6 inputs, 3 outputs");
        for (int32_t i : {kIN_Q_IDX, kIN_K_IDX, kIN_V_IDX, kIN_PAST_KEY_IDX, kIN_PAST_VALUE_IDX})
        {
            QWEN_VALIDATE(inputs[i].nbDims == 4, "KVCacheAttention: q, k, v, past_key, past_value must be 4-D");
        }
        QWEN_VALIDATE(inputs[kIN_PAST_LENGTHS_IDX].nbDims == 1, "KVCacheAttention: past_lengths must be [B]");
        outputs[kOUT_IDX] = inputs[kIN_Q_IDX];
        outputs[kOUT_PRESENT_KEY_IDX] = inputs[kIN_PAST_KEY_IDX];
        outputs[kOUT_PRESENT_VALUE_IDX] = inputs[kIN_PAST_VALUE_IDX];
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

bool KvCacheAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == kIN_Q_IDX)
    {
        return isAttentionFloat(d.type);
    }
    if (pos == kIN_PAST_LENGTHS_IDX)
    {
        return d.type == DataType::kINT32;
    }
    return pos < nbInputs + nbOutputs && d.type == inOut[kIN_Q_IDX].desc.type;
}

int32_t KvCacheAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        Dims const& q = in[kIN_Q_IDX].desc.dims;
        Dims const& k = in[kIN_K_IDX].desc.dims;
        Dims const& pk = in[kIN_PAST_KEY_IDX].desc.dims;
        QWEN_VALIDATE(q.d[3] == -1 || (q.d[3] % 8 == 0 && q.d[3] <= kMAX_HEAD_DIM),
            "KVCacheAttention: head dim must be a multiple of 8 up to 256");
        QWEN_VALIDATE(q.d[2] == -1 || k.d[2] == -1 || (k.d[2] > 0 && q.d[2] % k.d[2] == 0),
            "KVCacheAttention: Hq must be a multiple of Hkv");
        QWEN_VALIDATE(pk.d[1] == -1 || k.d[2] == -1 || pk.d[1] == k.d[2], "KVCacheAttention: past_key heads != Hkv");
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

int32_t KvCacheAttentionPlugin::getAliasedInput(int32_t outputIndex) noexcept
{
    switch (outputIndex)
    {
    case kOUT_PRESENT_KEY_IDX: return kIN_PAST_KEY_IDX;
    case kOUT_PRESENT_VALUE_IDX: return kIN_PAST_VALUE_IDX;
    default: return -1;
    }
}

int32_t KvCacheAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims const& q = inputDesc[kIN_Q_IDX].dims;
        Dims const& k = inputDesc[kIN_K_IDX].dims;
        Dims const& pk = inputDesc[kIN_PAST_KEY_IDX].dims;
        int32_t const status = launchKvCacheAttention(inputs[kIN_Q_IDX], inputs[kIN_K_IDX], inputs[kIN_V_IDX],
            inputs[kIN_PAST_KEY_IDX], inputs[kIN_PAST_VALUE_IDX],
            static_cast<int32_t const*>(inputs[kIN_PAST_LENGTHS_IDX]), outputs[kOUT_IDX], outputs[kOUT_PRESENT_KEY_IDX],
            outputs[kOUT_PRESENT_VALUE_IDX], toDataKind(inputDesc[kIN_Q_IDX].type), static_cast<int32_t>(q.d[0]),
            static_cast<int32_t>(q.d[1]), static_cast<int32_t>(q.d[2]), static_cast<int32_t>(k.d[2]),
            static_cast<int32_t>(pk.d[2]), static_cast<int32_t>(q.d[3]), mScale, stream);
        QWEN_VALIDATE(status == 0, "KVCacheAttention: kernel launch failed with status " + std::to_string(status));
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

PluginFieldCollection const* KvCacheAttentionPlugin::getFieldsToSerialize() noexcept
{
    mFields = {PluginField("scale", &mScale, PluginFieldType::kFLOAT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

KvCacheAttentionPluginCreator::KvCacheAttentionPluginCreator()
{
    mFields = {PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* KvCacheAttentionPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        return new KvCacheAttentionPlugin(readFloatScalar(fc, "scale"));
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

} // namespace qwen_vl
