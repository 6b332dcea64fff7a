// safetensors (https://github.com/huggingface/safetensors, format.md): 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw tensor bytes. Used for the
// request file, the --dump-inputs file and the worker backend's pipe frames.
#pragma once

#include "tensor.h"

#include <map>
#include <string>
#include <vector>

namespace qvl
{

using Metadata = std::map<std::string, std::string>;

// Parse a whole safetensors blob; `where` names it in error messages (UserError on anything malformed).
TensorMap decodeSafetensors(std::vector<uint8_t> const& blob, std::string const& where, Metadata* metadata = nullptr);
std::vector<uint8_t> encodeSafetensors(TensorMap const& tensors, Metadata const& metadata = {});

TensorMap readSafetensorsFile(std::string const& path);
void writeSafetensorsFile(std::string const& path, TensorMap const& tensors);

} // namespace qvl
