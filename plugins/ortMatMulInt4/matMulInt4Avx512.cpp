// AVX-512 kernels of matMulInt4 (built with -mavx512f; matMulInt4Kernel.cpp calls them only where the CPU has it).
//
// Both kernels take K in a permuted order inside every run of 32 (one 16-byte chunk of packed weights): the 16 low
// nibbles (k = 0, 2, ..., 30) first, then the 16 high nibbles (k = 1, 3, ..., 31). The weights dequantize into that
// order with no shuffle, and the activations are permuted to match once per call.
//   M = 1 (decode): without zero points (symmetric weights, our exports), K a multiple of 128 and AVX512-VNNI,
//   gemvDigits (matMulInt4Vnni.cpp: integer products on x held as three int8 digits). Otherwise gemvColumns, four
//   columns side by side: each 16-byte chunk -> 2 x 16 weights by a table permute -> 2 FMAs (in the 32-order above).
//   M > 1 (prefill): gemm. A task dequantizes 16 columns into an fp32 panel in L2, then a 48 x 8 register tile runs
//   over K with the rows of x^T as vectors and the panel's weights broadcast.
#include "matMulInt4Kernel.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace qwen_vl
{
namespace
{

constexpr int64_t kChunk = 32;           //!< k values in one 16-byte chunk of packed weights
constexpr int64_t kGemvTaskColumns = 64; //!< columns per parallel task at M = 1
constexpr int64_t kGemmTaskColumns = 16; //!< columns per parallel task at M > 1 (one dequantized panel)
constexpr int64_t kTileColumns = 8;      //!< columns of the gemm register tile
constexpr int64_t kTileRows = 48;        //!< rows of the gemm register tile (3 vectors)

//! The 16 fp32 weights of the nibble values 0..15 in (column, block): (u - zero point) * scale.
inline __m512 blockTable(const Int4Weight& w, int64_t column, int64_t block, __m512 iota)
{
    const float scale = w.scales[column * (w.k / w.block) + block];
    const float zeroPoint = static_cast<float>(int4ZeroPoint(w, column, block));
    return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zeroPoint)), _mm512_set1_ps(scale));
}

inline __m512i loadNibbles(const uint8_t* chunk)
{
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
}

//! x [M, K] -> its k-permuted copy: x^T [K, ldm] for the gemm (rows M..ldm-1 zero), or [K] when M = 1.
void permuteActivations(const float* x, int64_t m, int64_t k, int64_t ldm, float* out)
{
    for (int64_t c = 0; c < k; c += kChunk)
    {
        for (int64_t row = 0; row < m; ++row)
        {
            const float* src = x + row * k + c;
            for (int64_t i = 0; i < kChunk / 2; ++i)
            {
                out[(c + i) * ldm + row] = src[2 * i];
                out[(c + kChunk / 2 + i) * ldm + row] = src[2 * i + 1];
            }
        }
        for (int64_t i = 0; i < kChunk; ++i)
        {
            std::fill(out + (c + i) * ldm + m, out + (c + i) * ldm + ldm, 0.0F);
        }
    }
}

//! y[n0 .. n0 + C) of a one-row product; xp is x k-permuted.
template <int C>
void gemvColumns(const Int4Weight& w, const float* xp, int64_t n0, float* y)
{
    const int64_t blocks = w.k / w.block;
    const int64_t chunks = w.block / kChunk;
    const int64_t blockBytes = w.block / 2;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint8_t* column[C];
    __m512 low[C];
    __m512 high[C];
    for (int j = 0; j < C; ++j)
    {
        column[j] = w.packed + (n0 + j) * blocks * blockBytes;
        low[j] = _mm512_setzero_ps();
        high[j] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < blocks; ++b)
    {
        __m512 table[C];
        for (int j = 0; j < C; ++j)
        {
            table[j] = blockTable(w, n0 + j, b, iota);
        }
        for (int64_t c = 0; c < chunks; ++c)
        {
            const float* xc = xp + (b * chunks + c) * kChunk;
            const __m512 xEven = _mm512_loadu_ps(xc);
            const __m512 xOdd = _mm512_loadu_ps(xc + 16);
            for (int j = 0; j < C; ++j)
            {
                const __m512i u = loadNibbles(column[j] + b * blockBytes + c * 16);
                low[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(u, table[j]), xEven, low[j]);
                high[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table[j]), xOdd, high[j]);
            }
        }
    }
    for (int j = 0; j < C; ++j)
    {
        y[n0 + j] = _mm512_reduce_add_ps(_mm512_add_ps(low[j], high[j]));
    }
}

//! The panel [kGemmTaskColumns, K] of columns n0.. in fp32, k-permuted; columns past N are zero.
void dequantizePanel(const Int4Weight& w, int64_t n0, float* panel)
{
    const int64_t blocks = w.k / w.block;
    const int64_t chunks = w.block / kChunk;
    const int64_t blockBytes = w.block / 2;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t j = 0; j < kGemmTaskColumns; ++j)
    {
        float* out = panel + j * w.k;
        if (n0 + j >= w.n)
        {
            std::memset(out, 0, sizeof(float) * w.k);
            continue;
        }
        const uint8_t* column = w.packed + (n0 + j) * blocks * blockBytes;
        for (int64_t b = 0; b < blocks; ++b)
        {
            const __m512 table = blockTable(w, n0 + j, b, iota);
            for (int64_t c = 0; c < chunks; ++c)
            {
                const __m512i u = loadNibbles(column + b * blockBytes + c * 16);
                float* dst = out + (b * chunks + c) * kChunk;
                _mm512_storeu_ps(dst, _mm512_permutexvar_ps(u, table));
                _mm512_storeu_ps(dst + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table));
            }
        }
    }
}

//! tile[j][r] = sum_k xT[k][r] * panel[j][k] for R x 16 rows and kTileColumns (8) columns: 24 accumulators at R = 3.
template <int R>
void gemmTile(const float* xT, int64_t ldm, const float* panel, int64_t k, float* tile)
{
    __m512 acc[kTileColumns][R];
    for (int j = 0; j < kTileColumns; ++j)
    {
        for (int r = 0; r < R; ++r)
        {
            acc[j][r] = _mm512_setzero_ps();
        }
    }
    for (int64_t i = 0; i < k; ++i)
    {
        __m512 a[R];
        for (int r = 0; r < R; ++r)
        {
            a[r] = _mm512_loadu_ps(xT + i * ldm + r * 16);
        }
        for (int j = 0; j < kTileColumns; ++j)
        {
            const __m512 b = _mm512_set1_ps(panel[j * k + i]);
            for (int r = 0; r < R; ++r)
            {
                acc[j][r] = _mm512_fmadd_ps(a[r], b, acc[j][r]);
            }
        }
    }
    for (int j = 0; j < kTileColumns; ++j)
    {
        for (int r = 0; r < R; ++r)
        {
            _mm512_storeu_ps(tile + j * kTileRows + r * 16, acc[j][r]);
        }
    }
}

struct Job
{
    const Int4Product* product;
    const float* permuted; //!< x k-permuted: [K] (gemv) or x^T [K, ldm] (gemm)
    int64_t ldm;
    const Int4SpanDigits* digits; //!< x as gemvDigits takes it
};

void gemvTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const Int4Weight& w = job.product->weight;
    const int64_t n0 = static_cast<int64_t>(task) * kGemvTaskColumns;
    const int64_t n1 = std::min(w.n, n0 + kGemvTaskColumns);
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
    {
        gemvColumns<4>(w, job.permuted, n, job.product->y);
    }
    for (; n < n1; ++n)
    {
        gemvColumns<1>(w, job.permuted, n, job.product->y);
    }
}

void gemvDigitsTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const Int4Weight& w = job.product->weight;
    const int64_t n0 = static_cast<int64_t>(task) * kGemvTaskColumns;
    gemvDigits(w, job.digits, n0, std::min(w.n, n0 + kGemvTaskColumns), job.product->y);
}

void gemmTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const Int4Product& p = *job.product;
    const Int4Weight& w = p.weight;
    thread_local std::vector<float> panel;
    panel.resize(static_cast<size_t>(kGemmTaskColumns * w.k));
    const int64_t n0 = static_cast<int64_t>(task) * kGemmTaskColumns;
    const int64_t columns = std::min(kGemmTaskColumns, w.n - n0);
    dequantizePanel(w, n0, panel.data());
    alignas(64) float tile[kTileColumns * kTileRows];
    for (int64_t m0 = 0; m0 < p.m; m0 += kTileRows)
    {
        const int64_t rows = std::min(kTileRows, p.m - m0);
        for (int64_t g = 0; g < columns; g += kTileColumns)
        {
            const float* xT = job.permuted + m0;
            const float* group = panel.data() + g * w.k;
            if (rows > 32)
            {
                gemmTile<3>(xT, job.ldm, group, w.k, tile);
            }
            else if (rows > 16)
            {
                gemmTile<2>(xT, job.ldm, group, w.k, tile);
            }
            else
            {
                gemmTile<1>(xT, job.ldm, group, w.k, tile);
            }
            const int64_t groupColumns = std::min(kTileColumns, columns - g);
            for (int64_t r = 0; r < rows; ++r)
            {
                float* yRow = p.y + (m0 + r) * w.n + n0 + g;
                for (int64_t j = 0; j < groupColumns; ++j)
                {
                    yRow[j] = tile[j * kTileRows + r];
                }
            }
        }
    }
}

} // namespace

void matMulInt4Avx512(const Int4Product& product, ParallelFor parallelFor, void* runner)
{
    const Int4Weight& w = product.weight;
    thread_local std::vector<float> permuted;
    Job job{&product, nullptr, 1, nullptr};
    const size_t tasks = static_cast<size_t>((w.n + kGemvTaskColumns - 1) / kGemvTaskColumns);
    if (product.m == 1 && matMulInt4HasVnni() && int4DigitsRun(w))
    {
        thread_local std::vector<Int4SpanDigits> digits;
        digits.resize(static_cast<size_t>((w.k + kInt4DigitSpan - 1) / kInt4DigitSpan));
        if (int4Digits(product.x, w.k, digits.data()))
        {
            job.digits = digits.data();
            parallelFor(runner, gemvDigitsTask, tasks, &job);
            return;
        }
    }
    if (product.m == 1)
    {
        permuted.resize(static_cast<size_t>(w.k));
        permuteActivations(product.x, 1, w.k, 1, permuted.data());
        job.permuted = permuted.data();
        parallelFor(runner, gemvTask, tasks, &job);
        return;
    }
    job.ldm = (product.m + 15) / 16 * 16; // a tile reads whole vectors of rows: up to M rounded up to 16
    permuted.resize(static_cast<size_t>(w.k * job.ldm));
    permuteActivations(product.x, product.m, w.k, job.ldm, permuted.data());
    job.permuted = permuted.data();
    parallelFor(runner, gemmTask, static_cast<size_t>((w.n + kGemmTaskColumns - 1) / kGemmTaskColumns), &job);
}

} // namespace qwen_vl
