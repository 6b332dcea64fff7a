// The `tensorrt` backend: the three engines of manifest.json through the nvinfer1 C++ API (TensorRT 10 /
// TensorRT-RTX share it), the C++ counterpart of runtime/backends/trt.py.
//
// NEVER EXECUTED: no machine of this project could run it (no GPU in CI; full TensorRT is not installable there and
// TensorRT-RTX refuses Hopper). CI compiles and links it (runtime/cpp/build.sh); the test suite only checks that.
//
// - load: IRuntime::deserializeCudaEngine per engine; the plugin library of the manifest (or --plugins) through
//   getPluginRegistry()->loadLibrary first; one IExecutionContext per engine; the engine's I/O names and dtypes
//   must be the manifest contract's, and profile 0's min/max input shapes must be the ones
//   export/build_engines.py derives from the manifest limits (check_profile), else one UserError line.
// - buffers: one static device buffer per I/O tensor at its largest shape (profile max for inputs, the contract's
//   dims at the limits' max for outputs), allocated once. The KV cache is the past_* buffers: present_* is bound to
//   the same address when the engines were built with the plugin library (KVCacheAttention aliases its outputs,
//   as runtime/backends/trt.py decides: in place iff a plugin library is used), else a second set and the two ping-pong.
// - run: host inputs copied into their buffers (cudaMemcpyAsync), shapes set, enqueueV3 on one stream, outputs
//   copied back; a decode step (seq == 1) is captured as a CUDA graph keyed by (batch, cache_len, KV set) on its
//   second run and replayed after (the first is a plain enqueue, as runtime/backends/trt.py).
#include "backend.h"
#include "errors.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <set>

namespace qvl
{
namespace
{

void check(cudaError_t e, char const* what)
{
    if (e != cudaSuccess)
        throw UserError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e)
            + "; check the GPU and driver");
}

class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
            mLast = msg;
        if (severity <= Severity::kWARNING)
            std::cerr << "tensorrt: " << msg << "\n";
    }
    std::string mLast;
};

DType fromTrt(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return DType::kF32;
    case nvinfer1::DataType::kHALF: return DType::kF16;
    case nvinfer1::DataType::kBF16: return DType::kBF16;
    case nvinfer1::DataType::kINT32: return DType::kI32;
    case nvinfer1::DataType::kINT64: return DType::kI64;
    case nvinfer1::DataType::kBOOL: return DType::kBOOL;
    case nvinfer1::DataType::kUINT8: return DType::kU8;
    default: throw UserError("engine tensor of a dtype this runtime does not handle");
    }
}

nvinfer1::Dims toDims(std::vector<int64_t> const& shape)
{
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
        d.d[i] = shape[i];
    return d;
}

std::vector<int64_t> fromDims(nvinfer1::Dims const& d)
{
    return std::vector<int64_t>(d.d, d.d + d.nbDims);
}

struct DeviceBuffer
{
    void* ptr = nullptr;
    size_t bytes = 0;
    DType dtype = DType::kF32;
    explicit DeviceBuffer(size_t n, DType t)
        : bytes(n)
        , dtype(t)
    {
        check(cudaMalloc(&ptr, std::max<size_t>(n, 1)), "cudaMalloc");
        check(cudaMemset(ptr, 0, std::max<size_t>(n, 1)), "cudaMemset");
    }
    ~DeviceBuffer() { cudaFree(ptr); }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

// One engine: its context and a static buffer per I/O tensor.
struct Engine
{
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    std::map<std::string, std::unique_ptr<DeviceBuffer>> buffers;
    std::vector<std::string> inputs, outputs;
};

class TensorRTBackend : public Backend
{
public:
    TensorRTBackend(Manifest const& m, BackendOptions const& opt)
        : mManifest(m)
        , mCudaGraph(opt.cudaGraph)
    {
        int devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1)
            throw UserError("tensorrt backend: no CUDA GPU is visible");
        std::string lib = opt.pluginLibrary.empty() ? m.pluginLibrary : opt.pluginLibrary;
        if (!lib.empty())
        {
            if (!std::ifstream(lib))
                throw UserError("tensorrt backend: plugin library " + lib
                    + " not found (the engines were built with it); run plugins/build.sh or pass --plugins");
            if (!getPluginRegistry()->loadLibrary(lib.c_str()))
                throw UserError("tensorrt backend: TensorRT could not load the plugin library " + lib);
        }
        mInPlace = !lib.empty();
        mRuntime.reset(nvinfer1::createInferRuntime(mLogger));
        if (!mRuntime)
            throw UserError("tensorrt backend: createInferRuntime failed: " + mLogger.mLast);
        check(cudaStreamCreate(&mStream), "cudaStreamCreate");
        for (char const* g : {"vision", "embed", "decoder"})
            load(g);
    }

    ~TensorRTBackend() override
    {
        for (auto& [key, exec] : mGraphs)
            cudaGraphExecDestroy(exec);
        mEngines.clear();
        if (mStream)
            cudaStreamDestroy(mStream);
    }

    std::string name() const override { return "tensorrt"; }
    bool capturesDecode() const override { return mCudaGraph; }

    void startCache(int64_t batch, int64_t cacheLen) override
    {
        if (batch > mManifest.limits.maxBatch || cacheLen > mManifest.limits.maxCacheLen)
            throw UserError("tensorrt backend: cache beyond the engines' profile");
        mBatch = batch;
        mCacheLen = cacheLen;
        mSet = 0;
        Engine& dec = mEngines.at("decoder");
        for (auto& [name, buf] : dec.buffers)
            if (name.rfind("past_", 0) == 0 || name.rfind("present_", 0) == 0)
                check(cudaMemsetAsync(buf->ptr, 0, buf->bytes, mStream), "cudaMemsetAsync");
        check(cudaStreamSynchronize(mStream), "cudaStreamSynchronize");
    }

    TensorMap run(std::string const& graph, TensorMap const& feeds) override
    {
        Engine& e = mEngines.at(graph);
        bool const decoder = graph == "decoder";
        for (auto const& name : e.inputs)
        {
            if (decoder && name.rfind("past_", 0) == 0)
            {
                std::vector<int64_t> shape{mBatch, mManifest.numKvHeads, mCacheLen, mManifest.headDim};
                bind(e, name, shape, kvBuffer(name, mSet));
                continue;
            }
            auto it = feeds.find(name);
            if (it == feeds.end())
                throw UserError("tensorrt backend: " + graph + " input " + name + " not given");
            DeviceBuffer& buf = *e.buffers.at(name);
            Tensor const& t = it->second;
            if (t.dtype != buf.dtype || t.bytes.size() > buf.bytes)
                throw UserError("tensorrt backend: " + graph + " input " + name + " " + t.describe()
                    + " does not fit the engine's buffer");
            check(cudaMemcpyAsync(buf.ptr, t.bytes.data(), t.bytes.size(), cudaMemcpyHostToDevice, mStream),
                "cudaMemcpyAsync");
            bind(e, name, t.shape, buf.ptr);
        }
        for (auto const& name : e.outputs)
        {
            if (decoder && name.rfind("present_", 0) == 0)
            {
                // in place: present_* at its past_* address; else the other set of the ping-pong pair
                std::string const past = "past_" + name.substr(8);
                int const set = mInPlace ? mSet : 1 - mSet;
                if (!e.context->setTensorAddress(name.c_str(), kvBuffer(past, set)))
                    throw UserError("tensorrt backend: cannot bind " + name);
                continue;
            }
            if (!e.context->setTensorAddress(name.c_str(), e.buffers.at(name)->ptr))
                throw UserError("tensorrt backend: cannot bind " + name);
        }
        bool const step = decoder && feeds.count("position_ids") && feeds.at("position_ids").shape[2] == 1;
        enqueue(e, step);
        TensorMap out;
        for (auto const& name : e.outputs)
        {
            if (decoder && name != "logits")
                continue;
            std::vector<int64_t> shape = fromDims(e.context->getTensorShape(name.c_str()));
            if (std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; }))
                throw UserError("tensorrt backend: " + graph + " output " + name + " has no resolved shape");
            Tensor t = Tensor::zeros(e.buffers.at(name)->dtype, shape);
            check(cudaMemcpyAsync(t.bytes.data(), e.buffers.at(name)->ptr, t.bytes.size(), cudaMemcpyDeviceToHost,
                      mStream),
                "cudaMemcpyAsync");
            out[name] = std::move(t);
        }
        check(cudaStreamSynchronize(mStream), "cudaStreamSynchronize");
        if (decoder && !mInPlace)
            mSet = 1 - mSet;
        return out;
    }

private:
    void* kvBuffer(std::string const& past, int set)
    {
        Engine& dec = mEngines.at("decoder");
        if (set == 0 || mInPlace)
            return dec.buffers.at(past)->ptr;
        return dec.buffers.at("present_" + past.substr(5))->ptr; // the second set lives in the present_* buffers
    }

    void bind(Engine& e, std::string const& name, std::vector<int64_t> const& shape, void* ptr)
    {
        if (!e.context->setInputShape(name.c_str(), toDims(shape)) || !e.context->setTensorAddress(name.c_str(), ptr))
            throw UserError("tensorrt backend: input " + name + " of shape rejected by the engine: " + mLogger.mLast);
    }

    // A plain enqueue, or for a decode step: plain on the first run of a shape, captured on the second, replayed after.
    void enqueue(Engine& e, bool decodeStep)
    {
        if (!decodeStep || !mCudaGraph)
        {
            if (!e.context->enqueueV3(mStream))
                throw UserError("tensorrt backend: enqueueV3 failed: " + mLogger.mLast);
            return;
        }
        std::string const key = std::to_string(mBatch) + "/" + std::to_string(mCacheLen) + "/" + std::to_string(mSet);
        auto it = mGraphs.find(key);
        if (it != mGraphs.end())
        {
            check(cudaGraphLaunch(it->second, mStream), "cudaGraphLaunch");
            return;
        }
        if (!mSeen.count(key))
        {
            mSeen.insert(key);
            if (!e.context->enqueueV3(mStream))
                throw UserError("tensorrt backend: enqueueV3 failed: " + mLogger.mLast);
            return;
        }
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        check(cudaStreamBeginCapture(mStream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        bool const ok = e.context->enqueueV3(mStream);
        check(cudaStreamEndCapture(mStream, &graph), "cudaStreamEndCapture");
        if (!ok)
            throw UserError("tensorrt backend: enqueueV3 failed during capture: " + mLogger.mLast);
        check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
        cudaGraphDestroy(graph);
        mGraphs[key] = exec;
        check(cudaGraphLaunch(exec, mStream), "cudaGraphLaunch");
    }

    void load(std::string const& g)
    {
        GraphEntry const& entry = mManifest.graphs.at(g);
        std::string const path = mManifest.directory + "/" + entry.engine;
        if (entry.engine.empty())
            throw UserError("manifest.json names no " + g + " engine: the artifacts were exported without TensorRT; "
                                                            "run export_all.sh where TensorRT is installed");
        std::ifstream f(path, std::ios::binary);
        if (!f)
            throw UserError(path + " is missing; re-run export_all.sh for this checkpoint");
        std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        Engine e;
        e.engine.reset(mRuntime->deserializeCudaEngine(blob.data(), blob.size()));
        if (!e.engine)
            throw UserError(path + ": TensorRT cannot deserialize it (" + mLogger.mLast
                + "); rebuild the engines for this TensorRT version and GPU");
        e.context.reset(e.engine->createExecutionContext());
        if (!e.context)
            throw UserError(path + ": cannot create an execution context: " + mLogger.mLast);
        checkContract(e, entry, path);
        auto const ranges = mManifest.dimRanges();
        auto dimsAt = [&](TensorContract const& t, bool max) {
            std::vector<int64_t> shape;
            for (auto const& d : t.dims)
                shape.push_back(ranges.count(d) ? (max ? ranges.at(d).second : ranges.at(d).first) : std::stoll(d));
            return shape;
        };
        auto bytesOf = [](std::vector<int64_t> const& s, DType t) {
            int64_t n = 1;
            for (auto d : s)
                n *= d;
            return static_cast<size_t>(n) * dtypeSize(t);
        };
        for (auto const& t : entry.inputs)
        {
            // check_profile: profile 0 must be what export/build_engines.py made from the manifest limits
            auto lo = fromDims(e.engine->getProfileShape(t.name.c_str(), 0, nvinfer1::OptProfileSelector::kMIN));
            auto hi = fromDims(e.engine->getProfileShape(t.name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX));
            if (lo != dimsAt(t, false) || hi != dimsAt(t, true))
                throw UserError(path + ": input " + t.name + " has another optimization profile than manifest.json's "
                    + "limits give; rebuild the engines with export_all.sh");
            e.buffers[t.name] = std::make_unique<DeviceBuffer>(bytesOf(hi, t.dtype), t.dtype);
        }
        for (auto const& t : entry.outputs)
            if (!(mInPlace && t.name.rfind("present_", 0) == 0)) // in place: present_* live in the past_* buffers
                e.buffers[t.name] = std::make_unique<DeviceBuffer>(bytesOf(dimsAt(t, true), t.dtype), t.dtype);
        mEngines[g] = std::move(e);
    }

    static void checkContract(Engine& e, GraphEntry const& entry, std::string const& path)
    {
        std::map<std::string, TensorContract const*> want;
        for (auto const* list : {&entry.inputs, &entry.outputs})
            for (auto const& t : *list)
                want[t.name] = &t;
        int32_t const n = e.engine->getNbIOTensors();
        if (static_cast<size_t>(n) != want.size())
            throw UserError(path + " has " + std::to_string(n) + " I/O tensors, the manifest contract "
                + std::to_string(want.size()) + "; re-run export_all.sh for these artifacts");
        for (int32_t i = 0; i < n; ++i)
        {
            std::string const name = e.engine->getIOTensorName(i);
            bool const input = e.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
            auto it = want.find(name);
            if (it == want.end() || fromTrt(e.engine->getTensorDataType(name.c_str())) != it->second->dtype)
                throw UserError(path + ": tensor " + name + " does not match the manifest contract; re-run "
                                                           "export_all.sh for these artifacts");
            (input ? e.inputs : e.outputs).push_back(name);
        }
    }

    Manifest const& mManifest;
    bool mCudaGraph, mInPlace = false;
    Logger mLogger;
    std::unique_ptr<nvinfer1::IRuntime> mRuntime;
    cudaStream_t mStream = nullptr;
    std::map<std::string, Engine> mEngines;
    std::map<std::string, cudaGraphExec_t> mGraphs;
    std::set<std::string> mSeen;
    int64_t mBatch = 0, mCacheLen = 0;
    int mSet = 0; // the KV set that holds the cache (always 0 in place)
};

} // namespace

std::unique_ptr<Backend> makeTensorRTBackend(Manifest const& m, BackendOptions const& opt)
{
    return std::make_unique<TensorRTBackend>(m, opt);
}

} // namespace qvl
