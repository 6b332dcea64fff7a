// MRoPE plugin: fields, shape/type rules and enqueue; the IPluginV3 plumbing is common/pluginBase.h.
#include "mrope/mropePlugin.h"
#include "common/pluginBase.h"
#include "mrope/mropeKernel.h"

#include <vector>

using namespace nvinfer1;

namespace qwen_vl
{
namespace
{

class MropePlugin final : public PluginBase<MropePlugin>
{
public:
    static constexpr char kNAME[] = "MRoPE";
    static constexpr int32_t kIN_X_IDX = 0;         //!< [N..., H, D] fp32/fp16/bf16
    static constexpr int32_t kIN_POSITIONS_IDX = 1; //!< [N..., A] int32
    static constexpr int32_t kNB_INPUTS = 2;
    static constexpr int32_t kOUT_Y_IDX = 0; //!< [N..., H, D], dtype of x
    static constexpr int32_t kNB_OUTPUTS = 1;

    MropePlugin(std::vector<float> invFreq, std::vector<int32_t> axis)
        : mInvFreq(std::move(invFreq))
        , mAxis(std::move(axis))
    {
        QWEN_VALIDATE(!mInvFreq.empty() && mInvFreq.size() == mAxis.size(),
            "MRoPE: inv_freq and axis need D/2 entries each");
        QWEN_VALIDATE(static_cast<int32_t>(mInvFreq.size()) * 2 <= kMAX_HEAD_DIM, "MRoPE: head dim above 256");
        for (int32_t a : mAxis)
        {
            QWEN_VALIDATE(a >= 0 && a < 255, "MRoPE: axis entries must be in [0, A)");
        }
    }

    static std::vector<PluginField> fieldDeclarations()
    {
        return {PluginField("inv_freq", nullptr, PluginFieldType::kFLOAT32, 0),
            PluginField("axis", nullptr, PluginFieldType::kINT32, 0)};
    }

    static MropePlugin fromFields(PluginFieldCollection const* fc)
    {
        PluginField const* invFreq = findField(fc, "inv_freq");
        PluginField const* axis = findField(fc, "axis");
        QWEN_VALIDATE(invFreq != nullptr && axis != nullptr, "MRoPE: fields inv_freq and axis are required");
        return MropePlugin(readFloats(*invFreq), readInts(*axis));
    }

    std::vector<PluginField> fields()
    {
        int32_t const n = static_cast<int32_t>(mInvFreq.size());
        return {PluginField("inv_freq", mInvFreq.data(), PluginFieldType::kFLOAT32, n),
            PluginField("axis", mAxis.data(), PluginFieldType::kINT32, n)};
    }

    void inferTypes(DataType* outputTypes, DataType const* inputTypes) const
    {
        outputTypes[kOUT_Y_IDX] = inputTypes[kIN_X_IDX];
    }

    void inferShapes(DimsExprs const* inputs, DimsExprs* outputs, IExprBuilder& exprBuilder) const
    {
        QWEN_VALIDATE(inputs[kIN_X_IDX].nbDims >= 2, "MRoPE: x must be [N..., H, D]");
        QWEN_VALIDATE(inputs[kIN_POSITIONS_IDX].nbDims == inputs[kIN_X_IDX].nbDims - 1,
            "MRoPE: positions must be [N..., A] with the leading dims of x");
        outputs[kOUT_Y_IDX] = inputs[kIN_X_IDX];
    }

    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) const
    {
        DataType const t = inOut[pos].desc.type;
        switch (pos)
        {
        case kIN_X_IDX: return isAttentionFloat(t);
        case kIN_POSITIONS_IDX: return t == DataType::kINT32;
        case kNB_INPUTS + kOUT_Y_IDX: return t == inOut[kIN_X_IDX].desc.type;
        default: return false;
        }
    }

    void configure(DynamicPluginTensorDesc const* in) const
    {
        Dims const& x = in[kIN_X_IDX].desc.dims;
        int64_t const headDim = x.d[x.nbDims - 1];
        QWEN_VALIDATE(headDim == -1 || headDim == 2 * static_cast<int64_t>(mInvFreq.size()),
            "MRoPE: last dim of x must be 2 * len(inv_freq)");
        Dims const& p = in[kIN_POSITIONS_IDX].desc.dims;
        int64_t const nAxes = p.d[p.nbDims - 1];
        for (int32_t a : mAxis)
        {
            QWEN_VALIDATE(nAxes == -1 || a < nAxes, "MRoPE: an axis entry is >= positions.shape[-1]");
        }
    }

    int32_t launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
        cudaStream_t stream) const
    {
        Dims const& x = inputDesc[kIN_X_IDX].dims;
        Dims const& p = inputDesc[kIN_POSITIONS_IDX].dims;
        int32_t const headDim = static_cast<int32_t>(x.d[x.nbDims - 1]);
        QWEN_VALIDATE(headDim == 2 * static_cast<int32_t>(mInvFreq.size()), "MRoPE: head dim / inv_freq mismatch");
        return launchMrope(inputs[kIN_X_IDX], static_cast<int32_t const*>(inputs[kIN_POSITIONS_IDX]),
            outputs[kOUT_Y_IDX], toDataKind(inputDesc[kIN_X_IDX].type), volume(x, 0, x.nbDims - 2),
            static_cast<int32_t>(x.d[x.nbDims - 2]), headDim, static_cast<int32_t>(p.d[p.nbDims - 1]),
            mInvFreq.data(), mAxis.data(), stream);
    }

private:
    std::vector<float> mInvFreq; //!< [D/2] frequency of each rotary pair
    std::vector<int32_t> mAxis;  //!< [D/2] position axis feeding each frequency
};

} // namespace

IPluginCreatorV3One* mropePluginCreator()
{
    static PluginCreator<MropePlugin> sCreator;
    return &sCreator;
}

} // namespace qwen_vl
