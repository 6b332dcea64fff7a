#include "vision_inputs.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace qvl
{
namespace
{
// (row, col) of each patch of an h x w grid in merge-block order (block_row, block_col, in_row, in_col)
void mergeOrder(int64_t h, int64_t w, int64_t merge, std::vector<int64_t>& rows, std::vector<int64_t>& cols)
{
    for (int64_t br = 0; br < h / merge; ++br)
        for (int64_t bc = 0; bc < w / merge; ++bc)
            for (int64_t ir = 0; ir < merge; ++ir)
                for (int64_t ic = 0; ic < merge; ++ic)
                {
                    rows.push_back(br * merge + ir);
                    cols.push_back(bc * merge + ic);
                }
}

// bilinear align_corners=True taps / weights along one axis, float32 as HF (_interpolation_axis_taps_weights)
void axisTaps(int64_t index, int64_t size, int64_t side, int64_t taps[2], float weights[2])
{
    float const denom = static_cast<float>(std::max<int64_t>(size - 1, 1));
    float const src = static_cast<float>(index) * static_cast<float>(side - 1) / denom;
    float const fl = std::floor(src);
    for (int k = 0; k < 2; ++k)
    {
        taps[k] = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(fl) + k, 0), side - 1);
        float const distance = std::fabs(src - fl - static_cast<float>(k));
        weights[k] = std::max(1.0f - distance, 0.0f);
    }
}
} // namespace

Tensor cuSeqlens(std::vector<Grid> const& grids)
{
    std::vector<int32_t> cu{0};
    for (auto const& g : grids)
        for (int64_t t = 0; t < g[0]; ++t)
            cu.push_back(cu.back() + static_cast<int32_t>(g[1] * g[2]));
    Tensor out = Tensor::zeros(DType::kI32, {static_cast<int64_t>(cu.size())});
    std::memcpy(out.bytes.data(), cu.data(), out.bytes.size());
    return out;
}

Tensor rotaryPosIds(std::vector<Grid> const& grids, int64_t merge)
{
    std::vector<int64_t> flat;
    for (auto const& g : grids)
    {
        std::vector<int64_t> rows, cols;
        mergeOrder(g[1], g[2], merge, rows, cols);
        for (int64_t t = 0; t < g[0]; ++t)
            for (size_t i = 0; i < rows.size(); ++i)
                flat.insert(flat.end(), {rows[i], cols[i]});
    }
    return fromVector(flat, {static_cast<int64_t>(flat.size() / 2), 2});
}

void posEmbedInterpolation(std::vector<Grid> const& grids, int64_t side, int64_t merge, Tensor& indices, Tensor& weights)
{
    std::vector<int64_t> idx;
    std::vector<float> wts;
    for (auto const& g : grids)
    {
        std::vector<int64_t> rows, cols;
        mergeOrder(g[1], g[2], merge, rows, cols);
        for (int64_t t = 0; t < g[0]; ++t)
            for (size_t i = 0; i < rows.size(); ++i)
            {
                int64_t ht[2], wt[2];
                float hw[2], ww[2];
                axisTaps(rows[i], g[1], side, ht, hw);
                axisTaps(cols[i], g[2], side, wt, ww);
                // taps (h0,w0), (h0,w1), (h1,w0), (h1,w1) into the flattened side x side table
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b)
                    {
                        idx.push_back(ht[a] * side + wt[b]);
                        wts.push_back(hw[a] * ww[b]);
                    }
            }
    }
    int64_t const n = static_cast<int64_t>(idx.size() / 4);
    indices = fromVector(idx, {n, 4});
    weights = fromVector(wts, {n, 4});
}

void windowIndex(std::vector<Grid> const& grids, int64_t merge, int64_t windowSize, int64_t patchSize, Tensor& index,
    Tensor& cuWindowSeqlens)
{
    int64_t const vws = windowSize / merge / patchSize; // merged tokens per window side
    int64_t const unit = merge * merge;
    std::vector<int64_t> win;
    std::vector<int32_t> cu{0};
    int64_t offset = 0;
    for (auto const& g : grids)
    {
        int64_t const lh = g[1] / merge, lw = g[2] / merge;
        int64_t const nh = (lh + vws - lh % vws) / vws, nw = (lw + vws - lw % vws) / vws; // HF pads a full window
        for (int64_t t = 0; t < g[0]; ++t)
            for (int64_t wr = 0; wr < nh; ++wr)
                for (int64_t wc = 0; wc < nw; ++wc)
                {
                    int64_t count = 0;
                    for (int64_t r = wr * vws; r < (wr + 1) * vws; ++r)
                        for (int64_t c = wc * vws; c < (wc + 1) * vws; ++c)
                            if (r < lh && c < lw)
                            {
                                win.push_back(offset + t * lh * lw + r * lw + c);
                                ++count;
                            }
                    int32_t const next = cu.back() + static_cast<int32_t>(count * unit);
                    if (next != cu.back()) // torch.unique_consecutive drops empty windows
                        cu.push_back(next);
                }
        offset += g[0] * lh * lw;
    }
    index = fromVector(win, {static_cast<int64_t>(win.size())});
    cuWindowSeqlens = Tensor::zeros(DType::kI32, {static_cast<int64_t>(cu.size())});
    std::memcpy(cuWindowSeqlens.bytes.data(), cu.data(), cuWindowSeqlens.bytes.size());
}

TensorMap visionFeeds(Manifest const& m, std::vector<MediaItem const*> const& items)
{
    std::vector<Grid> grids;
    int64_t rows = 0;
    for (auto const* it : items)
    {
        grids.push_back(it->grid);
        rows += it->patches();
    }
    TensorMap feeds;
    Tensor pixels = Tensor::zeros(DType::kF32, {rows, m.patchDim()});
    size_t offset = 0;
    size_t const rowBytes = static_cast<size_t>(m.patchDim()) * sizeof(float);
    for (auto const* it : items)
    {
        size_t const n = static_cast<size_t>(it->patches()) * rowBytes;
        std::memcpy(pixels.bytes.data() + offset, it->pixels->bytes.data() + it->firstRow * rowBytes, n);
        offset += n;
    }
    feeds["pixel_values"] = std::move(pixels);
    feeds["rotary_pos_ids"] = rotaryPosIds(grids, m.spatialMergeSize);
    feeds["cu_seqlens"] = cuSeqlens(grids);
    if (m.family == Family::kQwen2_5VL)
        windowIndex(grids, m.spatialMergeSize, m.windowSize, m.patchSize, feeds["window_index"],
            feeds["cu_window_seqlens"]);
    else
        posEmbedInterpolation(grids, m.numGridPerSide, m.spatialMergeSize, feeds["pos_embed_indices"],
            feeds["pos_embed_weights"]);
    return feeds;
}

std::vector<std::vector<MediaItem const*>> groupVisionCalls(std::vector<MediaItem> const& media, Limits const& limits)
{
    std::vector<std::vector<MediaItem const*>> groups;
    std::vector<MediaItem const*> cur;
    int64_t patches = 0, frames = 0;
    for (auto const& item : media)
    {
        if (!cur.empty() && (patches + item.patches() > limits.maxPatches || frames + item.grid[0] > limits.maxFrames))
        {
            groups.push_back(cur);
            cur.clear();
            patches = frames = 0;
        }
        cur.push_back(&item);
        patches += item.patches();
        frames += item.grid[0];
    }
    if (!cur.empty())
        groups.push_back(cur);
    return groups;
}

} // namespace qvl
