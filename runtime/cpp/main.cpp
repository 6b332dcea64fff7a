// qwen-vl-generate: generation from an artifact directory and a request file (runtime/serve/request_file.py writes it).
//
//   qwen-vl-generate --model-dir A --request R.safetensors [--backend worker|tensorrt] [--max-new-tokens N]
//                    [--temperature T --top-k K --top-p P --repetition-penalty R --seed S] [--ignore-eos]
//                    [--stop-id ID]... [--out FILE] [--python PY] [--ort-graphs fused|plugin]
//                    [--plugins LIB] [--no-cuda-graph] [--stream]
//   qwen-vl-generate --model-dir A --request R --dump-inputs OUT.safetensors   (positions + vision inputs, no run)
//   qwen-vl-generate --probe-sampling LOGITS.safetensors --out PROBS.safetensors --temperature T --top-k K --top-p P
//
// Output: one JSON object {"backend", "sequences": [{"token_ids", "prompt_tokens"}], "timings"} on stdout or --out;
// with --stream, first one line {"tokens": [...]} per generated position (-1 for a finished sequence) on stdout.
// Sampling defaults come from generation_config.json (do_sample false -> greedy). Bad input: one `error:` line on
// stderr, exit 2.
#include "backend.h"
#include "errors.h"
#include "generate.h"
#include "manifest.h"
#include "positions.h"
#include "request.h"
#include "safetensors.h"
#include "sampling.h"
#include "vision_inputs.h"

#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>

namespace qvl
{
namespace
{

struct Args
{
    std::string modelDir = "artifacts", request, backend = "worker", out, dumpInputs, probeSampling;
    std::optional<int64_t> maxNewTokens, topK, seed;
    std::optional<double> temperature, topP, repetitionPenalty;
    bool ignoreEos = false;
    bool stream = false;
    std::vector<int64_t> stopIds;
    BackendOptions backendOptions;
};

char const* const kUsage
    = "usage: qwen-vl-generate --model-dir DIR --request FILE [--backend worker|tensorrt] [--max-new-tokens N]\n"
      "       [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--ignore-eos]\n"
      "       [--stop-id ID]... [--out FILE] [--python PY] [--ort-graphs fused|plugin] [--plugins LIB]\n"
      "       [--no-cuda-graph] [--stream] [--dump-inputs FILE] [--probe-sampling LOGITS --out PROBS]\n";

int64_t toInt(std::string const& flag, std::string const& v)
{
    try
    {
        size_t used = 0;
        int64_t x = std::stoll(v, &used);
        if (used == v.size())
            return x;
    }
    catch (std::exception const&)
    {
    }
    throw UserError(flag + " " + v + ": not an integer");
}

double toDouble(std::string const& flag, std::string const& v)
{
    try
    {
        size_t used = 0;
        double x = std::stod(v, &used);
        if (used == v.size())
            return x;
    }
    catch (std::exception const&)
    {
    }
    throw UserError(flag + " " + v + ": not a number");
}

Args parseArgs(int argc, char** argv)
{
    Args a;
    std::map<std::string, std::string*> strings = {{"--model-dir", &a.modelDir}, {"--request", &a.request},
        {"--backend", &a.backend}, {"--out", &a.out}, {"--dump-inputs", &a.dumpInputs},
        {"--probe-sampling", &a.probeSampling}, {"--python", &a.backendOptions.python},
        {"--ort-graphs", &a.backendOptions.ortGraphs}, {"--plugins", &a.backendOptions.pluginLibrary}};
    for (int i = 1; i < argc; ++i)
    {
        std::string const flag = argv[i];
        if (flag == "--help" || flag == "-h")
        {
            std::cout << kUsage;
            std::exit(0);
        }
        if (flag == "--ignore-eos")
        {
            a.ignoreEos = true;
            continue;
        }
        if (flag == "--stream")
        {
            a.stream = true;
            continue;
        }
        if (flag == "--no-cuda-graph")
        {
            a.backendOptions.cudaGraph = false;
            continue;
        }
        if (i + 1 >= argc)
            throw UserError(flag + ": unknown flag or missing value (see --help)");
        std::string const v = argv[++i];
        if (strings.count(flag))
            *strings[flag] = v;
        else if (flag == "--max-new-tokens")
            a.maxNewTokens = toInt(flag, v);
        else if (flag == "--top-k")
            a.topK = toInt(flag, v);
        else if (flag == "--seed")
            a.seed = toInt(flag, v);
        else if (flag == "--stop-id")
            a.stopIds.push_back(toInt(flag, v));
        else if (flag == "--temperature")
            a.temperature = toDouble(flag, v);
        else if (flag == "--top-p")
            a.topP = toDouble(flag, v);
        else if (flag == "--repetition-penalty")
            a.repetitionPenalty = toDouble(flag, v);
        else
            throw UserError(flag + ": unknown flag (see --help)");
    }
    if (a.temperature && *a.temperature < 0)
        throw UserError("--temperature: must be >= 0 (0 = greedy)");
    if (a.topP && !(*a.topP > 0 && *a.topP <= 1))
        throw UserError("--top-p: must be in (0, 1]");
    if (a.topK && *a.topK < 0)
        throw UserError("--top-k: must be >= 0 (0 = off)");
    if (a.repetitionPenalty && *a.repetitionPenalty <= 0)
        throw UserError("--repetition-penalty: must be > 0 (1 = off)");
    if (a.backend != "worker" && a.backend != "tensorrt")
        throw UserError("--backend " + a.backend + ": unknown backend (worker or tensorrt)");
    if (a.backendOptions.ortGraphs != "fused" && a.backendOptions.ortGraphs != "plugin")
        throw UserError("--ort-graphs " + a.backendOptions.ortGraphs + ": fused or plugin");
    return a;
}

// generation_config.json defaults, then the flags given
SamplingConfig samplingConfig(Args const& a, GenerationDefaults const& g)
{
    SamplingConfig s;
    s.temperature = a.temperature.value_or(g.doSample ? g.temperature : 0.0);
    s.topK = a.topK.value_or(g.topK);
    s.topP = a.topP.value_or(g.topP);
    s.repetitionPenalty = a.repetitionPenalty.value_or(g.repetitionPenalty);
    s.seed = static_cast<uint64_t>(a.seed.value_or(0));
    return s;
}

void emit(std::string const& path, std::string const& text)
{
    if (path.empty())
    {
        std::cout << text << "\n";
        return;
    }
    std::ofstream f(path);
    f << text << "\n";
    if (!f)
        throw UserError("cannot write " + path);
}

// --probe-sampling: probabilities of each row of `logits` (float32 [B, V]) after temperature / top-k / top-p
int probeSampling(Args const& a)
{
    TensorMap in = readSafetensorsFile(a.probeSampling);
    if (!in.count("logits") || in["logits"].dtype != DType::kF32 || in["logits"].shape.size() != 2)
        throw UserError(a.probeSampling + ": needs a float32 [B, V] tensor named logits");
    GenerationDefaults sampled;
    sampled.doSample = true;
    SamplingConfig cfg = samplingConfig(a, sampled);
    if (cfg.greedy())
        throw UserError("--probe-sampling needs --temperature > 0");
    Tensor const& logits = in["logits"];
    std::vector<double> probs;
    for (int64_t b = 0; b < logits.shape[0]; ++b)
    {
        auto row = logitsToProbs(logits.as<float>() + b * logits.shape[1], logits.shape[1], cfg);
        probs.insert(probs.end(), row.begin(), row.end());
    }
    if (a.out.empty())
        throw UserError("--probe-sampling needs --out PROBS.safetensors");
    writeSafetensorsFile(a.out, {{"probs", fromVector(probs, logits.shape)}});
    return 0;
}

// --dump-inputs: what the runtime computes from the request, without running any graph
void dumpInputs(Manifest const& m, Request const& r, std::string const& path)
{
    RopeIndex rope = ropeIndex(m, r);
    TensorMap out = {{"position_ids", rope.positionIds}, {"rope_deltas", rope.ropeDeltas}};
    auto groups = groupVisionCalls(r.media, m.limits);
    for (size_t g = 0; g < groups.size(); ++g)
    {
        for (auto& [name, t] : visionFeeds(m, groups[g]))
            if (name != "pixel_values")
                out["vision." + std::to_string(g) + "." + name] = t;
        std::vector<int64_t> grids;
        for (auto const* item : groups[g])
            grids.insert(grids.end(), item->grid.begin(), item->grid.end());
        out["vision." + std::to_string(g) + ".grid_thw"] = fromVector(grids, {(int64_t) groups[g].size(), 3});
    }
    writeSafetensorsFile(path, out);
}

std::string report(std::string const& backend, Request const& r, Generation const& g)
{
    nlohmann::json seqs = nlohmann::json::array();
    for (int64_t b = 0; b < r.batch(); ++b)
        seqs.push_back({{"token_ids", g.tokens[b]}, {"prompt_tokens", r.sequences[b].size()}});
    auto const& t = g.timings;
    double const decode = std::accumulate(t.decodeMs.begin(), t.decodeMs.end(), 0.0);
    nlohmann::json timings = {{"vision_ms", t.visionMs}, {"vision_calls", t.visionCalls}, {"prefill_ms", t.prefillMs},
        {"decode_ms", decode}, {"decode_step_ms", t.decodeMs}, {"cache_len", t.cacheLen},
        {"decode_tok_per_s", decode > 0 ? nlohmann::json(1e3 * t.decodeMs.size() / decode) : nlohmann::json()}};
    return nlohmann::json({{"backend", backend}, {"sequences", seqs}, {"timings", timings}}).dump();
}

int run(int argc, char** argv)
{
    Args a = parseArgs(argc, argv);
    if (!a.probeSampling.empty())
        return probeSampling(a);
    if (a.request.empty())
        throw UserError("pass --request FILE (written by qwen-vl-request)");
    Manifest m = loadManifest(a.modelDir);
    Request r = loadRequest(a.request, m);
    if (!a.dumpInputs.empty())
    {
        dumpInputs(m, r, a.dumpInputs);
        return 0;
    }
    GenerationConfig gen;
    gen.maxNewTokens = a.maxNewTokens.value_or(m.generation.maxNewTokens);
    gen.ignoreEos = a.ignoreEos;
    gen.stopIds = m.generation.eosTokenIds;
    gen.stopIds.insert(gen.stopIds.end(), a.stopIds.begin(), a.stopIds.end());
    if (gen.maxNewTokens < 1)
        throw UserError("--max-new-tokens " + std::to_string(gen.maxNewTokens) + ": must be >= 1");
    cacheLenFor(m, r, gen.maxNewTokens, false); // refuse before a backend starts
    std::unique_ptr<Backend> backend
        = a.backend == "worker" ? makeWorkerBackend(m, a.backendOptions) : makeTensorRTBackend(m, a.backendOptions);
    Sampler sampler(samplingConfig(a, m.generation));
    if (a.stream) // one line per position, as soon as it is chosen: {"tokens": [id or -1 per sequence]}
        gen.onTokens = [](std::vector<int64_t> const& t) {
            std::string line = "{\"tokens\": [";
            for (size_t i = 0; i < t.size(); ++i)
                line += (i ? ", " : "") + std::to_string(t[i]);
            std::fprintf(stdout, "%s]}\n", line.c_str());
            std::fflush(stdout);
        };
    Generation g = generate(*backend, m, r, sampler, gen);
    emit(a.out, report(backend->name(), r, g));
    return 0;
}

} // namespace
} // namespace qvl

int main(int argc, char** argv)
{
    std::signal(SIGPIPE, SIG_IGN); // a dead worker is an EPIPE error, not a silent death
    try
    {
        return qvl::run(argc, argv);
    }
    catch (qvl::UserError const& e)
    {
        std::string msg = e.what();
        for (auto& c : msg)
            if (c == '\n')
                c = ' ';
        std::fprintf(stderr, "error: %s\n", msg.c_str());
        return 2;
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "error: internal error: %s\n", e.what());
        return 1;
    }
}
