// INT4 weight-only products y = x @ dequant(W)^T on the CPU, reading ONNX Runtime's MatMulNBits layout as it is.
//
// MLAS's MatMulNBits kernel with fp32 activations (accuracy level 1) widens every weight to fp32 before its product
// and reaches about a third of the memory bandwidth at M = 1 (docs/benchmarks.md). These kernels dequantize in
// registers instead: a 16-entry table per (column, block) holds (u - zero_point) * scale for the 16 nibble values,
// and one AVX-512 permute turns 16 nibbles into their fp32 weights. The products are those of MLAS's dequantized
// weights (the same fp32 rounding of (u - zp) * s); only the order of the sums differs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qwen_vl
{

//! One MatMulNBits weight of 4 bits, as the contrib op stores it (onnxruntime ContribOperators.md).
struct Int4Weight
{
    //! [N, K / block, block / 2]: byte i of a block holds k = 2i (low nibble) and 2i + 1 (high nibble)
    const uint8_t* packed;
    const float* scales;       //!< [N, K / block]
    const uint8_t* zeroPoints; //!< [N, ceil(K / block / 2)], 4 bits each, low nibble first; nullptr: 8 everywhere
    int64_t n;                 //!< output features N
    int64_t k;                 //!< input features K, a multiple of block
    int64_t block;             //!< quantization block along K: 32, 64, 128 or 256
};

//! One product: y [M, N] = x [M, K] @ dequant(weight) [K, N], fp32 row-major x and y.
struct Int4Product
{
    const float* x;
    float* y;
    int64_t m;
    Int4Weight weight;
};

//! The parallel-for a kernel runs its tasks with: fn(arg, i) for i in [0, count), in any order and any thread.
using ParallelFor = void (*)(void* runner, void (*fn)(void*, size_t), size_t count, void* arg);

//! y = x @ dequant(W) with the fastest kernel this CPU has. Needs scratch it allocates itself.
void matMulInt4(const Int4Product& product, ParallelFor parallelFor, void* runner);

//! Whether matMulInt4 has a vectorized kernel on this CPU (AVX-512F); when not, it runs matMulInt4Reference,
//! which is correct and slow, and callers should prefer MLAS's kernel.
bool matMulInt4Vectorized();

//! The scalar definition: y[m, n] = sum_k x[m, k] * ((u[n, k] - zp[n, k / block]) * scale[n, k / block]).
void matMulInt4Reference(const Int4Product& product);

//! The AVX-512 kernels (matMulInt4Avx512.cpp, built with -mavx512f).
void matMulInt4Avx512(const Int4Product& product, ParallelFor parallelFor, void* runner);

//! k values of x per Int4SpanDigits: one span is 128 bytes (2 x 64) of every column's packed weights.
constexpr int64_t kInt4DigitSpan = 256;

//! x of one span of 256 k for gemvDigits (matMulInt4Vnni.cpp). A column's 128 bytes of the span are loaded as two
//! 64-byte halves h0, h1 and interleaved by dwords (VPUNPCKLDQ / VPUNPCKHDQ) into a and b: lane 4q + i of both takes
//! dwords of half i & 1 in its 16-byte group q, a dword 4q + (i >> 1) and b dword 4q + 2 + (i >> 1), so each lane
//! holds 16 weights of one block of 32 or more (int4SpanLaneK). Per lane a power-of-two scale and the three int8
//! digits of x / scale for its 16 k, laid out as those nibbles: digit[r][0] and [1] the low (even k) and high (odd
//! k) nibbles of a, [2] and [3] those of b; and 8 * the sum of the lane's integers (the zero point's share).
struct alignas(64) Int4SpanDigits
{
    int8_t digit[3][4][64];
    int32_t zeroPointSum[16];
    float scale[16];
};

//! The k (0 .. 255, within its span) of byte j (0 .. 3) of lane (0 .. 15) in part (0 .. 3) of Int4SpanDigits.
inline int int4SpanLaneK(int lane, int part, int j)
{
    const int group = lane / 4;
    const int half = lane % 2;
    const int dword = 4 * group + (lane % 4) / 2 + (part >= 2 ? 2 : 0);
    return 128 * half + 8 * dword + 2 * j + part % 2;
}

//! Whether gemvDigits runs a weight: no zero points (8 everywhere), K a multiple of 128, blocks of 32 or more.
inline bool int4DigitsRun(const Int4Weight& w)
{
    return w.zeroPoints == nullptr && w.k % 128 == 0 && w.block >= 32;
}
//! x [K] -> its digits (ceil(K / 256) spans; a last span of 128 k has zero digits above); false when x has an
//! infinity or NaN (the fp32 kernels run it then).
bool int4Digits(const float* x, int64_t k, Int4SpanDigits* spans);
//! y[n0 .. n1) of a one-row product (AVX512-VNNI).
void gemvDigits(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n0, int64_t n1, float* y);
//! Whether this CPU has AVX512-VNNI and AVX512BW (gemvDigits).
bool matMulInt4HasVnni();

//! The zero point of (column, block): 8 when the weight has none.
inline int32_t int4ZeroPoint(const Int4Weight& w, int64_t column, int64_t block)
{
    if (w.zeroPoints == nullptr)
    {
        return 8;
    }
    const int64_t blocks = w.k / w.block;
    const uint8_t byte = w.zeroPoints[column * ((blocks + 1) / 2) + block / 2];
    return (block % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
}

} // namespace qwen_vl
