// One interface for the ways to run the three graphs (docs/graphs.md has every tensor's dtype and shape):
//
//   startCache(B, K)            a zeroed KV cache [B, Hkv, K, D] per layer, resident in the backend
//   run("vision", feeds)        pixel_values, rotary_pos_ids, cu_seqlens, ... -> vision_features [M, C] (+ deepstack)
//   run("embed", feeds)         input_ids [B, S], vision_features [M, C] (+ deepstack) -> inputs_embeds [B, S, C] (+)
//   run("decoder", feeds)       inputs_embeds, (deepstack_embeds), position_ids [3, B, S], past_lengths [B],
//                               logits_index [B] -> logits float32 [B, V]; past_* are read from and present_*
//                               written to the resident cache (the caller never sees the cache)
//
// Tensors cross this interface on the host; the export dtype (float32 / float16 / bfloat16) is carried as bytes.
#pragma once

#include "manifest.h"
#include "tensor.h"

#include <memory>
#include <string>

namespace qvl
{

class Backend
{
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual void startCache(int64_t batch, int64_t cacheLen) = 0;
    virtual TensorMap run(std::string const& graph, TensorMap const& feeds) = 0;
    // true when the decode step is replayed as a CUDA graph (cache_len is then rounded to few shapes)
    virtual bool capturesDecode() const { return false; }
};

struct BackendOptions
{
    std::string python = "python3"; // worker: the interpreter with qwen_vl_trt installed
    std::string ortGraphs = "fused"; // worker: fused (*.ort.onnx) or plugin (the TensorRT graphs' reference bodies)
    std::string pluginLibrary;       // tensorrt: overrides the manifest's library path
    bool cudaGraph = true;           // tensorrt: capture / replay the decode step
};

std::unique_ptr<Backend> makeWorkerBackend(Manifest const& m, BackendOptions const& opt);
// UserError when this binary was built without TensorRT (runtime/cpp/build.sh says why).
std::unique_ptr<Backend> makeTensorRTBackend(Manifest const& m, BackendOptions const& opt);

} // namespace qvl
