// VarlenAttention plugin: fields, shape/type rules and enqueue; the IPluginV3 plumbing is common/pluginBase.h.
#include "varlenAttention/varlenAttentionPlugin.h"
#include "common/pluginBase.h"
#include "varlenAttention/varlenAttentionKernel.h"

#include <vector>

using namespace nvinfer1;

namespace qwen_vl
{
namespace
{

class VarlenAttentionPlugin final : public PluginBase<VarlenAttentionPlugin>
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

    VarlenAttentionPlugin(float scale, int32_t causal)
        : mScale(scale)
        , mCausal(causal != 0 ? 1 : 0)
    {
    }

    static std::vector<PluginField> fieldDeclarations()
    {
        return {PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
            PluginField("causal", nullptr, PluginFieldType::kINT32, 1)};
    }

    static VarlenAttentionPlugin fromFields(PluginFieldCollection const* fc)
    {
        return VarlenAttentionPlugin(readFloatScalar(fc, "scale"), readIntScalar(fc, "causal", 0));
    }

    std::vector<PluginField> fields()
    {
        return {PluginField("scale", &mScale, PluginFieldType::kFLOAT32, 1),
            PluginField("causal", &mCausal, PluginFieldType::kINT32, 1)};
    }

    void inferTypes(DataType* outputTypes, DataType const* inputTypes) const
    {
        outputTypes[kOUT_IDX] = inputTypes[kIN_Q_IDX];
    }

    void inferShapes(DimsExprs const* inputs, DimsExprs* outputs, IExprBuilder& exprBuilder) const
    {
        QWEN_VALIDATE(inputs[kIN_Q_IDX].nbDims == 3 && inputs[kIN_K_IDX].nbDims == 3 && inputs[kIN_V_IDX].nbDims == 3,
            "VarlenAttention: q, k, v must be [T, H, D]");
        QWEN_VALIDATE(inputs[kIN_CU_SEQLENS_IDX].nbDims == 1, "VarlenAttention: cu_seqlens must be 1-D");
        outputs[kOUT_IDX] = inputs[kIN_Q_IDX];
    }

    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const
    {
        DataType const t = inOut[pos].desc.type;
        switch (pos)
        {
        case kIN_Q_IDX: return isAttentionFloat(t);
        case kIN_K_IDX:
        case kIN_V_IDX:
        case kNB_INPUTS + kOUT_IDX: return t == inOut[kIN_Q_IDX].desc.type;
        case kIN_CU_SEQLENS_IDX: return t == DataType::kINT32;
        default: return false;
        }
    }

    void configure(DynamicPluginTensorDesc const* in) const
    {
        Dims const& q = in[kIN_Q_IDX].desc.dims;
        Dims const& k = in[kIN_K_IDX].desc.dims;
        int64_t const headDim = q.d[2];
        QWEN_VALIDATE(headDim == -1 || (headDim % 8 == 0 && headDim <= kMAX_HEAD_DIM),
            "VarlenAttention: head dim must be a multiple of 8 up to 256");
        QWEN_VALIDATE(q.d[1] == -1 || k.d[1] == -1 || (k.d[1] > 0 && q.d[1] % k.d[1] == 0),
            "VarlenAttention: Hq must be a multiple of Hkv");
    }

    int32_t launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
        cudaStream_t stream) const
    {
        Dims const& q = inputDesc[kIN_Q_IDX].dims;
        Dims const& k = inputDesc[kIN_K_IDX].dims;
        int32_t const nSegments = static_cast<int32_t>(inputDesc[kIN_CU_SEQLENS_IDX].dims.d[0]) - 1;
        return launchVarlenAttention(inputs[kIN_Q_IDX], inputs[kIN_K_IDX], inputs[kIN_V_IDX],
            static_cast<int32_t const*>(inputs[kIN_CU_SEQLENS_IDX]), nSegments, outputs[kOUT_IDX],
            toDataKind(inputDesc[kIN_Q_IDX].type), static_cast<int32_t>(q.d[0]), static_cast<int32_t>(q.d[1]),
            static_cast<int32_t>(k.d[1]), static_cast<int32_t>(q.d[2]), mScale, mCausal != 0, stream);
    }

private:
    float mScale;
    int32_t mCausal; //!< 0 or 1
};

} // namespace

IPluginCreatorV3One* varlenAttentionPluginCreator()
{
    static PluginCreator<VarlenAttentionPlugin> sCreator;
    return &sCreator;
}

} // namespace qwen_vl
