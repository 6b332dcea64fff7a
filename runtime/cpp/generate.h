// The generation loop, step by step as runtime/generate.py: vision (all media of the batch, pad order, grouped
// into calls within the limits) -> embed (pads replaced by vision rows) -> decoder prefill of the right-padded
// batch (per-sequence logits_index = length - 1) -> one decoder step per token through the backend's KV cache.
// Each sequence keeps its own past length and rope delta; decode positions are past_length + delta on all three
// axes. A finished sequence keeps stepping with the pad token; those tokens are not part of its result.
#pragma once

#include "backend.h"
#include "manifest.h"
#include "request.h"
#include "sampling.h"

#include <functional>
#include <vector>

namespace qvl
{

struct GenerationConfig
{
    int64_t maxNewTokens = 128;
    bool ignoreEos = false;
    std::vector<int64_t> stopIds; // EOS ids of generation_config.json (plus --stop-id)
    // called once per generated position with each sequence's new token (-1: that sequence had already finished)
    std::function<void(std::vector<int64_t> const&)> onTokens;
};

struct Timings
{
    double visionMs = 0, prefillMs = 0;
    std::vector<double> decodeMs; // one entry per decode step (tokens after the first)
    int64_t visionCalls = 0, cacheLen = 0;
};

struct Generation
{
    std::vector<std::vector<int64_t>> tokens; // generated ids per sequence (incl. the stop id that ended it)
    Timings timings;
};

// KV rows for this batch: longest prompt + new tokens, rounded up to 16 (a power of two >= 256 when the decode
// step is a CUDA graph); UserError beyond the artifacts' max_cache_len.
int64_t cacheLenFor(Manifest const& m, Request const& r, int64_t maxNewTokens, bool capture);

Generation generate(Backend& backend, Manifest const& m, Request const& r, Sampler& sampler,
    GenerationConfig const& cfg);

} // namespace qvl
