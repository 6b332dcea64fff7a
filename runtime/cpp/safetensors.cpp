#include "safetensors.h"

#include "errors.h"

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <iterator>

namespace qvl
{

using nlohmann::json;

TensorMap decodeSafetensors(std::vector<uint8_t> const& blob, std::string const& where, Metadata* metadata)
{
    auto bad = [&](std::string const& why) { return UserError(where + " is not a valid safetensors file (" + why + ")"); };
    if (blob.size() < 8)
        throw bad("shorter than its 8-byte header length");
    uint64_t n = 0;
    std::memcpy(&n, blob.data(), 8); // little-endian hosts only (x86-64, aarch64)
    if (n > blob.size() - 8)
        throw bad("header length " + std::to_string(n) + " beyond the end of the file");
    json header = json::parse(blob.begin() + 8, blob.begin() + 8 + static_cast<long>(n), nullptr, false);
    if (header.is_discarded() || !header.is_object())
        throw bad("header is not a JSON object");
    size_t const base = 8 + n;
    TensorMap out;
    for (auto const& [name, info] : header.items())
    {
        if (name == "__metadata__")
        {
            if (metadata && info.is_object())
                for (auto const& [k, v] : info.items())
                    (*metadata)[k] = v.is_string() ? v.get<std::string>() : v.dump();
            continue;
        }
        try
        {
            Tensor t;
            t.dtype = fromSafetensorsName(info.at("dtype").get<std::string>());
            t.shape = info.at("shape").get<std::vector<int64_t>>();
            auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
            if (offsets.size() != 2 || offsets[0] > offsets[1] || base + offsets[1] > blob.size())
                throw bad("tensor " + name + " lies outside the file");
            for (int64_t d : t.shape)
                if (d < 0)
                    throw bad("tensor " + name + " has a negative dimension");
            if (offsets[1] - offsets[0] != static_cast<uint64_t>(t.numel()) * dtypeSize(t.dtype))
                throw bad("tensor " + name + " has " + std::to_string(offsets[1] - offsets[0]) + " bytes for shape "
                    + t.describe());
            t.bytes.assign(blob.begin() + static_cast<long>(base + offsets[0]),
                blob.begin() + static_cast<long>(base + offsets[1]));
            out[name] = std::move(t);
        }
        catch (json::exception const& e)
        {
            throw bad("tensor " + name + ": " + e.what());
        }
    }
    return out;
}

std::vector<uint8_t> encodeSafetensors(TensorMap const& tensors, Metadata const& metadata)
{
    json header = json::object();
    if (!metadata.empty())
        header["__metadata__"] = metadata;
    uint64_t offset = 0;
    for (auto const& [name, t] : tensors)
    {
        header[name] = {{"dtype", safetensorsName(t.dtype)}, {"shape", t.shape},
            {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    uint64_t const n = text.size();
    std::vector<uint8_t> blob(8 + n + offset);
    std::memcpy(blob.data(), &n, 8);
    std::memcpy(blob.data() + 8, text.data(), n);
    size_t at = 8 + n;
    for (auto const& [name, t] : tensors)
    {
        if (!t.bytes.empty())
            std::memcpy(blob.data() + at, t.bytes.data(), t.bytes.size());
        at += t.bytes.size();
    }
    return blob;
}

TensorMap readSafetensorsFile(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
        throw UserError("cannot open " + path + ": no such file or not readable");
    std::vector<uint8_t> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return decodeSafetensors(blob, path);
}

void writeSafetensorsFile(std::string const& path, TensorMap const& tensors)
{
    auto blob = encodeSafetensors(tensors);
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<char const*>(blob.data()), static_cast<std::streamsize>(blob.size()));
    if (!f)
        throw UserError("cannot write " + path);
}

} // namespace qvl
