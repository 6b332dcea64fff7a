// MoEExperts launcher: y[t] = sum_j w[a] * (silu(x_t Gu_e[:, :I]) * (x_t Gu_e[:, I:])) D_e, a = t*k + j, e = ids[a],
// with Gu_e / D_e dequantized in the kernels from FP8 (e4m3) or INT4 blocks (one scale per `block` input features).
#pragma once

#include "common/kernelTypes.h"

#include <cuda_runtime_api.h>
#include <cstddef>
#include <cstdint>

namespace qwen_vl
{

//! Storage of the stacked expert weights.
enum class WeightKind : int32_t
{
    kFP8_E4M3 = 0, //!< one byte per value
    kINT4 = 1,     //!< two values per byte, low nibble first (ONNX INT4), signed [-8, 7]
};

struct MoeExpertsShape
{
    int64_t nTokens;     //!< N
    int32_t topK;        //!< k; A = N * k assignments, token-major
    int32_t nExperts;    //!< E
    int32_t hidden;      //!< C
    int32_t inter;       //!< I
    int32_t gateUpBlock; //!< block along C of gate_up's scales
    int32_t downBlock;   //!< block along I of down's scales
};

//! Bytes of device workspace for `s` (expert lists, the activated [A, I] and per-assignment [A, C] fp32 rows).
size_t moeExpertsWorkspaceSize(MoeExpertsShape const& s);

//! x [N, C], weights [A], scales and y [N, C] of `dtype`; ids [A] int32 in [0, E) (others are skipped);
//! gateUp [E, C, 2I], gateUpScale [E, ceil(C/Bg), 2I], down [E, I, C], downScale [E, ceil(I/Bd), C].
//! Returns 0 or a cudaError_t / kSTATUS_BAD_ARGUMENT.
int32_t launchMoeExperts(void const* x, int32_t const* ids, void const* weights, void const* gateUp,
    void const* gateUpScale, void const* down, void const* downScale, void* y, DataKind dtype, WeightKind wkind,
    MoeExpertsShape const& s, void* workspace, cudaStream_t stream);

} // namespace qwen_vl
