// MoEExperts plugin: fields, shape/type rules, workspace and enqueue; the IPluginV3 plumbing is common/pluginBase.h.
#include "moeExperts/moeExpertsPlugin.h"
#include "common/pluginBase.h"
#include "moeExperts/moeExpertsKernel.h"

#include <vector>

using namespace nvinfer1;

namespace qwen_vl
{
namespace
{

class MoeExpertsPlugin final : public PluginBase<MoeExpertsPlugin>
{
public:
    static constexpr char kNAME[] = "MoEExperts";
    static constexpr int32_t kIN_X_IDX = 0;             //!< [N, C] fp32/fp16/bf16
    static constexpr int32_t kIN_IDS_IDX = 1;           //!< [A] int32 expert of each assignment (A = N * top_k)
    static constexpr int32_t kIN_WEIGHTS_IDX = 2;       //!< [A] routing weight, dtype of x
    static constexpr int32_t kIN_GATE_UP_IDX = 3;       //!< [E, C, 2I] FP8 or INT4
    static constexpr int32_t kIN_GATE_UP_SCALE_IDX = 4; //!< [E, ceil(C / gate_up_block_size), 2I], dtype of x
    static constexpr int32_t kIN_DOWN_IDX = 5;          //!< [E, I, C], type of gate_up
    static constexpr int32_t kIN_DOWN_SCALE_IDX = 6;    //!< [E, ceil(I / down_block_size), C], dtype of x
    static constexpr int32_t kNB_INPUTS = 7;
    static constexpr int32_t kOUT_Y_IDX = 0; //!< [N, C], dtype of x
    static constexpr int32_t kNB_OUTPUTS = 1;

    MoeExpertsPlugin(int32_t topK, int32_t gateUpBlock, int32_t downBlock)
        : mTopK(topK)
        , mGateUpBlock(gateUpBlock)
        , mDownBlock(downBlock)
    {
        QWEN_VALIDATE(mTopK > 0, "MoEExperts: top_k must be positive");
        QWEN_VALIDATE(mGateUpBlock > 0 && mDownBlock > 0, "MoEExperts: block sizes must be positive");
    }

    static std::vector<PluginField> fieldDeclarations()
    {
        return {PluginField("top_k", nullptr, PluginFieldType::kINT32, 0),
            PluginField("gate_up_block_size", nullptr, PluginFieldType::kINT32, 0),
            PluginField("down_block_size", nullptr, PluginFieldType::kINT32, 0)};
    }

    static MoeExpertsPlugin fromFields(PluginFieldCollection const* fc)
    {
        return MoeExpertsPlugin(readIntScalar(fc, "top_k", 0), readIntScalar(fc, "gate_up_block_size", 0),
            readIntScalar(fc, "down_block_size", 0));
    }

    std::vector<PluginField> fields()
    {
        return {PluginField("top_k", &mTopK, PluginFieldType::kINT32, 1),
            PluginField("gate_up_block_size", &mGateUpBlock, PluginFieldType::kINT32, 1),
            PluginField("down_block_size", &mDownBlock, PluginFieldType::kINT32, 1)};
    }

    void inferTypes(DataType* outputTypes, DataType const* inputTypes) const
    {
        outputTypes[kOUT_Y_IDX] = inputTypes[kIN_X_IDX];
    }

    void inferShapes(DimsExprs const* inputs, DimsExprs* outputs, IExprBuilder& exprBuilder) const
    {
        QWEN_VALIDATE(inputs[kIN_X_IDX].nbDims == 2, "MoEExperts: x must be [N, C]");
        QWEN_VALIDATE(inputs[kIN_IDS_IDX].nbDims == 1 && inputs[kIN_WEIGHTS_IDX].nbDims == 1,
            "MoEExperts: ids and weights must be [A]");
        for (int32_t i : {kIN_GATE_UP_IDX, kIN_GATE_UP_SCALE_IDX, kIN_DOWN_IDX, kIN_DOWN_SCALE_IDX})
        {
            QWEN_VALIDATE(inputs[i].nbDims == 3, "MoEExperts: expert weights and scales must be [E, K, N]");
        }
        outputs[kOUT_Y_IDX] = inputs[kIN_X_IDX];
    }

    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const
    {
        DataType const t = inOut[pos].desc.type;
        DataType const x = inOut[kIN_X_IDX].desc.type;
        switch (pos)
        {
        case kIN_X_IDX: return isAttentionFloat(t);
        case kIN_IDS_IDX: return t == DataType::kINT32;
        case kIN_GATE_UP_IDX: return t == DataType::kFP8 || t == DataType::kINT4;
        case kIN_DOWN_IDX: return t == inOut[kIN_GATE_UP_IDX].desc.type;
        case kIN_WEIGHTS_IDX:
        case kIN_GATE_UP_SCALE_IDX:
        case kIN_DOWN_SCALE_IDX:
        case kNB_INPUTS + kOUT_Y_IDX: return t == x;
        default: return false;
        }
    }

    void configure(DynamicPluginTensorDesc const* in) const
    {
        Dims const& x = in[kIN_X_IDX].desc.dims;
        Dims const& gu = in[kIN_GATE_UP_IDX].desc.dims;
        Dims const& dn = in[kIN_DOWN_IDX].desc.dims;
        auto known = [](int64_t a, int64_t b) { return a == -1 || b == -1 || a == b; };
        QWEN_VALIDATE(known(gu.d[1], x.d[1]) && known(dn.d[2], x.d[1]),
            "MoEExperts: gate_up must be [E, C, 2I] and down [E, I, C] with C = x.shape[1]");
        QWEN_VALIDATE(known(gu.d[0], dn.d[0]) && (gu.d[2] == -1 || dn.d[1] == -1 || gu.d[2] == 2 * dn.d[1]),
            "MoEExperts: gate_up's last dim must be twice down's I, and both hold E experts");
        Dims const& gs = in[kIN_GATE_UP_SCALE_IDX].desc.dims;
        Dims const& ds = in[kIN_DOWN_SCALE_IDX].desc.dims;
        QWEN_VALIDATE(gu.d[1] == -1 || gs.d[1] == -1 || gs.d[1] == (gu.d[1] + mGateUpBlock - 1) / mGateUpBlock,
            "MoEExperts: gate_up_scale must be [E, ceil(C / gate_up_block_size), 2I]");
        QWEN_VALIDATE(dn.d[1] == -1 || ds.d[1] == -1 || ds.d[1] == (dn.d[1] + mDownBlock - 1) / mDownBlock,
            "MoEExperts: down_scale must be [E, ceil(I / down_block_size), C]");
    }

    size_t workspaceSize(DynamicPluginTensorDesc const* in) const
    {
        return moeExpertsWorkspaceSize(shape(in[kIN_X_IDX].max, in[kIN_GATE_UP_IDX].max, in[kIN_DOWN_IDX].max));
    }

    int32_t launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
        void* workspace, cudaStream_t stream) const
    {
        Dims const& ids = inputDesc[kIN_IDS_IDX].dims;
        MoeExpertsShape const s
            = shape(inputDesc[kIN_X_IDX].dims, inputDesc[kIN_GATE_UP_IDX].dims, inputDesc[kIN_DOWN_IDX].dims);
        QWEN_VALIDATE(ids.d[0] == s.nTokens * mTopK, "MoEExperts: ids must hold N * top_k assignments");
        WeightKind const w
            = inputDesc[kIN_GATE_UP_IDX].type == DataType::kFP8 ? WeightKind::kFP8_E4M3 : WeightKind::kINT4;
        return launchMoeExperts(inputs[kIN_X_IDX], static_cast<int32_t const*>(inputs[kIN_IDS_IDX]),
            inputs[kIN_WEIGHTS_IDX], inputs[kIN_GATE_UP_IDX], inputs[kIN_GATE_UP_SCALE_IDX], inputs[kIN_DOWN_IDX],
            inputs[kIN_DOWN_SCALE_IDX], outputs[kOUT_Y_IDX], toDataKind(inputDesc[kIN_X_IDX].type), w, s, workspace,
            stream);
    }

private:
    MoeExpertsShape shape(Dims const& x, Dims const& gateUp, Dims const& down) const
    {
        return MoeExpertsShape{x.d[0], mTopK, static_cast<int32_t>(gateUp.d[0]), static_cast<int32_t>(x.d[1]),
            static_cast<int32_t>(down.d[1]), mGateUpBlock, mDownBlock};
    }

    int32_t mTopK;        //!< experts per token
    int32_t mGateUpBlock; //!< input features (C) per gate_up scale
    int32_t mDownBlock;   //!< input features (I) per down scale
};

} // namespace

IPluginCreatorV3One* moeExpertsPluginCreator()
{
    static PluginCreator<MoeExpertsPlugin> sCreator;
    return &sCreator;
}

} // namespace qwen_vl
