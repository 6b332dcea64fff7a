// Dense fp32 products y = x @ W on the CPU, reading W where it lies (ONNX Runtime's memory-mapped initializer).
//
// ONNX Runtime's MatMul / Gemm copy every fp32 weight into MLAS's packed layout when a session is created: for a
// 2.86 GB decoder that is seconds of single-threaded copying and page faults on every start (docs/benchmarks.md).
// Without that copy (session.disable_prepacking) MLAS's decode step ran about 10 % slower. These kernels need no
// copy made in advance:
//   M = 1, W [K, N] (MatMul): the rows of W are split among the tasks, each task one sequential stream of whole
//     rows, four rows at a time, into its own partial sum of y; the partial sums are added at the end.
//   W [N, K] (Gemm with transB, lm_head): one dot product per row of W and row of x, rows of W in sequence.
//   M > 1, W [K, N]: 128 columns per task, copied 256 rows at a time into a [256, 128] panel (L2), and a 12 x 32
//     register tile runs over each block with x broadcast, adding into y (MLAS's own SGEMM shape).
#pragma once

#include "matMulInt4Kernel.h"

#include <cstdint>

namespace qwen_vl
{

//! One product y [M, N] = x [M, K] @ W, fp32 row-major x and y. W is [K, N] (MatMul's B), or [N, K] when
//! `transposed` (Gemm's B with transB = 1).
struct F32Product
{
    const float* x;
    float* y;
    int64_t m;
    const float* w;
    int64_t k;
    int64_t n;
    bool transposed;
};

//! y = x @ W with the AVX-512 kernels where the CPU has AVX-512F, else matMulF32Reference. Allocates its scratch.
void matMulF32(const F32Product& product, ParallelFor parallelFor, void* runner);

//! The scalar definition: y[m, n] = sum_k x[m, k] * W[k, n], summed in k order in fp32.
void matMulF32Reference(const F32Product& product);

//! The AVX-512 kernels (matMulF32Avx512.cpp, built with -mavx512f).
void matMulF32Avx512(const F32Product& product, ParallelFor parallelFor, void* runner);

} // namespace qwen_vl
