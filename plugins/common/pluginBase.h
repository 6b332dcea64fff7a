// The IPluginV3 plumbing every qwen_vl plugin shares, so that a plugin's file holds only what is its own.
//
// PluginBase<Derived> (CRTP) implements IPluginV3 + IPluginV3OneCore / IPluginV3OneBuildV2 / IPluginV3OneRuntime:
// identity (namespace qwen_vl, version 1), the capability interfaces, clone and attachToContext (a copy of
// Derived, which must therefore be self-contained), the I/O count check, the kLINEAR-only format rule, the
// serialized field collection, and try/catch -> caughtError around every hook. PluginCreator<Plugin> is the
// whole creator. A plugin supplies these members (the hooks may throw PluginError through QWEN_VALIDATE):
//
//   member                                                  serves
//   kNAME, kNB_INPUTS, kNB_OUTPUTS (static constexpr)       getPluginName, getNbOutputs, the I/O count check
//   static vector<PluginField> fieldDeclarations()          creator getFieldNames (data nullptr)
//   static Plugin fromFields(PluginFieldCollection const*)  creator createPlugin (any phase)
//   vector<PluginField> fields()                            getFieldsToSerialize (data pointing at members)
//   void inferTypes(DataType* out, DataType const* in) const                       getOutputDataTypes
//   void inferShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder&) const     getOutputShapes
//   bool supportsType(pos, inOut, nbInputs, nbOutputs) const                       supportsFormatCombination
//   void configure(DynamicPluginTensorDesc const* in) const                        configurePlugin
//   int32_t launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* const* outputs,
//       cudaStream_t) const: the launcher's status; non-zero fails enqueue         enqueue
//
// and may override IPluginV3OneBuildV2 methods itself (getAliasedInput). Build-time hooks make no CUDA call.
// A plugin that needs device scratch memory instead supplies
//   size_t workspaceSize(DynamicPluginTensorDesc const* in) const             getWorkspaceSize (max shapes)
//   int32_t launch(inputDesc, inputs, outputs, void* workspace, cudaStream_t) const                enqueue
#pragma once

#include "common/checkMacros.h"
#include "common/pluginUtils.h"

#include <NvInferRuntime.h>

#include <string>
#include <type_traits>
#include <vector>

namespace qwen_vl
{

//! Whether plugin `P` declares `workspaceSize` (and then takes the workspace in `launch`).
template <typename P, typename = void>
struct UsesWorkspace : std::false_type
{
};
template <typename P>
struct UsesWorkspace<P, std::void_t<decltype(&P::workspaceSize)>> : std::true_type
{
};

//! Runs `body` (which may throw) inside a noexcept method: a caught exception is logged and yields `onError`.
template <typename T, typename Body>
T guarded(T onError, Body&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& e)
    {
        caughtError(e);
    }
    return onError;
}

template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuildV2,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuildV2*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        }
        return nullptr;
    }
    nvinfer1::IPluginV3* clone() noexcept override
    {
        return guarded<nvinfer1::IPluginV3*>(nullptr, [&] { return new Derived(self()); });
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return Derived::kNAME; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }

    // IPluginV3OneBuildV2 (no CUDA calls in any of these)
    int32_t getNbOutputs() const noexcept override { return Derived::kNB_OUTPUTS; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        return guarded<int32_t>(-1, [&] {
            self().inferTypes(outputTypes, inputTypes);
            return 0;
        });
    }
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        return guarded<int32_t>(-1, [&] {
            QWEN_VALIDATE(nbInputs == Derived::kNB_INPUTS && nbOutputs == Derived::kNB_OUTPUTS,
                std::string(Derived::kNAME) + ": expects " + std::to_string(Derived::kNB_INPUTS) + " inputs, "
                    + std::to_string(Derived::kNB_OUTPUTS) + (Derived::kNB_OUTPUTS == 1 ? " output" : " outputs"));
            self().inferShapes(inputs, outputs, exprBuilder);
            return 0;
        });
    }
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        return guarded<bool>(false, [&] {
            return inOut[pos].desc.format == nvinfer1::TensorFormat::kLINEAR
                && self().supportsType(pos, inOut, nbInputs, nbOutputs);
        });
    }
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        return guarded<int32_t>(-1, [&] {
            self().configure(in);
            return 0;
        });
    }
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override
    {
        if constexpr (UsesWorkspace<Derived>::value)
        {
            return guarded<size_t>(0, [&] { return self().workspaceSize(inputs); });
        }
        return 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        return 0;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        return guarded<int32_t>(-1, [&] {
            int32_t status = 0;
            if constexpr (UsesWorkspace<Derived>::value)
            {
                status = self().launch(inputDesc, inputs, outputs, workspace, stream);
            }
            else
            {
                status = self().launch(inputDesc, inputs, outputs, stream);
            }
            QWEN_VALIDATE(status == 0,
                std::string(Derived::kNAME) + ": kernel launch failed with status " + std::to_string(status));
            return 0;
        });
    }
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override
    {
        return clone();
    }
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return guarded<nvinfer1::PluginFieldCollection const*>(nullptr, [&] {
            mSerialized = self().fields();
            mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
            mSerializedCollection.fields = mSerialized.data();
            return &mSerializedCollection;
        });
    }

protected:
    PluginBase() = default;
    //! A copy (clone) starts with an empty field collection: the source's points into the source.
    PluginBase(PluginBase const&) noexcept
        : nvinfer1::IPluginV3()
        , nvinfer1::IPluginV3OneCore()
        , nvinfer1::IPluginV3OneBuildV2()
        , nvinfer1::IPluginV3OneRuntime()
    {
    }
    PluginBase& operator=(PluginBase const&) = delete;

private:
    Derived& self() noexcept { return static_cast<Derived&>(*this); }
    Derived const& self() const noexcept { return static_cast<Derived const&>(*this); }

    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

//! The creator of `Plugin`: name, namespace, version, the declared fields, and createPlugin via Plugin::fromFields
//! (the phase does not matter: build and runtime plugins are the same object).
template <typename Plugin>
class PluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    PluginCreator()
        : mFields(Plugin::fieldDeclarations())
    {
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }
    PluginCreator(PluginCreator const&) = delete;
    PluginCreator& operator=(PluginCreator const&) = delete;

    char const* getPluginName() const noexcept override { return Plugin::kNAME; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override
    {
        return guarded<nvinfer1::IPluginV3*>(nullptr, [&] { return new Plugin(Plugin::fromFields(fc)); });
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace qwen_vl
