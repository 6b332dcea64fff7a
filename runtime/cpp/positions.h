// MRoPE position ids: C++ port of runtime/positions.py (HF `get_rope_index` of Qwen3-VL and Qwen2.5-VL, 5.24).
//
// Per sequence, walk the runs of token types (text / image pad / video pad) of its unpadded ids:
// text run of length L -> cur .. cur+L-1 on all three axes; vision run of merged grid (t, h/m, w/m) ->
// T = cur + floor(t_idx * interval), H = cur + row, W = cur + col; then cur += max(h, w) / m.
// Qwen3-VL: one run per temporal patch of a video (interval unused); Qwen2.5-VL: video interval
// tokens_per_second * second_per_grid_ts in float32. Grids are consumed in order across the whole batch (HF).
#pragma once

#include "manifest.h"
#include "request.h"
#include "tensor.h"

namespace qvl
{

struct RopeIndex
{
    Tensor positionIds; // int64 [3, B, S_max], 0 at padding
    Tensor ropeDeltas;  // int64 [B]: max(position) + 1 - length
};

RopeIndex ropeIndex(Manifest const& m, Request const& r);

// The next token's positions when `pastLengths[b]` tokens are cached: pastLengths + delta on all axes. int64 [3, B, 1]
Tensor decodePositionIds(std::vector<int64_t> const& pastLengths, Tensor const& ropeDeltas);

} // namespace qvl
