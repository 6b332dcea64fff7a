#include "generate.h"

#include "errors.h"
#include "positions.h"
#include "vision_inputs.h"

#include <algorithm>
#include <chrono>

namespace qvl
{
namespace
{
using Clock = std::chrono::steady_clock;

double msSince(Clock::time_point t0)
{
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Zero-row vision inputs of embed.onnx: vision_features [0, C] (+ deepstack_features [Ld, 0, C])
TensorMap emptyVision(Manifest const& m)
{
    TensorMap t;
    t["vision_features"] = Tensor::zeros(m.exportDType(), {0, m.hiddenSize});
    if (m.numDeepstack)
        t["deepstack_features"] = Tensor::zeros(m.exportDType(), {m.numDeepstack, 0, m.hiddenSize});
    return t;
}

// All media of the batch through vision.onnx -> {vision_features [M, C], deepstack_features [Ld, M, C]}
TensorMap encodeVision(Backend& backend, Manifest const& m, Request const& r, int64_t& calls)
{
    auto groups = groupVisionCalls(r.media, m.limits);
    calls = static_cast<int64_t>(groups.size());
    if (groups.empty())
        return emptyVision(m);
    std::vector<TensorMap> outs;
    for (auto const& g : groups)
        outs.push_back(backend.run("vision", visionFeeds(m, g)));
    if (outs.size() == 1)
        return outs[0];
    TensorMap joined;
    for (auto const& [name, axis] : {std::pair<char const*, int>{"vision_features", 0}, {"deepstack_features", 1}})
    {
        if (!outs[0].count(name))
            continue;
        std::vector<Tensor const*> parts;
        for (auto const& o : outs)
            parts.push_back(&o.at(name));
        joined[name] = concat(parts, axis);
    }
    return joined;
}

TensorMap decoderFeeds(TensorMap embeds, Tensor positionIds, std::vector<int64_t> const& pastLengths,
    std::vector<int64_t> const& logitsIndex)
{
    int64_t const batch = static_cast<int64_t>(pastLengths.size());
    embeds["position_ids"] = std::move(positionIds);
    embeds["past_lengths"] = fromVector(pastLengths, {batch});
    embeds["logits_index"] = fromVector(logitsIndex, {batch});
    return embeds;
}

// All prompts, right-padded into one decoder call (logits_index = length - 1) -> logits float32 [B, V]
Tensor prefill(Backend& backend, Manifest const& m, Request const& r, TensorMap vision, Tensor const& positionIds)
{
    int64_t const batch = r.batch(), seq = r.longest();
    std::vector<int64_t> ids(static_cast<size_t>(batch * seq), m.generation.padTokenId), logitsIndex(batch);
    for (int64_t b = 0; b < batch; ++b)
    {
        std::copy(r.sequences[b].begin(), r.sequences[b].end(), ids.begin() + b * seq);
        logitsIndex[b] = static_cast<int64_t>(r.sequences[b].size()) - 1;
    }
    vision["input_ids"] = fromVector(ids, {batch, seq});   // [B, S]
    TensorMap embeds = backend.run("embed", vision); // inputs_embeds [B, S, C] (+ deepstack_embeds [Ld, B, S, C])
    return backend.run("decoder",
        decoderFeeds(std::move(embeds), positionIds, std::vector<int64_t>(batch, 0), logitsIndex))["logits"];
}

// tokens [B] -> logits float32 [B, V]; one row per sequence written into the cache at past[b]
Tensor decodeOneToken(Backend& backend, Manifest const& m, std::vector<int64_t> const& tokens,
    std::vector<int64_t> const& past, Tensor const& ropeDeltas)
{
    int64_t const batch = static_cast<int64_t>(tokens.size());
    TensorMap feeds = emptyVision(m);
    feeds["input_ids"] = fromVector(tokens, {batch, 1});             // [B, 1]
    Tensor positions = decodePositionIds(past, ropeDeltas);          // [3, B, 1]
    return backend.run("decoder",
        decoderFeeds(backend.run("embed", feeds), positions, past, std::vector<int64_t>(batch, 0)))["logits"];
}
} // namespace

int64_t cacheLenFor(Manifest const& m, Request const& r, int64_t maxNewTokens, bool capture)
{
    int64_t const need = r.longest() + maxNewTokens;
    if (need > m.limits.maxCacheLen)
        throw UserError("prompt has " + std::to_string(r.longest()) + " tokens and --max-new-tokens is "
            + std::to_string(maxNewTokens) + ": together they exceed the " + std::to_string(m.limits.maxCacheLen)
            + "-token cache of the artifacts; lower --max-new-tokens or re-export with a larger --max-cache-len");
    int64_t len = need;
    if (capture)
    {
        len = 256;
        while (len < need)
            len *= 2;
    }
    return std::min((len + 15) / 16 * 16, m.limits.maxCacheLen);
}

Generation generate(Backend& backend, Manifest const& m, Request const& r, Sampler& sampler, GenerationConfig const& cfg)
{
    if (cfg.maxNewTokens < 1)
        throw UserError("--max-new-tokens " + std::to_string(cfg.maxNewTokens) + ": must be >= 1");
    int64_t const batch = r.batch(), pad = m.generation.padTokenId;
    Generation out;
    out.tokens.resize(batch);
    out.timings.cacheLen = cacheLenFor(m, r, cfg.maxNewTokens, backend.capturesDecode());
    backend.startCache(batch, out.timings.cacheLen);
    sampler.start(r.sequences, m.vocabSize);
    RopeIndex rope = ropeIndex(m, r);

    auto t0 = Clock::now();
    TensorMap vision = encodeVision(backend, m, r, out.timings.visionCalls);
    out.timings.visionMs = msSince(t0);

    t0 = Clock::now();
    std::vector<int64_t> sampled = sampler.sample(prefill(backend, m, r, std::move(vision), rope.positionIds));
    std::vector<int64_t> past(batch);
    for (int64_t b = 0; b < batch; ++b)
        past[b] = static_cast<int64_t>(r.sequences[b].size());
    out.timings.prefillMs = msSince(t0);

    std::vector<bool> done(batch, false);
    for (int64_t step = 0; step < cfg.maxNewTokens; ++step)
    {
        std::vector<int64_t> tokens(batch), fresh(batch, -1);
        bool all = true;
        for (int64_t b = 0; b < batch; ++b)
        {
            tokens[b] = done[b] ? pad : sampled[b];
            if (done[b])
                continue;
            out.tokens[b].push_back(tokens[b]);
            fresh[b] = tokens[b];
            if (!cfg.ignoreEos && std::count(cfg.stopIds.begin(), cfg.stopIds.end(), tokens[b]))
                done[b] = true; // the stop rule: the stop id is part of the result (HF)
            all = all && done[b];
        }
        if (cfg.onTokens)
            cfg.onTokens(fresh);
        if (all || step == cfg.maxNewTokens - 1)
            break;
        t0 = Clock::now();
        sampled = sampler.sample(decodeOneToken(backend, m, tokens, past, rope.ropeDeltas));
        for (auto& p : past)
            ++p;
        out.timings.decodeMs.push_back(msSince(t0));
    }
    return out;
}

} // namespace qvl
