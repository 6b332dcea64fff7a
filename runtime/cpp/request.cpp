#include "request.h"

#include "errors.h"
#include "safetensors.h"

#include <algorithm>
#include <set>

namespace qvl
{
namespace
{
std::set<std::string> const kKnown = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"};

Tensor const* find(TensorMap const& t, std::string const& name)
{
    auto it = t.find(name);
    return it == t.end() ? nullptr : &it->second;
}

void expect(Tensor const& t, std::string const& name, DType dtype, size_t rank, std::string const& where)
{
    if (t.dtype != dtype || t.shape.size() != rank)
        throw UserError(where + ": " + name + " is " + t.describe() + ", expected " + contractName(dtype) + " of rank "
            + std::to_string(rank));
}

std::vector<Grid> grids(Tensor const* t, std::string const& name, Manifest const& m, std::string const& where)
{
    std::vector<Grid> out;
    if (!t)
        return out;
    expect(*t, name, DType::kI64, 2, where);
    if (t->shape[1] != 3)
        throw UserError(where + ": " + name + " is " + t->describe() + ", expected [n, 3]");
    for (int64_t i = 0; i < t->shape[0]; ++i)
    {
        Grid g{t->as<int64_t>()[3 * i], t->as<int64_t>()[3 * i + 1], t->as<int64_t>()[3 * i + 2]};
        int64_t const merge = m.spatialMergeSize;
        if (g[0] < 1 || g[1] < merge || g[2] < merge || g[1] % merge || g[2] % merge)
            throw UserError(where + ": " + name + " row " + std::to_string(i) + " is not a valid grid (t >= 1, h and w "
                + "multiples of the merge size " + std::to_string(merge) + ")");
        out.push_back(g);
    }
    return out;
}

// pixels + grids of one kind: rows must add up; returns each item's first row
std::vector<int64_t> checkPixels(Tensor const* pixels, std::vector<Grid> const& g, std::string const& pname,
    std::string const& gname, Manifest const& m, std::string const& where)
{
    if (!pixels && g.empty())
        return {};
    if (!pixels || g.empty())
        throw UserError(where + ": " + (pixels ? pname + " without " + gname : gname + " without " + pname));
    expect(*pixels, pname, DType::kF32, 2, where);
    if (pixels->shape[1] != m.patchDim())
        throw UserError(where + ": " + pname + " is " + pixels->describe() + ", rows of " + std::to_string(m.patchDim())
            + " values expected (" + m.modelType + " patches)");
    std::vector<int64_t> first;
    int64_t rows = 0;
    for (auto const& x : g)
    {
        first.push_back(rows);
        rows += x[0] * x[1] * x[2];
    }
    if (rows != pixels->shape[0])
        throw UserError(where + ": " + pname + " has " + std::to_string(pixels->shape[0]) + " rows, " + gname
            + " needs " + std::to_string(rows));
    return first;
}
// Unpadded token ids per row of input_ids [B, S] under attention_mask [B, S] (right padding, limits checked)
std::vector<std::vector<int64_t>> readSequences(Tensor const& ids, Tensor const& mask, Manifest const& m,
    std::string const& where)
{
    std::vector<std::vector<int64_t>> sequences;
    int64_t const batch = ids.shape[0], seq = ids.shape[1];
    if (batch > m.limits.maxBatch)
        throw UserError(where + ": " + std::to_string(batch) + " prompts in one batch, artifacts allow at most "
            + std::to_string(m.limits.maxBatch) + ": re-export with a larger --max-batch");
    for (int64_t b = 0; b < batch; ++b)
    {
        int64_t const* mk = mask.as<int64_t>() + b * seq;
        int64_t n = 0;
        while (n < seq && mk[n] == 1)
            ++n;
        for (int64_t s = n; s < seq; ++s)
            if (mk[s] != 0)
                throw UserError(where + ": attention_mask row " + std::to_string(b)
                    + " is not right padding (1..1 then 0..0)");
        if (n == 0)
            throw UserError(where + ": prompt " + std::to_string(b) + " is empty (attention_mask all 0)");
        if (n > m.limits.maxSeq)
            throw UserError("prompt has " + std::to_string(n) + " tokens, artifacts allow at most "
                + std::to_string(m.limits.maxSeq) + ": re-export with a larger --max-seq");
        int64_t const* row = ids.as<int64_t>() + b * seq;
        sequences.emplace_back(row, row + n);
        for (int64_t id : sequences.back())
            if (id < 0 || id >= m.vocabSize)
                throw UserError(where + ": token id " + std::to_string(id) + " outside the vocabulary of "
                    + std::to_string(m.vocabSize));
    }
    return sequences;
}

// Media in pad order: the k-th item of a kind starts where the pads of that kind resume after the previous one
std::vector<MediaItem> matchMedia(Request const& r, Tensor const* img, Tensor const* vid,
    std::vector<int64_t> const& imgRows, std::vector<int64_t> const& vidRows, Manifest const& m,
    std::string const& where)
{
    std::vector<MediaItem> media;
    int64_t const unit = m.spatialMergeSize * m.spatialMergeSize;
    size_t nextImage = 0, nextVideo = 0;
    for (auto const& s : r.sequences)
    {
        int64_t left = 0; // pads still owed to the current item
        bool leftVideo = false;
        for (int64_t id : s)
        {
            bool const isImage = id == m.imageTokenId, isVideo = id == m.videoTokenId;
            if (!isImage && !isVideo)
                continue;
            if (left > 0 && isVideo != leftVideo)
                throw UserError(where + ": an image's pad tokens are interrupted by a video's (or the reverse)");
            if (left == 0)
            {
                std::vector<Grid> const& g = isVideo ? r.videoGrids : r.imageGrids;
                size_t& next = isVideo ? nextVideo : nextImage;
                if (next >= g.size())
                    throw UserError(where + ": more " + (isVideo ? "video" : "image") + " pad tokens than "
                        + (isVideo ? "video_grid_thw" : "image_grid_thw") + " accounts for");
                media.push_back({isVideo, g[next], isVideo ? vid : img, (isVideo ? vidRows : imgRows)[next]});
                left = media.back().patches() / unit;
                leftVideo = isVideo;
                ++next;
            }
            --left;
        }
        if (left != 0)
            throw UserError(where + ": a prompt ends inside an image's or video's pad tokens");
    }
    if (nextImage != r.imageGrids.size() || nextVideo != r.videoGrids.size())
        throw UserError(where + ": image_grid_thw / video_grid_thw describe more media than the prompts have pad "
                                "tokens for");
    return media;
}

void checkMediaLimits(std::vector<MediaItem> const& media, Limits const& limits)
{
    for (auto const& item : media)
    {
        std::string const what = item.video ? "a video" : "an image";
        if (item.patches() > limits.maxPatches)
            throw UserError(what + " needs " + std::to_string(item.patches()) + " vision patches, artifacts allow at most "
                + std::to_string(limits.maxPatches) + " per vision call: re-export with a larger --max-patches");
        if (item.grid[0] > limits.maxFrames)
            throw UserError(what + " needs " + std::to_string(item.grid[0]) + " temporal patches, artifacts allow at "
                + "most " + std::to_string(limits.maxFrames) + " per vision call: re-export with a larger --max-frames");
    }
}

} // namespace

int64_t Request::longest() const
{
    size_t n = 0;
    for (auto const& s : sequences)
        n = std::max(n, s.size());
    return static_cast<int64_t>(n);
}

Request loadRequest(std::string const& path, Manifest const& m)
{
    std::string const where = "request " + path;
    Request r;
    r.tensors = readSafetensorsFile(path);
    for (auto const& [name, t] : r.tensors)
        if (!kKnown.count(name))
            throw UserError(where + ": unknown tensor " + name
                + " (expected input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, "
                  "video_grid_thw, second_per_grid_ts)");
    Tensor const* ids = find(r.tensors, "input_ids");
    Tensor const* mask = find(r.tensors, "attention_mask");
    if (!ids || !mask)
        throw UserError(where + ": input_ids and attention_mask are required");
    expect(*ids, "input_ids", DType::kI64, 2, where);
    expect(*mask, "attention_mask", DType::kI64, 2, where);
    if (ids->shape != mask->shape || ids->shape[0] < 1 || ids->shape[1] < 1)
        throw UserError(where + ": input_ids " + ids->describe() + " and attention_mask " + mask->describe()
            + " must have the same non-empty shape");
    r.sequences = readSequences(*ids, *mask, m, where);
    r.imageGrids = grids(find(r.tensors, "image_grid_thw"), "image_grid_thw", m, where);
    r.videoGrids = grids(find(r.tensors, "video_grid_thw"), "video_grid_thw", m, where);
    Tensor const* img = find(r.tensors, "pixel_values");
    Tensor const* vid = find(r.tensors, "pixel_values_videos");
    auto imgRows = checkPixels(img, r.imageGrids, "pixel_values", "image_grid_thw", m, where);
    auto vidRows = checkPixels(vid, r.videoGrids, "pixel_values_videos", "video_grid_thw", m, where);
    r.secondPerGridTs.assign(r.videoGrids.size(), 1.0f);
    if (Tensor const* secs = find(r.tensors, "second_per_grid_ts"))
    {
        if ((secs->dtype != DType::kF32 && secs->dtype != DType::kF64) || secs->numel() != (int64_t) r.videoGrids.size())
            throw UserError(where + ": second_per_grid_ts is " + secs->describe() + ", expected float32 ["
                + std::to_string(r.videoGrids.size()) + "] (one per video)");
        for (size_t i = 0; i < r.videoGrids.size(); ++i)
            r.secondPerGridTs[i]
                = secs->dtype == DType::kF32 ? secs->as<float>()[i] : static_cast<float>(secs->as<double>()[i]);
    }
    r.media = matchMedia(r, img, vid, imgRows, vidRows, m, where);
    checkMediaLimits(r.media, m.limits);
    return r;
}

} // namespace qvl
