// AVX-512 kernels of matMulF32 (built with -mavx512f; matMulF32Kernel.cpp calls them only where the CPU has it).
// What each kernel does and why: matMulF32Kernel.h.
#include "matMulF32Kernel.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace qwen_vl
{
namespace
{

constexpr int64_t kRowTasks = 4;         //!< tasks of a [K, N] gemv: K split in 4 (2 per thread on 2 threads)
constexpr int64_t kRowsAtOnce = 4;       //!< rows of W one pass of a gemv task reads side by side
constexpr int64_t kReduceColumns = 1024; //!< columns per task of the partial sums' reduction
constexpr int64_t kDotTaskRows = 64;     //!< rows of a [N, K] W per task of the dot-product kernel
constexpr int64_t kTaskColumns = 128;    //!< columns of W per gemm task (512 bytes of each row at a time)
constexpr int64_t kDepth = 256;          //!< rows of W per gemm panel: [256, 128] fp32 = 128 KB (L2)
constexpr int64_t kPanelColumns = 32;    //!< columns of the gemm register tile (2 vectors)
constexpr int64_t kTileRows = 12;        //!< rows of the gemm register tile: 24 accumulators

inline __mmask16 tailMask(int64_t count)
{
    return static_cast<__mmask16>((1U << count) - 1U);
}

struct Job
{
    const F32Product* product;
    float* scratch;     //!< gemv: kRowTasks partial sums [N] each
    int64_t rowsPerTask; //!< gemv: rows of W per task
};

//! partial[task] = sum over its rows k of x[k] * W[k, :]
void gemvRowsTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const F32Product& p = *job.product;
    const int64_t n = p.n;
    const int64_t k0 = static_cast<int64_t>(task) * job.rowsPerTask;
    const int64_t k1 = std::min(p.k, k0 + job.rowsPerTask);
    float* out = job.scratch + static_cast<int64_t>(task) * n;
    std::memset(out, 0, sizeof(float) * n);
    const __mmask16 tail = tailMask(n % 16);
    const int64_t body = n - n % 16;
    int64_t k = k0;
    for (; k + kRowsAtOnce <= k1; k += kRowsAtOnce)
    {
        const float* w0 = p.w + k * n;
        const float* w1 = w0 + n;
        const float* w2 = w1 + n;
        const float* w3 = w2 + n;
        const __m512 x0 = _mm512_set1_ps(p.x[k]);
        const __m512 x1 = _mm512_set1_ps(p.x[k + 1]);
        const __m512 x2 = _mm512_set1_ps(p.x[k + 2]);
        const __m512 x3 = _mm512_set1_ps(p.x[k + 3]);
        for (int64_t j = 0; j < body; j += 16)
        {
            __m512 acc = _mm512_loadu_ps(out + j);
            acc = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + j), acc);
            acc = _mm512_fmadd_ps(x1, _mm512_loadu_ps(w1 + j), acc);
            acc = _mm512_fmadd_ps(x2, _mm512_loadu_ps(w2 + j), acc);
            acc = _mm512_fmadd_ps(x3, _mm512_loadu_ps(w3 + j), acc);
            _mm512_storeu_ps(out + j, acc);
        }
        if (tail != 0)
        {
            __m512 acc = _mm512_maskz_loadu_ps(tail, out + body);
            acc = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(tail, w0 + body), acc);
            acc = _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(tail, w1 + body), acc);
            acc = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(tail, w2 + body), acc);
            acc = _mm512_fmadd_ps(x3, _mm512_maskz_loadu_ps(tail, w3 + body), acc);
            _mm512_mask_storeu_ps(out + body, tail, acc);
        }
    }
    for (; k < k1; ++k)
    {
        const float* w0 = p.w + k * n;
        const __m512 x0 = _mm512_set1_ps(p.x[k]);
        for (int64_t j = 0; j < body; j += 16)
        {
            _mm512_storeu_ps(out + j, _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + j), _mm512_loadu_ps(out + j)));
        }
        if (tail != 0)
        {
            _mm512_mask_storeu_ps(out + body, tail,
                _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(tail, w0 + body), _mm512_maskz_loadu_ps(tail, out + body)));
        }
    }
}

//! y[j0 .. j0 + kReduceColumns) = the sum of the tasks' partial sums
void gemvReduceTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const F32Product& p = *job.product;
    const int64_t tasks = (p.k + job.rowsPerTask - 1) / job.rowsPerTask;
    const int64_t j0 = static_cast<int64_t>(task) * kReduceColumns;
    const int64_t j1 = std::min(p.n, j0 + kReduceColumns);
    for (int64_t j = j0; j < j1; j += 16)
    {
        const __mmask16 mask = tailMask(std::min<int64_t>(16, j1 - j));
        __m512 sum = _mm512_maskz_loadu_ps(mask, job.scratch + j);
        for (int64_t t = 1; t < tasks; ++t)
        {
            sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, job.scratch + t * p.n + j));
        }
        _mm512_mask_storeu_ps(p.y + j, mask, sum);
    }
}

//! y[:, n0 .. n0 + kDotTaskRows) for W [N, K]: row n of W against every row of x, rows of W in sequence
void dotRowsTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const F32Product& p = *job.product;
    const int64_t n0 = static_cast<int64_t>(task) * kDotTaskRows;
    const int64_t n1 = std::min(p.n, n0 + kDotTaskRows);
    const int64_t body = p.k - p.k % 64;
    for (int64_t n = n0; n < n1; ++n)
    {
        const float* w = p.w + n * p.k;
        for (int64_t row = 0; row < p.m; ++row)
        {
            const float* x = p.x + row * p.k;
            __m512 acc0 = _mm512_setzero_ps();
            __m512 acc1 = _mm512_setzero_ps();
            __m512 acc2 = _mm512_setzero_ps();
            __m512 acc3 = _mm512_setzero_ps();
            for (int64_t i = 0; i < body; i += 64)
            {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), acc1);
                acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(w + i + 32), acc2);
                acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(w + i + 48), acc3);
            }
            for (int64_t i = body; i < p.k; i += 16)
            {
                const __mmask16 mask = tailMask(std::min<int64_t>(16, p.k - i));
                acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i), _mm512_maskz_loadu_ps(mask, w + i), acc0);
            }
            p.y[row * p.n + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
        }
    }
}

//! y[m0 .. m0 + R, n0 .. n0 + columns) (+)= x[m0 .. m0 + R, k0 .. k0 + depth) @ panel: the panel is [depth, 32] with
//! row stride kTaskColumns (columns past N zero); the first K block stores y, the later ones add to it.
template <int R>
void gemmTile(const F32Product& p, const float* panel, int64_t depth, int64_t m0, int64_t k0, int64_t n0,
    int64_t columns, bool first)
{
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r)
    {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
    const float* x = p.x + m0 * p.k + k0;
    for (int64_t i = 0; i < depth; ++i)
    {
        const __m512 b0 = _mm512_load_ps(panel + i * kTaskColumns);
        const __m512 b1 = _mm512_load_ps(panel + i * kTaskColumns + 16);
        for (int r = 0; r < R; ++r)
        {
            const __m512 a = _mm512_set1_ps(x[r * p.k + i]);
            acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    const __mmask16 mask0 = tailMask(std::min<int64_t>(16, columns));
    const __mmask16 mask1 = columns > 16 ? tailMask(std::min<int64_t>(16, columns - 16)) : 0;
    for (int r = 0; r < R; ++r)
    {
        float* y = p.y + (m0 + r) * p.n + n0;
        if (!first)
        {
            acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(mask0, y));
            acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(mask1, y + 16));
        }
        _mm512_mask_storeu_ps(y, mask0, acc[r][0]);
        _mm512_mask_storeu_ps(y + 16, mask1, acc[r][1]);
    }
}

//! y[:, n0 .. n0 + 128): per block of kDepth rows of W, its 128 columns copied to a [kDepth, 128] panel (L2; 512
//! contiguous bytes per row of W read at a time), then for each 32 of them the rows of x in register tiles
void gemmTask(void* arg, size_t task)
{
    const Job& job = *static_cast<const Job*>(arg);
    const F32Product& p = *job.product;
    const int64_t n0 = static_cast<int64_t>(task) * kTaskColumns;
    const int64_t columns = std::min(kTaskColumns, p.n - n0);
    thread_local std::vector<float> storage;
    storage.resize(static_cast<size_t>(kDepth * kTaskColumns + 16));
    float* panel = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
    for (int64_t k0 = 0; k0 < p.k; k0 += kDepth)
    {
        const int64_t depth = std::min(kDepth, p.k - k0);
        for (int64_t i = 0; i < depth; ++i)
        {
            const float* row = p.w + (k0 + i) * p.n + n0;
            float* out = panel + i * kTaskColumns;
            for (int64_t j = 0; j < kTaskColumns; j += 16)
            {
                _mm512_store_ps(out + j, _mm512_maskz_loadu_ps(tailMask(std::clamp<int64_t>(columns - j, 0, 16)), row + j));
            }
        }
        for (int64_t g = 0; g < columns; g += kPanelColumns)
        {
            const float* sub = panel + g;
            const int64_t width = std::min(kPanelColumns, columns - g);
            const bool first = k0 == 0;
            int64_t m0 = 0;
            for (; m0 + kTileRows <= p.m; m0 += kTileRows)
            {
                gemmTile<kTileRows>(p, sub, depth, m0, k0, n0 + g, width, first);
            }
            for (; m0 + 6 <= p.m; m0 += 6)
            {
                gemmTile<6>(p, sub, depth, m0, k0, n0 + g, width, first);
            }
            for (; m0 + 3 <= p.m; m0 += 3)
            {
                gemmTile<3>(p, sub, depth, m0, k0, n0 + g, width, first);
            }
            for (; m0 < p.m; ++m0)
            {
                gemmTile<1>(p, sub, depth, m0, k0, n0 + g, width, first);
            }
        }
    }
}

size_t tasksOf(int64_t count, int64_t per)
{
    return static_cast<size_t>((count + per - 1) / per);
}

} // namespace

void matMulF32Avx512(const F32Product& product, ParallelFor parallelFor, void* runner)
{
    Job job{&product, nullptr, 0};
    if (product.transposed)
    {
        parallelFor(runner, dotRowsTask, tasksOf(product.n, kDotTaskRows), &job);
        return;
    }
    if (product.m == 1)
    {
        thread_local std::vector<float> partial;
        job.rowsPerTask = std::max<int64_t>((product.k + kRowTasks - 1) / kRowTasks, 1);
        const size_t tasks = tasksOf(product.k, job.rowsPerTask);
        partial.resize(tasks * static_cast<size_t>(product.n));
        job.scratch = partial.data();
        parallelFor(runner, gemvRowsTask, tasks, &job);
        parallelFor(runner, gemvReduceTask, tasksOf(product.n, kReduceColumns), &job);
        return;
    }
    parallelFor(runner, gemmTask, tasksOf(product.n, kTaskColumns), &job);
}

} // namespace qwen_vl
