#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace qvl
{

std::vector<double> logitsToProbs(float const* logits, int64_t vocab, SamplingConfig const& cfg)
{
    float const ninf = -std::numeric_limits<float>::infinity();
    std::vector<float> scores(logits, logits + vocab);
    for (auto& s : scores)
        s = s / static_cast<float>(cfg.temperature);
    if (cfg.topK > 0)
    {
        int64_t const k = std::min(cfg.topK, vocab);
        std::vector<float> sorted = scores;
        std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
        float const kth = sorted[k - 1];
        for (auto& s : scores)
            if (s < kth)
                s = ninf;
    }
    if (cfg.topP < 1.0)
    {
        std::vector<int64_t> order(vocab);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] < scores[b]; });
        double const top = scores[order.back()];
        double sum = 0;
        for (auto const& s : scores)
            sum += std::exp(static_cast<double>(s) - top);
        double cum = 0;
        std::vector<int64_t> drop;
        for (int64_t i = 0; i + 1 < vocab; ++i) // the most likely token (last) is always kept
        {
            cum += std::exp(static_cast<double>(scores[order[i]]) - top) / sum;
            if (cum <= 1.0 - cfg.topP)
                drop.push_back(order[i]);
        }
        for (int64_t i : drop)
            scores[i] = ninf;
    }
    double const top = *std::max_element(scores.begin(), scores.end());
    std::vector<double> probs(vocab);
    double sum = 0;
    for (int64_t i = 0; i < vocab; ++i)
        sum += probs[i] = std::exp(static_cast<double>(scores[i]) - top);
    for (auto& p : probs)
        p /= sum;
    return probs;
}

Sampler::Sampler(SamplingConfig cfg)
    : mCfg(cfg)
    , mRng(cfg.seed)
{
}

void Sampler::start(std::vector<std::vector<int64_t>> const& prompts, int64_t vocab)
{
    mVocab = vocab;
    mSeen.clear();
    if (mCfg.repetitionPenalty == 1.0)
        return;
    mSeen.assign(prompts.size(), std::vector<uint8_t>(static_cast<size_t>(vocab), 0));
    for (size_t b = 0; b < prompts.size(); ++b)
        for (int64_t id : prompts[b])
            mSeen[b][id] = 1;
}

std::vector<int64_t> Sampler::sample(Tensor const& logits)
{
    int64_t const batch = logits.shape[0], vocab = logits.shape[1];
    std::vector<int64_t> out(batch);
    std::vector<float> row(vocab);
    for (int64_t b = 0; b < batch; ++b)
    {
        std::copy_n(logits.as<float>() + b * vocab, vocab, row.begin());
        if (!mSeen.empty())
        {
            float const p = static_cast<float>(mCfg.repetitionPenalty);
            for (int64_t v = 0; v < vocab; ++v)
                if (mSeen[b][v])
                    row[v] = row[v] < 0 ? row[v] * p : row[v] / p;
        }
        if (mCfg.greedy())
            out[b] = std::max_element(row.begin(), row.end()) - row.begin(); // first index on ties
        else
        {
            std::vector<double> probs = logitsToProbs(row.data(), vocab, mCfg);
            double const u = static_cast<double>(mRng() >> 11) * 0x1.0p-53; // uniform [0, 1)
            double cdf = 0;
            int64_t idx = 0;
            double const total = std::accumulate(probs.begin(), probs.end(), 0.0);
            while (idx < vocab - 1 && (cdf += probs[idx]) < u * total)
                ++idx;
            while (idx > 0 && probs[idx] == 0) // never land on a removed token through rounding
                --idx;
            out[b] = idx;
        }
        if (!mSeen.empty())
            mSeen[b][out[b]] = 1;
    }
    return out;
}

} // namespace qvl
