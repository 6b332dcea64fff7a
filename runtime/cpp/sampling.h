// Next-token choice from float32 logits [B, V], HF `generate` semantics (C++ port of runtime/sampling.py):
// repetition penalty (every token already in the sequence, prompt included: logit / p, or * p when negative;
// also when greedy, as HF), then temperature, top-k (drop below the k-th largest, ties kept), top-p (sort
// ascending, drop tokens whose cumulative probability <= 1 - top_p, keep the most likely), softmax, one
// inverse-CDF draw per row. Temperature 0 = greedy (argmax, first index on ties).
// Probabilities are computed in double (the Python side: float32 scores, float64 softmax); the random stream is
// std::mt19937_64 seeded with --seed, so a seed reproduces a run of this binary (not of the Python runtime).
#pragma once

#include "tensor.h"

#include <cstdint>
#include <random>
#include <vector>

namespace qvl
{

struct SamplingConfig
{
    double temperature = 0.0; // 0 -> greedy
    int64_t topK = 0;         // 0 -> off
    double topP = 1.0;        // 1 -> off
    double repetitionPenalty = 1.0;
    uint64_t seed = 0;
    bool greedy() const { return temperature == 0.0; }
};

// One row of logits -> probabilities after temperature, top-k, top-p (removed tokens exactly 0).
std::vector<double> logitsToProbs(float const* logits, int64_t vocab, SamplingConfig const& cfg);

class Sampler
{
public:
    explicit Sampler(SamplingConfig cfg);
    // Begin a batch: each sequence's prompt ids (for the repetition penalty).
    void start(std::vector<std::vector<int64_t>> const& prompts, int64_t vocab);
    // logits float32 [B, V] -> one token per row
    std::vector<int64_t> sample(Tensor const& logits);

private:
    SamplingConfig mCfg;
    std::mt19937_64 mRng;
    int64_t mVocab = 0;
    std::vector<std::vector<uint8_t>> mSeen; // [B][V] when a repetition penalty is set
};

} // namespace qvl
