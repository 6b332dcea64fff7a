#include "manifest.h"

#include "errors.h"

#include <nlohmann/json.hpp>

#include <fstream>

namespace qvl
{

using nlohmann::json;

namespace
{
std::string const kReexport = "re-run export_all.sh for this checkpoint";

json readJson(std::string const& path, bool required)
{
    std::ifstream f(path);
    if (!f)
    {
        if (!required)
            return json::object();
        throw UserError(path + " not found: the directory holds no exported artifacts; run export_all.sh first");
    }
    json j = json::parse(f, nullptr, false);
    if (j.is_discarded() || !j.is_object())
        throw UserError(path + " is not valid JSON; " + kReexport);
    return j;
}

// j[a][b]... as T, or one line naming the missing key
template <typename T>
T field(json const& j, std::vector<char const*> const& keys, std::string const& where)
{
    json const* cur = &j;
    std::string path;
    for (auto const* k : keys)
    {
        path += (path.empty() ? "" : ".") + std::string(k);
        if (!cur->is_object() || !cur->contains(k) || (*cur)[k].is_null())
            throw UserError(where + " lacks " + path + "; " + kReexport);
        cur = &(*cur)[k];
    }
    try
    {
        return cur->get<T>();
    }
    catch (json::exception const&)
    {
        throw UserError(where + ": " + path + " has the wrong type; " + kReexport);
    }
}

std::vector<TensorContract> contracts(json const& rows, std::string const& where)
{
    std::vector<TensorContract> out;
    for (auto const& r : rows)
    {
        TensorContract t;
        t.name = r.at(0).get<std::string>();
        t.dtype = fromContractName(r.at(1).get<std::string>());
        for (auto const& d : r.at(2))
            t.dims.push_back(d.is_number() ? std::to_string(d.get<int64_t>()) : d.get<std::string>());
        out.push_back(t);
    }
    if (out.empty())
        throw UserError(where + ": empty contract; " + kReexport);
    return out;
}

GenerationDefaults generationDefaults(json const& g)
{
    GenerationDefaults d;
    d.doSample = g.value("do_sample", false);
    d.temperature = g.contains("temperature") && g["temperature"].is_number() ? g["temperature"].get<double>() : 1.0;
    d.topK = g.contains("top_k") && g["top_k"].is_number() ? g["top_k"].get<int64_t>() : 0;
    d.topP = g.contains("top_p") && g["top_p"].is_number() ? g["top_p"].get<double>() : 1.0;
    d.repetitionPenalty = g.contains("repetition_penalty") && g["repetition_penalty"].is_number()
        ? g["repetition_penalty"].get<double>()
        : 1.0;
    d.maxNewTokens = g.contains("max_new_tokens") && g["max_new_tokens"].is_number() ? g["max_new_tokens"].get<int64_t>()
                                                                                      : 128;
    if (g.contains("eos_token_id") && g["eos_token_id"].is_array())
        d.eosTokenIds = g["eos_token_id"].get<std::vector<int64_t>>();
    else if (g.contains("eos_token_id") && g["eos_token_id"].is_number())
        d.eosTokenIds = {g["eos_token_id"].get<int64_t>()};
    // model/manifest.py pad_token_id: generation_config's, else the first EOS, else 0
    d.padTokenId = g.contains("pad_token_id") && g["pad_token_id"].is_number()
        ? g["pad_token_id"].get<int64_t>()
        : (d.eosTokenIds.empty() ? 0 : d.eosTokenIds[0]);
    return d;
}
} // namespace

std::map<std::string, std::pair<int64_t, int64_t>> Manifest::dimRanges() const
{
    auto const& l = limits;
    return {{"num_patches", {4, l.maxPatches}}, {"num_merged", {0, l.maxPatches / 4}},
        {"num_frames_1", {2, l.maxFrames + 1}}, {"num_windows_1", {2, l.maxPatches / 4 + 1}},
        {"batch", {1, l.maxBatch}}, {"seq", {1, l.maxSeq}}, {"cache_len", {16, l.maxCacheLen}}};
}

Manifest loadManifest(std::string const& directory)
{
    std::string const path = directory + "/manifest.json";
    json raw = readJson(path, true);
    if (raw.value("format", "") != "qwen-vl-trt-artifacts")
        throw UserError(path + " is not a qwen-vl-trt manifest; " + kReexport);
    if (raw.value("format_version", 0) != 1)
        throw UserError(path + " has another format version than 1 (the one this runtime reads); " + kReexport);
    Manifest m;
    m.directory = directory;
    m.modelType = field<std::string>(raw, {"model_type"}, path);
    if (m.modelType == "qwen3_vl" || m.modelType == "qwen3_vl_moe")
        m.family = Family::kQwen3VL;
    else if (m.modelType == "qwen2_5_vl")
        m.family = Family::kQwen2_5VL;
    else
        throw UserError(path + ": model_type " + m.modelType + " is not supported by this runtime");
    m.dtype = field<std::string>(raw, {"dtype"}, path);
    fromContractName(m.dtype);
    auto lim = [&](char const* k) { return field<int64_t>(raw, {"limits", k}, path); };
    m.limits = {lim("max_patches"), lim("max_frames"), lim("max_batch"), lim("max_seq"), lim("max_cache_len")};
    auto vis = [&](char const* k) { return field<int64_t>(raw, {"model_spec", "vision", k}, path); };
    auto txt = [&](char const* k) { return field<int64_t>(raw, {"model_spec", "text", k}, path); };
    m.patchSize = vis("patch_size");
    m.temporalPatchSize = vis("temporal_patch_size");
    m.spatialMergeSize = vis("spatial_merge_size");
    m.inChannels = vis("in_channels");
    int64_t const table = vis("num_position_embeddings");
    m.numGridPerSide = 0;
    while ((m.numGridPerSide + 1) * (m.numGridPerSide + 1) <= table)
        ++m.numGridPerSide; // int(round(sqrt(n))) for the square tables of the releases
    m.windowSize = vis("window_size");
    m.tokensPerSecond = field<double>(raw, {"model_spec", "vision", "tokens_per_second"}, path);
    m.numDeepstack = static_cast<int64_t>(
        field<std::vector<int64_t>>(raw, {"model_spec", "vision", "deepstack_visual_indexes"}, path).size());
    m.hiddenSize = txt("hidden_size");
    m.numLayers = txt("num_hidden_layers");
    m.numKvHeads = txt("num_key_value_heads");
    m.headDim = txt("head_dim");
    m.vocabSize = txt("vocab_size");
    m.imageTokenId = field<int64_t>(raw, {"model_spec", "image_token_id"}, path);
    m.videoTokenId = field<int64_t>(raw, {"model_spec", "video_token_id"}, path);
    for (char const* g : {"vision", "embed", "decoder"})
    {
        GraphEntry e;
        json const& entry = raw["graphs"].is_object() && raw["graphs"].contains(g) ? raw["graphs"][g] : json();
        if (!entry.is_object())
            throw UserError(path + " lacks graphs." + g + "; " + kReexport);
        e.onnx = entry.value("onnx", json()).is_string() ? entry["onnx"].get<std::string>() : "";
        e.onnxOrt = entry.value("onnx_ort", json()).is_string() ? entry["onnx_ort"].get<std::string>() : "";
        e.engine = entry.value("engine", json()).is_string() ? entry["engine"].get<std::string>() : "";
        try
        {
            e.inputs = contracts(raw.at("contracts").at(g).at("inputs"), path + " contracts." + g);
            e.outputs = contracts(raw.at("contracts").at(g).at("outputs"), path + " contracts." + g);
        }
        catch (json::exception const&)
        {
            throw UserError(path + ": contracts." + g + " missing or malformed; " + kReexport);
        }
        m.graphs[g] = e;
    }
    if (raw.contains("plugins") && raw["plugins"].is_object() && raw["plugins"].value("library", json()).is_string())
        m.pluginLibrary = raw["plugins"]["library"].get<std::string>();
    m.generation = generationDefaults(readJson(directory + "/generation_config.json", true));
    return m;
}

} // namespace qvl
