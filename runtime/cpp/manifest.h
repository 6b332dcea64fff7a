// ARTIFACTS/manifest.json (written by export/artifacts.py, read in Python by model/manifest.py) and
// generation_config.json: what the C++ runtime needs of them, parsed once into plain structs.
// The worker backend's Python side runs the full verification (file hashes, contracts vs model/contracts.py);
// here the format, version and every field used are checked, each failure one UserError line.
#pragma once

#include "tensor.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qvl
{

enum class Family
{
    kQwen3VL,  // qwen3_vl, qwen3_vl_moe: learned pos-embed taps, DeepStack, interleaved MRoPE
    kQwen2_5VL // window attention, no DeepStack, video time axis from second_per_grid_ts
};

struct Limits
{
    int64_t maxPatches, maxFrames, maxBatch, maxSeq, maxCacheLen; // per vision call / batch / prompt / KV rows
};

struct TensorContract
{
    std::string name;
    DType dtype;
    std::vector<std::string> dims; // a number ("3") or a named dynamic dim ("batch")
};

struct GraphEntry
{
    std::string onnx, onnxOrt, engine; // file names inside the artifact directory ("" when absent)
    std::vector<TensorContract> inputs, outputs;
};

struct GenerationDefaults // generation_config.json
{
    bool doSample = false;
    double temperature = 1.0, topP = 1.0, repetitionPenalty = 1.0;
    int64_t topK = 0, maxNewTokens = 128;
    std::vector<int64_t> eosTokenIds;
    int64_t padTokenId = 0;
};

struct Manifest
{
    std::string directory, modelType, dtype;
    Family family;
    Limits limits;
    // vision
    int64_t patchSize, temporalPatchSize, spatialMergeSize, inChannels, numGridPerSide, windowSize;
    double tokensPerSecond;
    // text
    int64_t hiddenSize, numLayers, numKvHeads, headDim, vocabSize, numDeepstack;
    int64_t imageTokenId, videoTokenId;
    std::map<std::string, GraphEntry> graphs; // vision, embed, decoder
    std::string pluginLibrary;                // "" when the engines need no plugin library
    GenerationDefaults generation;

    int64_t patchDim() const { return inChannels * temporalPatchSize * patchSize * patchSize; }
    DType exportDType() const { return fromContractName(dtype); }
    // (min, max) of each named dynamic dim: export/build_engines.py dim_ranges(limits)
    std::map<std::string, std::pair<int64_t, int64_t>> dimRanges() const;
};

Manifest loadManifest(std::string const& directory);

} // namespace qvl
