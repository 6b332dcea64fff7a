// Host-side inputs of vision.onnx for one vision call: C++ port of runtime/vision_inputs.py and
// runtime/pipeline.py vision_feeds (themselves ports of transformers/vision_utils.py, 5.24). Same float32
// arithmetic as HF (compiled with -ffp-contract=off so no fused multiply-add changes a rounding).
//
// | name | dtype | shape | HF function |
// |---|---|---|---|
// | pixel_values | float32 | [T, patch_dim] | (the media's rows, concatenated in call order) |
// | rotary_pos_ids | int64 | [T, 2] | get_vision_position_ids |
// | cu_seqlens | int32 | [n_frames + 1] | get_vision_cu_seqlens |
// | pos_embed_indices, pos_embed_weights | int64, float32 | [T, 4] | get_vision_interpolation_indices_and_weights (Qwen3-VL) |
// | window_index, cu_window_seqlens | int64 [T/m^2], int32 [n_windows + 1] | get_vision_window_index (Qwen2.5-VL) |
#pragma once

#include "manifest.h"
#include "request.h"
#include "tensor.h"

#include <vector>

namespace qvl
{

Tensor cuSeqlens(std::vector<Grid> const& grids);
Tensor rotaryPosIds(std::vector<Grid> const& grids, int64_t merge);
void posEmbedInterpolation(std::vector<Grid> const& grids, int64_t side, int64_t merge, Tensor& indices, Tensor& weights);
void windowIndex(std::vector<Grid> const& grids, int64_t merge, int64_t windowSize, int64_t patchSize, Tensor& index,
    Tensor& cuWindowSeqlens);

// Every input of one vision call over `items` (in call order).
TensorMap visionFeeds(Manifest const& m, std::vector<MediaItem const*> const& items);

// Media in pad order -> vision calls: consecutive items while the call stays within max_patches / max_frames.
std::vector<std::vector<MediaItem const*>> groupVisionCalls(std::vector<MediaItem> const& media, Limits const& limits);

} // namespace qvl
