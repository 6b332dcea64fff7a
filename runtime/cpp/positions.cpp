#include "positions.h"

#include "errors.h"

#include <algorithm>

namespace qvl
{

RopeIndex ropeIndex(Manifest const& m, Request const& r)
{
    int64_t const batch = r.batch(), seq = r.longest(), merge = m.spatialMergeSize;
    RopeIndex out{Tensor::zeros(DType::kI64, {3, batch, seq}), Tensor::zeros(DType::kI64, {batch})};
    int64_t* pos = out.positionIds.as<int64_t>();
    // video grids as the runs they make: Qwen3-VL splits each video into t runs of one temporal patch
    std::vector<Grid> videos;
    std::vector<float> intervals;
    for (size_t i = 0; i < r.videoGrids.size(); ++i)
    {
        Grid const& g = r.videoGrids[i];
        if (m.family == Family::kQwen3VL)
            videos.insert(videos.end(), static_cast<size_t>(g[0]), Grid{1, g[1], g[2]});
        else
        {
            videos.push_back(g);
            // tokens_per_second (int) * float32 second_per_grid_ts -> float32
            intervals.push_back(static_cast<float>(static_cast<int64_t>(m.tokensPerSecond)) * r.secondPerGridTs[i]);
        }
    }
    size_t nextImage = 0, nextVideo = 0;
    for (int64_t b = 0; b < batch; ++b)
    {
        auto const& ids = r.sequences[b];
        int64_t const n = static_cast<int64_t>(ids.size());
        auto at = [&](int axis, int64_t s) -> int64_t& { return pos[(axis * batch + b) * seq + s]; };
        auto type = [&](int64_t s) { return ids[s] == m.imageTokenId ? 1 : ids[s] == m.videoTokenId ? 2 : 0; };
        int64_t cur = 0, s = 0, maxPos = -1;
        while (s < n)
        {
            int const kind = type(s);
            int64_t end = s;
            while (end < n && type(end) == kind)
                ++end;
            if (kind == 0)
            {
                for (int64_t i = s; i < end; ++i)
                    for (int axis = 0; axis < 3; ++axis)
                        at(axis, i) = cur + (i - s);
                cur += end - s;
            }
            else
            {
                std::vector<Grid> const& grids = kind == 1 ? r.imageGrids : videos;
                size_t& next = kind == 1 ? nextImage : nextVideo;
                if (next >= grids.size())
                    throw UserError("request: more vision runs in the prompts than grids for them");
                Grid const g = grids[next];
                float const interval = (kind == 2 && m.family == Family::kQwen2_5VL) ? intervals[next] : 1.0f;
                ++next;
                int64_t const h = g[1] / merge, w = g[2] / merge;
                if (end - s != g[0] * h * w)
                    throw UserError("request: a run of " + std::to_string(end - s) + " pad tokens does not match its grid ("
                        + std::to_string(g[0] * h * w) + " merged tokens)");
                int64_t i = s;
                for (int64_t t = 0; t < g[0]; ++t)
                {
                    // torch: arange(t) * float32 scalar -> float32, .long() truncates
                    int64_t const tpos = kind == 2 && m.family == Family::kQwen2_5VL
                        ? static_cast<int64_t>(static_cast<float>(t) * interval)
                        : t;
                    for (int64_t row = 0; row < h; ++row)
                        for (int64_t col = 0; col < w; ++col, ++i)
                        {
                            at(0, i) = cur + tpos;
                            at(1, i) = cur + row;
                            at(2, i) = cur + col;
                        }
                }
                cur += std::max(g[1], g[2]) / merge;
            }
            s = end;
        }
        for (int axis = 0; axis < 3; ++axis)
            for (int64_t i = 0; i < n; ++i)
                maxPos = std::max(maxPos, at(axis, i));
        out.ropeDeltas.as<int64_t>()[b] = maxPos + 1 - n;
    }
    return out;
}

Tensor decodePositionIds(std::vector<int64_t> const& pastLengths, Tensor const& ropeDeltas)
{
    int64_t const batch = static_cast<int64_t>(pastLengths.size());
    Tensor out = Tensor::zeros(DType::kI64, {3, batch, 1});
    for (int axis = 0; axis < 3; ++axis)
        for (int64_t b = 0; b < batch; ++b)
            out.as<int64_t>()[axis * batch + b] = pastLengths[b] + ropeDeltas.as<int64_t>()[b];
    return out;
}

} // namespace qvl
