// Enqueue harness for libqwen_vl_plugins.so without any TensorRT library: dlopen the plugin library, call
// getCreators, create the plugin as TensorRT would for an engine (kBUILD -> getFieldsToSerialize ->
// createPlugin(kRUNTIME) -> attachToContext -> onShapeChange) and enqueue on caller-owned device buffers.
// Built by tests/gpu/harness.py into build/plugins/libqwen_vl_harness.so and driven through ctypes.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

class StderrLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::fprintf(stderr, "[qwen_vl harness] %s\n", msg);
        }
        mLast = msg;
    }
    std::string mLast;
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override { return &mLogger; }
    StderrLogger mLogger;
};

Finder gFinder;

using GetCreatorsFn = IPluginCreatorInterface* const* (*) (int32_t&);
using SetLoggerFinderFn = void (*)(ILoggerFinder*);

DataType toDataType(char c)
{
    switch (c)
    {
    case 'f': return DataType::kFLOAT;
    case 'h': return DataType::kHALF;
    case 'b': return DataType::kBF16;
    case '8': return DataType::kFP8;
    case '4': return DataType::kINT4;
    default: return DataType::kINT32; // 'i'
    }
}

std::vector<PluginTensorDesc> makeDescs(int n, char const* types, int const* ranks, int64_t const* dims)
{
    std::vector<PluginTensorDesc> d(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i)
    {
        d[i].dims.nbDims = ranks[i];
        for (int j = 0; j < ranks[i]; ++j)
        {
            d[i].dims.d[j] = dims[i * Dims::MAX_DIMS + j];
        }
        d[i].type = toDataType(types[i]);
        d[i].format = TensorFormat::kLINEAR;
        d[i].scale = 1.f;
    }
    return d;
}

int fail(char* err, int errLen, std::string const& msg)
{
    std::snprintf(err, static_cast<size_t>(errLen), "%s", msg.c_str());
    return 1;
}

struct PluginDeleter
{
    void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

} // namespace

//! Returns 0 on success; otherwise 1 with a message in `err`. Field types: 'f' fp32, 'i' int32. Tensor types:
//! 'f' fp32, 'h' fp16, 'b' bf16, 'i' int32, '8' fp8 e4m3, '4' int4 (packed two per byte, low nibble first). A
//! plugin's workspace (getWorkspaceSize at these exact shapes) is allocated here and freed after a sync. dims: Dims::MAX_DIMS (8) entries per tensor. Enqueue is
//! asynchronous on `stream`; the caller synchronises.
extern "C" __attribute__((visibility("default"))) int qwenHarnessEnqueue(char const* libPath, char const* pluginName,
    int nbFields, char const* const* fieldNames, char const* fieldTypes, void const* const* fieldData,
    int const* fieldLengths, int nbInputs, void const* const* inputs, char const* inputTypes, int const* inputRanks,
    int64_t const* inputDims, int nbOutputs, void* const* outputs, char const* outputTypes, int const* outputRanks,
    int64_t const* outputDims, void* stream, char* err, int errLen)
{
    void* lib = dlopen(libPath, RTLD_NOW | RTLD_LOCAL); // kept open for the process (plugins may be cached)
    if (lib == nullptr)
    {
        return fail(err, errLen, std::string("dlopen: ") + dlerror());
    }
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(lib, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return fail(err, errLen, "library lacks getCreators/setLoggerFinder");
    }
    setLoggerFinder(&gFinder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    IPluginCreatorV3One* creator = nullptr;
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0
            && std::strcmp(c->getPluginName(), pluginName) == 0 && std::strcmp(c->getPluginNamespace(), "qwen_vl") == 0)
        {
            creator = c;
        }
    }
    if (creator == nullptr)
    {
        return fail(err, errLen, std::string("no creator qwen_vl::") + pluginName);
    }

    std::vector<PluginField> fields;
    for (int i = 0; i < nbFields; ++i)
    {
        fields.emplace_back(fieldNames[i], fieldData[i],
            fieldTypes[i] == 'f' ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, fieldLengths[i]);
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    PluginPtr built(creator->createPlugin(pluginName, &fc, TensorRTPhase::kBUILD));
    if (!built)
    {
        return fail(err, errLen, "createPlugin(kBUILD) failed: " + gFinder.mLogger.mLast);
    }
    // Engine round trip: the runtime plugin is created from the build plugin's serialized fields.
    auto* builtRuntime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginPtr runtimePlugin(creator->createPlugin(pluginName, builtRuntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    if (!runtimePlugin)
    {
        return fail(err, errLen, "createPlugin(kRUNTIME) failed: " + gFinder.mLogger.mLast);
    }
    auto* rt0 = static_cast<IPluginV3OneRuntime*>(runtimePlugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginPtr context(rt0->attachToContext(nullptr));
    if (!context)
    {
        return fail(err, errLen, "attachToContext failed");
    }
    auto* rt = static_cast<IPluginV3OneRuntime*>(context->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto in = makeDescs(nbInputs, inputTypes, inputRanks, inputDims);
    auto out = makeDescs(nbOutputs, outputTypes, outputRanks, outputDims);
    if (rt->onShapeChange(in.data(), nbInputs, out.data(), nbOutputs) != 0)
    {
        return fail(err, errLen, "onShapeChange failed: " + gFinder.mLogger.mLast);
    }
    auto dynamic = [](std::vector<PluginTensorDesc> const& descs) {
        std::vector<DynamicPluginTensorDesc> d(descs.size());
        for (size_t i = 0; i < descs.size(); ++i)
        {
            d[i].desc = descs[i];
            d[i].min = d[i].opt = d[i].max = descs[i].dims;
        }
        return d;
    };
    auto* build = static_cast<IPluginV3OneBuild*>(context->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto dIn = dynamic(in);
    auto dOut = dynamic(out);
    size_t const wsBytes = build->getWorkspaceSize(dIn.data(), nbInputs, dOut.data(), nbOutputs);
    void* workspace = nullptr;
    if (wsBytes > 0 && cudaMalloc(&workspace, wsBytes) != cudaSuccess)
    {
        return fail(err, errLen, "cudaMalloc of the workspace failed (" + std::to_string(wsBytes) + " bytes)");
    }
    int32_t const rc = rt->enqueue(in.data(), out.data(), inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
    if (workspace != nullptr)
    {
        cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
        cudaFree(workspace);
    }
    if (rc != 0)
    {
        return fail(err, errLen, "enqueue failed: " + gFinder.mLogger.mLast);
    }
    return 0;
}
