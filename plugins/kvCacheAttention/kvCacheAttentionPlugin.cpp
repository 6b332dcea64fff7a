// KVCacheAttention plugin: fields, shape/type rules, aliasing and enqueue; the IPluginV3 plumbing is
// common/pluginBase.h.
#include "kvCacheAttention/kvCacheAttentionPlugin.h"
#include "common/pluginBase.h"
#include "kvCacheAttention/kvCacheAttentionKernel.h"

#include <vector>

using namespace nvinfer1;

namespace qwen_vl
{
namespace
{

class KvCacheAttentionPlugin final : public PluginBase<KvCacheAttentionPlugin>
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

    explicit KvCacheAttentionPlugin(float scale)
        : mScale(scale)
    {
    }

    static std::vector<PluginField> fieldDeclarations()
    {
        return {PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1)};
    }

    static KvCacheAttentionPlugin fromFields(PluginFieldCollection const* fc)
    {
        return KvCacheAttentionPlugin(readFloatScalar(fc, "scale"));
    }

    std::vector<PluginField> fields()
    {
        return {PluginField("scale", &mScale, PluginFieldType::kFLOAT32, 1)};
    }

    void inferTypes(DataType* outputTypes, DataType const* inputTypes) const
    {
        outputTypes[kOUT_IDX] = inputTypes[kIN_Q_IDX];
        outputTypes[kOUT_PRESENT_KEY_IDX] = inputTypes[kIN_PAST_KEY_IDX];
        outputTypes[kOUT_PRESENT_VALUE_IDX] = inputTypes[kIN_PAST_VALUE_IDX];
    }

    void inferShapes(DimsExprs const* inputs, DimsExprs* outputs, IExprBuilder& exprBuilder) const
    {
        for (int32_t i : {kIN_Q_IDX, kIN_K_IDX, kIN_V_IDX, kIN_PAST_KEY_IDX, kIN_PAST_VALUE_IDX})
        {
            QWEN_VALIDATE(inputs[i].nbDims == 4, "KVCacheAttention: q, k, v, past_key, past_value must be 4-D");
        }
        QWEN_VALIDATE(inputs[kIN_PAST_LENGTHS_IDX].nbDims == 1, "KVCacheAttention: past_lengths must be [B]");
        outputs[kOUT_IDX] = inputs[kIN_Q_IDX];
        outputs[kOUT_PRESENT_KEY_IDX] = inputs[kIN_PAST_KEY_IDX];
        outputs[kOUT_PRESENT_VALUE_IDX] = inputs[kIN_PAST_VALUE_IDX];
    }

    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const
    {
        DataType const t = inOut[pos].desc.type;
        if (pos == kIN_Q_IDX)
        {
            return isAttentionFloat(t);
        }
        if (pos == kIN_PAST_LENGTHS_IDX)
        {
            return t == DataType::kINT32;
        }
        return pos < nbInputs + nbOutputs && t == inOut[kIN_Q_IDX].desc.type;
    }

    void configure(DynamicPluginTensorDesc const* in) const
    {
        Dims const& q = in[kIN_Q_IDX].desc.dims;
        Dims const& k = in[kIN_K_IDX].desc.dims;
        Dims const& pk = in[kIN_PAST_KEY_IDX].desc.dims;
        QWEN_VALIDATE(q.d[3] == -1 || (q.d[3] % 8 == 0 && q.d[3] <= kMAX_HEAD_DIM),
            "KVCacheAttention: head dim must be a multiple of 8 up to 256");
        QWEN_VALIDATE(q.d[2] == -1 || k.d[2] == -1 || (k.d[2] > 0 && q.d[2] % k.d[2] == 0),
            "KVCacheAttention: Hq must be a multiple of Hkv");
        QWEN_VALIDATE(pk.d[1] == -1 || k.d[2] == -1 || pk.d[1] == k.d[2], "KVCacheAttention: past_key heads != Hkv");
    }

    //! present_key / present_value alias past_key / past_value: the cache is updated in place.
    int32_t getAliasedInput(int32_t outputIndex) noexcept override
    {
        switch (outputIndex)
        {
        case kOUT_PRESENT_KEY_IDX: return kIN_PAST_KEY_IDX;
        case kOUT_PRESENT_VALUE_IDX: return kIN_PAST_VALUE_IDX;
        default: return -1;
        }
    }

    int32_t launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
        cudaStream_t stream) const
    {
        Dims const& q = inputDesc[kIN_Q_IDX].dims;
        Dims const& k = inputDesc[kIN_K_IDX].dims;
        Dims const& pk = inputDesc[kIN_PAST_KEY_IDX].dims;
        return launchKvCacheAttention(inputs[kIN_Q_IDX], inputs[kIN_K_IDX], inputs[kIN_V_IDX],
            inputs[kIN_PAST_KEY_IDX], inputs[kIN_PAST_VALUE_IDX],
            static_cast<int32_t const*>(inputs[kIN_PAST_LENGTHS_IDX]), outputs[kOUT_IDX], outputs[kOUT_PRESENT_KEY_IDX],
            outputs[kOUT_PRESENT_VALUE_IDX], toDataKind(inputDesc[kIN_Q_IDX].type), static_cast<int32_t>(q.d[0]),
            static_cast<int32_t>(q.d[1]), static_cast<int32_t>(q.d[2]), static_cast<int32_t>(k.d[2]),
            static_cast<int32_t>(pk.d[2]), static_cast<int32_t>(q.d[3]), mScale, stream);
    }

private:
    float mScale;
};

} // namespace

IPluginCreatorV3One* kvCacheAttentionPluginCreator()
{
    static PluginCreator<KvCacheAttentionPlugin> sCreator;
    return &sCreator;
}

} // namespace qwen_vl
