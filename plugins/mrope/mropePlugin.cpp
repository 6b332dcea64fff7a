#include "mrope/mropePlugin.h"
#include "mrope/mropeKernel.h"

using namespace nvinfer1;

namespace qwen_vl
{

MropePlugin::MropePlugin(std::vector<float> invFreq, std::vector<int32_t> axis)
    : mInvFreq(std::move(invFreq))
    , mAxis(std::move(axis))
{
    QWEN_VALIDATE(!mInvFreq.empty() && mInvFreq.size() == mAxis.size(), "MRoPE: inv_freq and axis need D/2 entries each");
    QWEN_VALIDATE(static_cast<int32_t>(mInvFreq.size()) * 2 <= kMAX_HEAD_DIM, "MRoPE: head dim above 256");
    for (int32_t a : mAxis)
    {
        QWEN_VALIDATE(a >= 0 && a < 255, "MRoPE: axis entries must be in [0, A)");
    }
}

IPluginV3* MropePlugin::clone() noexcept
{
    try
    {
        return new MropePlugin(mInvFreq, mAxis);
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

int32_t MropePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    outputTypes[kOUT_Y_IDX] = inputTypes[kIN_X_IDX];
    return 0;
}

int32_t MropePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    try
    {
        QWEN_VALIDATE(nbInputs == kNB_INPUTS && nbOutputs == kNB_OUTPUTS, "MRoPE: expects 2 inputs, 1 output");
        QWEN_VALIDATE(inputs[kIN_X_IDX].nbDims >= 2, "MRoPE: x must be [N..., H, D]");
        QWEN_VALIDATE(inputs[kIN_POSITIONS_IDX].nbDims == inputs[kIN_X_IDX].nbDims - 1,
            "MRoPE: positions must be [N..., A] with the leading dims of x");
        outputs[kOUT_Y_IDX] = inputs[kIN_X_IDX];
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

bool MropePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kIN_X_IDX: return isAttentionFloat(d.type);
    case kIN_POSITIONS_IDX: return d.type == DataType::kINT32;
    case kNB_INPUTS + kOUT_Y_IDX: return d.type == inOut[kIN_X_IDX].desc.type;
    default: return false;
    }
}

int32_t MropePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
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
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

int32_t MropePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims const& x = inputDesc[kIN_X_IDX].dims;
        Dims const& p = inputDesc[kIN_POSITIONS_IDX].dims;
        int32_t const headDim = static_cast<int32_t>(x.d[x.nbDims - 1]);
        QWEN_VALIDATE(headDim == 2 * static_cast<int32_t>(mInvFreq.size()), "MRoPE: head dim / inv_freq mismatch");
        int32_t const status = launchMrope(inputs[kIN_X_IDX], static_cast<int32_t const*>(inputs[kIN_POSITIONS_IDX]),
            outputs[kOUT_Y_IDX], toDataKind(inputDesc[kIN_X_IDX].type), volume(x, 0, x.nbDims - 2),
            static_cast<int32_t>(x.d[x.nbDims - 2]), headDim, static_cast<int32_t>(p.d[p.nbDims - 1]),
            mInvFreq.data(), mAxis.data(), stream);
        QWEN_VALIDATE(status == 0, "MRoPE: kernel launch failed with status " + std::to_string(status));
        return 0;
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return -1;
}

PluginFieldCollection const* MropePlugin::getFieldsToSerialize() noexcept
{
    int32_t const n = static_cast<int32_t>(mInvFreq.size());
    mFields = {PluginField("inv_freq", mInvFreq.data(), PluginFieldType::kFLOAT32, n),
        PluginField("axis", mAxis.data(), PluginFieldType::kINT32, n)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

MropePluginCreator::MropePluginCreator()
{
    mFields = {PluginField("inv_freq", nullptr, PluginFieldType::kFLOAT32, 0),
        PluginField("axis", nullptr, PluginFieldType::kINT32, 0)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* MropePluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        PluginField const* invFreq = findField(fc, "inv_freq");
        PluginField const* axis = findField(fc, "axis");
        QWEN_VALIDATE(invFreq != nullptr && axis != nullptr, "MRoPE: fields inv_freq and axis are required");
        return new MropePlugin(readFloats(*invFreq), readInts(*axis));
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return nullptr;
}

} // namespace qwen_vl
