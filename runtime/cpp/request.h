// The request file (written by `qwen-vl-request`, runtime/serve/request_file.py, or saved from HF's processor output):
//
// | tensor | dtype | shape | meaning |
// |---|---|---|---|
// | input_ids | int64 | [B, S] | prompts, vision pads expanded, right-padded |
// | attention_mask | int64 | [B, S] | 1 prompt token, 0 padding (each row 1..1 0..0) |
// | pixel_values | float32 | [T_img, patch_dim] | all images of the batch, prompt order (optional) |
// | image_grid_thw | int64 | [n_img, 3] | with pixel_values |
// | pixel_values_videos | float32 | [T_vid, patch_dim] | all videos (optional) |
// | video_grid_thw | int64 | [n_vid, 3] | with pixel_values_videos |
// | second_per_grid_ts | float32/float64 | [n_vid] | Qwen2.5-VL video time step (optional; HF default 1) |
// | mm_token_type_ids | int64 | [B, S] | accepted (HF's Qwen3-VL processor returns it); derived from input_ids here |
//
// `loadRequest` checks every name, dtype, shape and count against each other and the artifact limits.
#pragma once

#include "manifest.h"
#include "tensor.h"

#include <array>
#include <string>
#include <vector>

namespace qvl
{

using Grid = std::array<int64_t, 3>; // (t, h, w) in patches

struct MediaItem
{
    bool video;
    Grid grid;
    Tensor const* pixels; // pixel_values or pixel_values_videos of the request
    int64_t firstRow;     // this item's patches are rows [firstRow, firstRow + t*h*w) of *pixels
    int64_t patches() const { return grid[0] * grid[1] * grid[2]; }
};

struct Request
{
    TensorMap tensors;                           // the file's tensors (owned; MediaItem points into it)
    std::vector<std::vector<int64_t>> sequences; // unpadded token ids per sequence
    std::vector<Grid> imageGrids, videoGrids;    // as in the file (HF order)
    std::vector<float> secondPerGridTs;          // one per video (1.0 when absent)
    std::vector<MediaItem> media;                // in the order of their pad tokens, row-major over the batch

    int64_t batch() const { return static_cast<int64_t>(sequences.size()); }
    int64_t longest() const;
};

Request loadRequest(std::string const& path, Manifest const& m);

} // namespace qvl
