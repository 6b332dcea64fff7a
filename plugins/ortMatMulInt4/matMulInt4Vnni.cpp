// The M = 1 kernel of matMulInt4 on CPUs with AVX512-VNNI (built with -mavx512f -mavx512bw -mavx512vnni): symmetric
// weights (zero point 8), K a multiple of 128.
//
// x is split, per group of 16 k that one int32 lane sums (Int4SpanDigits: two runs of 8 inside 32 consecutive k),
// into a power-of-two scale 2^(e - 22) with max |x| < 2^e and integers X = round(x * 2^(22 - e)), |X| <= 2^22,
// written as three signed int8 digits X = d2 * 2^16 + d1 * 2^8 + d0. X keeps x to 2^-23 of the largest |x| of its
// 16: the rounding of an fp32 sum of a few terms, not the 2^-8 of int8 activations (MatMulNBits accuracy level 4).
// Then for each column and each span of 256 k (128 bytes, two loads interleaved by dwords so that every lane holds
// 16 weights of one block):
//   A = sum over the lane's 16 k of (u - 8) * X, exactly, in int32: twelve VPDPBUSD (u8 nibbles x int8 digits), the
//       digits from the highest, the partial sum shifted left 8 bits between digits, minus 8 * sum X (per lane,
//       precomputed);
//   y += float(A) * (scale of the lane's block) * 2^(e - 22).
// So the conversion and the two scalings come once per 256 weights of a column, not once per 128.
// A task's 64 columns are walked as 4 runs of 16 side by side (columns n, n + 16, n + 32, n + 48): each run is one
// sequential stream, and the digits of x, loaded once per span, serve four columns. Interleaving neighbouring
// columns' streams instead (n, n + 1, ...: many short streams) defeated the hardware prefetcher, and one column at a
// time read the digits from L2 once K = 6144 pushed them out of L1. Each stream is also prefetched 1 KB ahead (the
// distance of 512 B to 4 KB that a one-off scratch comparison found best; docs/benchmarks.md).
#include "matMulInt4Kernel.h"

#include <immintrin.h>

#include <algorithm>

namespace qwen_vl
{

namespace
{
constexpr int64_t kSpanBytes = kInt4DigitSpan / 2; //!< a column's packed bytes per span
constexpr int64_t kPrefetchBytes = 1024;           //!< how far ahead of its loads a stream is prefetched
} // namespace

bool int4Digits(const float* x, int64_t k, Int4SpanDigits* spans)
{
    // element t = 4 * part + j of every lane: byte j of the lane in that part; lane l of a vector is a gather
    alignas(64) int32_t elementK[16][16];
    for (int lane = 0; lane < 16; ++lane)
    {
        for (int t = 0; t < 16; ++t)
        {
            elementK[t][lane] = int4SpanLaneK(lane, t / 4, t % 4);
        }
    }
    const __m512i byteMask = _mm512_set1_epi32(0xFF);
    for (int64_t s = 0; s * kInt4DigitSpan < k; ++s)
    {
        const float* span = x + s * kInt4DigitSpan;
        const __m512i valid = _mm512_set1_epi32(static_cast<int32_t>(std::min(kInt4DigitSpan, k - s * kInt4DigitSpan)));
        __m512 element[16];
        __m512 largest = _mm512_setzero_ps();
        for (int t = 0; t < 16; ++t)
        {
            const __m512i index = _mm512_load_si512(elementK[t]);
            const __mmask16 inside = _mm512_cmp_epi32_mask(index, valid, _MM_CMPINT_LT); // a last span of 128 k
            element[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, index, span, 4);
            largest = _mm512_max_ps(largest, _mm512_abs_ps(element[t]));
        }
        if (_mm512_cmp_ps_mask(largest, _mm512_set1_ps(3.4028235e38F), _CMP_NLE_UQ) != 0)
        {
            return false; // an infinity or NaN
        }
        // e with largest < 2^e: floor(log2 largest) + 1; 0 for an all-zero lane
        const __mmask16 zero = _mm512_cmp_ps_mask(largest, _mm512_setzero_ps(), _CMP_EQ_OQ);
        const __m512 e = _mm512_mask_mov_ps(
            _mm512_add_ps(_mm512_getexp_ps(largest), _mm512_set1_ps(1.0F)), zero, _mm512_setzero_ps());
        const __m512 up = _mm512_sub_ps(_mm512_set1_ps(22.0F), e); // x * 2^(22 - e): exact, by scalef
        Int4SpanDigits& out = spans[s];
        _mm512_store_ps(out.scale, _mm512_scalef_ps(_mm512_set1_ps(1.0F), _mm512_sub_ps(e, _mm512_set1_ps(22.0F))));
        __m512i digit[3][16];
        __m512i sum = _mm512_setzero_si512();
        for (int t = 0; t < 16; ++t)
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
            for (int part = 0; part < 4; ++part)
            {
                const __m512i* d = digit[r] + 4 * part;
                __m512i bytes = _mm512_and_si512(d[0], byteMask);
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_and_si512(d[1], byteMask), 8));
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(_mm512_and_si512(d[2], byteMask), 16));
                bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(d[3], 24));
                _mm512_store_si512(out.digit[r][part], bytes);
            }
        }
    }
    return true;
}

namespace
{

//! The block scales of one span of a column, where lane l's block is element l / 2, / 4, ... of the vector (the
//! permute in gemvDigitsColumns picks them): B = 8, 4, 2, 1 blocks per span (block 32, 64, 128, 256 or more). Whole
//! loads, no mask: the masked 64-byte load of one scale that the kernel did before made block 128 slower than 32.
template <int B>
inline __m512 spanScales(const float* scales)
{
    if constexpr (B == 8)
    {
        return _mm512_castps256_ps512(_mm256_loadu_ps(scales));
    }
    else if constexpr (B == 4)
    {
        return _mm512_castps128_ps512(_mm_loadu_ps(scales));
    }
    else if constexpr (B == 2)
    {
        return _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scales))));
    }
    else
    {
        return _mm512_set1_ps(*scales);
    }
}

//! The span's digits as gemvDigitsColumns holds them in registers.
inline void loadDigits(const Int4SpanDigits& x, __m512i (&digit)[3][4])
{
    for (int r = 0; r < 3; ++r)
    {
        for (int part = 0; part < 4; ++part)
        {
            digit[r][part] = _mm512_load_si512(x.digit[r][part]);
        }
    }
}

//! One column's 16 lane sums of a span from its packed bytes, A = sum (u - 8) * X exactly (|A| <= 16 * 8 * 2^22 =
//! 2^29). `full` false: the last span of K % 256 == 128, whose second 64 bytes are not the column's (its digits
//! there are zero).
inline __m512i spanSums(const uint8_t* bytes, const __m512i (&digit)[3][4], __m512i zeroPointSum, bool full)
{
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i h0 = _mm512_loadu_si512(bytes);
    const __m512i h1 = full ? _mm512_loadu_si512(bytes + 64) : _mm512_setzero_si512();
    const __m512i a = _mm512_unpacklo_epi32(h0, h1);
    const __m512i b = _mm512_unpackhi_epi32(h0, h1);
    const __m512i aLow = _mm512_and_si512(a, low4);
    const __m512i aHigh = _mm512_and_si512(_mm512_srli_epi16(a, 4), low4);
    const __m512i bLow = _mm512_and_si512(b, low4);
    const __m512i bHigh = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    // two dependency chains (a's and b's 8 products of a lane) for the two highest digits, joined before the lowest
    __m512i sumA = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aLow, digit[2][0]);
    __m512i sumB = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bLow, digit[2][2]);
    sumA = _mm512_dpbusd_epi32(sumA, aHigh, digit[2][1]);
    sumB = _mm512_dpbusd_epi32(sumB, bHigh, digit[2][3]);
    sumA = _mm512_dpbusd_epi32(_mm512_slli_epi32(sumA, 8), aLow, digit[1][0]);
    sumB = _mm512_dpbusd_epi32(_mm512_slli_epi32(sumB, 8), bLow, digit[1][2]);
    sumA = _mm512_dpbusd_epi32(sumA, aHigh, digit[1][1]);
    sumB = _mm512_dpbusd_epi32(sumB, bHigh, digit[1][3]);
    __m512i sum = _mm512_slli_epi32(_mm512_add_epi32(sumA, sumB), 8);
    sum = _mm512_dpbusd_epi32(sum, aLow, digit[0][0]);
    sum = _mm512_dpbusd_epi32(sum, aHigh, digit[0][1]);
    sum = _mm512_dpbusd_epi32(sum, bLow, digit[0][2]);
    sum = _mm512_dpbusd_epi32(sum, bHigh, digit[0][3]);
    return _mm512_sub_epi32(sum, zeroPointSum);
}

//! y[n], y[n + stride], ... (C columns, `stride` apart) of a one-row product: C sequential streams whose digit loads are
//! shared. B: blocks per span (spanScales).
template <int C, int B>
void gemvDigitsColumns(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n, int64_t stride, __m512i scaleIndex,
    float* y)
{
    const int64_t blocks = w.k / w.block;
    const int64_t fullSpans = w.k / kInt4DigitSpan;
    const uint8_t* column[C];
    const float* scales[C];
    __m512 acc[C];
    for (int c = 0; c < C; ++c)
    {
        column[c] = w.packed + (n + c * stride) * (w.k / 2);
        scales[c] = w.scales + (n + c * stride) * blocks;
        acc[c] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < fullSpans; ++s)
    {
        const Int4SpanDigits& x = spans[s];
        __m512i digit[3][4];
        loadDigits(x, digit);
        const __m512i zeroPointSum = _mm512_load_si512(x.zeroPointSum);
        const __m512 runScale = _mm512_load_ps(x.scale);
        for (int c = 0; c < C; ++c)
        {
            const uint8_t* bytes = column[c] + s * kSpanBytes;
            _mm_prefetch(reinterpret_cast<const char*>(bytes + kPrefetchBytes), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(bytes + kPrefetchBytes + 64), _MM_HINT_T0);
            const __m512i sum = spanSums(bytes, digit, zeroPointSum, true);
            const __m512 laneScale =
                _mm512_mul_ps(_mm512_permutexvar_ps(scaleIndex, spanScales<B>(scales[c] + s * B)), runScale);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), laneScale, acc[c]);
        }
    }
    if (w.k % kInt4DigitSpan != 0) // the last 128 k: half a span, its blocks' scales loaded under a mask
    {
        const Int4SpanDigits& x = spans[fullSpans];
        __m512i digit[3][4];
        loadDigits(x, digit);
        const __mmask16 halfBlocks = static_cast<__mmask16>((1U << std::max(B / 2, 1)) - 1U);
        for (int c = 0; c < C; ++c)
        {
            const __m512i sum = spanSums(column[c] + fullSpans * kSpanBytes, digit, _mm512_load_si512(x.zeroPointSum), false);
            const __m512 blockScales = _mm512_maskz_loadu_ps(halfBlocks, scales[c] + fullSpans * B);
            const __m512 laneScale = _mm512_mul_ps(_mm512_permutexvar_ps(scaleIndex, blockScales), _mm512_load_ps(x.scale));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), laneScale, acc[c]);
        }
    }
    for (int c = 0; c < C; ++c)
    {
        y[n + c * stride] = _mm512_reduce_add_ps(acc[c]);
    }
}

template <int B>
void gemvDigitsBlocks(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n0, int64_t n1, float* y)
{
    alignas(64) int32_t laneBlock[16];
    for (int lane = 0; lane < 16; ++lane)
    {
        laneBlock[lane] = static_cast<int32_t>(int4SpanLaneK(lane, 0, 0) / std::min<int64_t>(w.block, kInt4DigitSpan));
    }
    const __m512i scaleIndex = _mm512_load_si512(laneBlock);
    // the task's columns split into kStreams contiguous runs, walked side by side: each run one sequential stream
    // (so the hardware prefetcher still sees long streams), the digit loads shared by the four (measured against
    // 1, 2 and 8: docs/benchmarks.md)
    constexpr int kStreams = 4;
    const int64_t stride = (n1 - n0) / kStreams;
    for (int64_t n = n0; n < n0 + stride; ++n)
    {
        gemvDigitsColumns<kStreams, B>(w, spans, n, stride, scaleIndex, y);
    }
    for (int64_t n = n0 + kStreams * stride; n < n1; ++n)
    {
        gemvDigitsColumns<1, B>(w, spans, n, 0, scaleIndex, y);
    }
}

} // namespace

void gemvDigits(const Int4Weight& w, const Int4SpanDigits* spans, int64_t n0, int64_t n1, float* y)
{
    switch (std::max<int64_t>(kInt4DigitSpan / w.block, 1))
    {
    case 8: gemvDigitsBlocks<8>(w, spans, n0, n1, y); break;
    case 4: gemvDigitsBlocks<4>(w, spans, n0, n1, y); break;
    case 2: gemvDigitsBlocks<2>(w, spans, n0, n1, y); break;
    default: gemvDigitsBlocks<1>(w, spans, n0, n1, y); break;
    }
}

} // namespace qwen_vl
