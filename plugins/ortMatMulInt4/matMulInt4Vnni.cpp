// The M = 1 kernel of matMulInt4 on CPUs with AVX512-VNNI (built with -mavx512f -mavx512bw -mavx512vnni): symmetric
// weights (zero point 8), K a multiple of 128.
//
// x is split, per run of 8 consecutive k (one dword lane below), into a power-of-two scale 2^(e - 22) with
// max |x| < 2^e and integers X = round(x * 2^(22 - e)), |X| <= 2^22, written as three signed int8 digits
// X = d2 * 2^16 + d1 * 2^8 + d0. X keeps x to 2^-23 of the largest |x| of its 8: the rounding of an fp32 sum of
// a few terms, not the 2^-8 of int8 activations (MatMulNBits accuracy level 4). Then for each column and each run of
// 128 k (64 bytes, one load; lane L = k 8L .. 8L + 7, in the low nibbles of bytes 4L .. 4L + 3 and the high ones):
//   A = sum over the lane's 8 k of (u - 8) * X, exactly, in int32: three VPDPBUSD pairs (u8 nibbles x int8 digits),
//       shifts and adds, minus 8 * sum X (precomputed per lane);
//   y += float(A) * (scale of the lane's block) * 2^(e - 22).
// A task's 64 columns are walked as 4 runs of 16 side by side (columns n, n + 16, n + 32, n + 48): each run is one
// sequential stream, and the digits of x, loaded once per span, serve four columns. Interleaving neighbouring
// columns' streams instead (n, n + 1, ...: many short streams) defeated the hardware prefetcher, and one column at a
// time read the digits (6 loads per 64 weight bytes) from L2 once K = 6144 pushed them out of L1.
#include "matMulInt4Kernel.h"

#include <immintrin.h>

#include <algorithm>

namespace qwen_vl
{

namespace
{
constexpr int64_t kSpan = 128;
} // namespace

bool int4Digits(const float* x, int64_t k, Int4SpanDigits* spans)
{
    // lane L of every vector below is the run k = 8L .. 8L + 7 of a span; element t of the run is a gather
    const __m512i runIndex = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    const __m512i byteMask = _mm512_set1_epi32(0xFF);
    for (int64_t s = 0; s < k / kSpan; ++s)
    {
        const float* span = x + s * kSpan;
        __m512 element[8];
        __m512 largest = _mm512_setzero_ps();
        for (int t = 0; t < 8; ++t)
        {
            element[t] = _mm512_i32gather_ps(runIndex, span + t, 4);
            largest = _mm512_max_ps(largest, _mm512_abs_ps(element[t]));
        }
        if (_mm512_cmp_ps_mask(largest, _mm512_set1_ps(3.4028235e38F), _CMP_NLE_UQ) != 0)
        {
            return false; // an infinity or NaN
        }
        // e with largest < 2^e: floor(log2 largest) + 1; 0 for an all-zero run
        const __mmask16 zero = _mm512_cmp_ps_mask(largest, _mm512_setzero_ps(), _CMP_EQ_OQ);
        const __m512 e = _mm512_mask_mov_ps(
            _mm512_add_ps(_mm512_getexp_ps(largest), _mm512_set1_ps(1.0F)), zero, _mm512_setzero_ps());
        const __m512 up = _mm512_sub_ps(_mm512_set1_ps(22.0F), e); // x * 2^(22 - e): exact, by scalef
        Int4SpanDigits& out = spans[s];
        _mm512_store_ps(out.scale, _mm512_scalef_ps(_mm512_set1_ps(1.0F), _mm512_sub_ps(e, _mm512_set1_ps(22.0F))));
        __m512i digit[3][8];
        __m512i sum = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t)
        {
            const __m512i v = _mm512_cvtps_epi32(_mm512_scalef_ps(element[t], up)); // nearest, |v| <= 2^22
            sum = _mm512_add_epi32(sum, v);
            const __m512i d0 = _mm512_sub_epi32(
                _mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)), byteMask), _mm512_set1_epi32(128));
            const __m512i v1 = _mm512_srai_epi32(_mm512_sub_epi32(v, d0), 8);
            const __m512i d1 = _mm512_sub_epi32(
                _mm512_and_si512(_mm512_add_epi32(v1, _mm512_set1_epi32(128)), byteMask), _mm512_set1_epi32(128));
            digit[0][t] = d0;
            digit[1][t] = d1;
            digit[2][t] = _mm512_srai_epi32(_mm512_sub_epi32(v1, d1), 8);
        }
        _mm512_store_si512(out.zeroPointSum, _mm512_slli_epi32(sum, 3));
        for (int r = 0; r < 3; ++r)
        {
            for (int half = 0; half < 2; ++half) // even k (low nibbles), odd k: bytes 4L .. 4L + 3 = t / 2 = 0..3
            {
                __m512i bytes = _mm512_and_si512(digit[r][half], byteMask);
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_and_si512(digit[r][half + 2], byteMask), 8));
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_and_si512(digit[r][half + 4], byteMask), 16));
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(digit[r][half + 6], 24));
                _mm512_store_si512(out.digit[r][half], bytes);
            }
        }
    }
    return true;
}

namespace
{

//! y[n], y[n + stride], ... (C columns, `stride` apart) of a one-row product: C sequential streams whose digit loads are
//! shared, so the L1 reads per weight byte fall by C (K = 6144: the digits, 24 KB, no longer fit beside the streams).
template <int C>
void gemvDigitsColumns(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n, int64_t stride, __m512i scaleIndex,
    __mmask16 scaleMask, float* y)
{
    const int64_t blocks = w.k / w.block;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const uint8_t* column[C];
    const float* scales[C];
    __m512 acc[C];
    for (int c = 0; c < C; ++c)
    {
        column[c] = w.packed + (n + c * stride) * (w.k / 2);
        scales[c] = w.scales + (n + c * stride) * blocks;
        acc[c] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < w.k / kSpan; ++s)
    {
        const Int4SpanDigits& x = spans[s];
        const __m512i d00 = _mm512_load_si512(x.digit[0][0]);
        const __m512i d10 = _mm512_load_si512(x.digit[1][0]);
        const __m512i d20 = _mm512_load_si512(x.digit[2][0]);
        const __m512i d01 = _mm512_load_si512(x.digit[0][1]);
        const __m512i d11 = _mm512_load_si512(x.digit[1][1]);
        const __m512i d21 = _mm512_load_si512(x.digit[2][1]);
        const __m512i zeroPointSum = _mm512_load_si512(x.zeroPointSum);
        const __m512 runScale = _mm512_load_ps(x.scale);
        for (int c = 0; c < C; ++c)
        {
            const __m512i packed = _mm512_loadu_si512(column[c] + s * (kSpan / 2));
            const __m512i low = _mm512_and_si512(packed, low4);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
            __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, d00);
            __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, d10);
            __m512i a2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, d20);
            a0 = _mm512_dpbusd_epi32(a0, high, d01);
            a1 = _mm512_dpbusd_epi32(a1, high, d11);
            a2 = _mm512_dpbusd_epi32(a2, high, d21);
            // |sum u * X| <= 8 * 15 * 2^22 < 2^29: exact in int32
            const __m512i a = _mm512_sub_epi32(
                _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(a2, 16), _mm512_slli_epi32(a1, 8)), a0),
                zeroPointSum);
            const __m512 laneScale = _mm512_mul_ps(
                _mm512_permutexvar_ps(scaleIndex, _mm512_maskz_loadu_ps(scaleMask, scales[c] + s * kSpan / w.block)),
                runScale);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), laneScale, acc[c]);
        }
    }
    for (int c = 0; c < C; ++c)
    {
        y[n + c * stride] = _mm512_reduce_add_ps(acc[c]);
    }
}

} // namespace

void gemvDigits(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n0, int64_t n1, float* y)
{
    const int64_t blocksPerSpan = std::max<int64_t>(kSpan / w.block, 1);
    alignas(64) int32_t laneBlock[16];
    for (int lane = 0; lane < 16; ++lane)
    {
        laneBlock[lane] = static_cast<int32_t>(std::min<int64_t>(8 * lane / w.block, blocksPerSpan - 1));
    }
    const __m512i scaleIndex = _mm512_load_si512(laneBlock);
    const __mmask16 scaleMask = static_cast<__mmask16>((1U << blocksPerSpan) - 1U);
    // the task's columns split into kStreams contiguous runs, walked side by side: each run one sequential stream
    // (so the hardware prefetcher still sees long streams), the digit loads shared by the four (measured against
    // 1, 2 and 8: docs/benchmarks.md)
    constexpr int kStreams = 4;
    const int64_t stride = (n1 - n0) / kStreams;
    int64_t n = n0;
    for (; n < n0 + stride; ++n)
    {
        gemvDigitsColumns<kStreams>(w, spans, n, stride, scaleIndex, scaleMask, y);
    }
    for (n = n0 + kStreams * stride; n < n1; ++n)
    {
        gemvDigitsColumns<1>(w, spans, n, 0, scaleIndex, scaleMask, y);
    }
}

} // namespace qwen_vl
