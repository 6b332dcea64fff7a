// matMulInt4's dispatch (AVX-512 where the CPU has it) and its scalar reference.
#include "matMulInt4Kernel.h"

namespace qwen_vl
{

bool matMulInt4Vectorized()
{
    static const bool vectorized = []
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") != 0;
    }();
    return vectorized;
}

bool matMulInt4HasVnni()
{
    static const bool vnni = []
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512vnni") != 0 && __builtin_cpu_supports("avx512bw") != 0;
    }();
    return vnni;
}

void matMulInt4Reference(const Int4Product& p)
{
    const Int4Weight& w = p.weight;
    const int64_t blocks = w.k / w.block;
    for (int64_t row = 0; row < p.m; ++row)
    {
        const float* x = p.x + row * w.k;
        for (int64_t n = 0; n < w.n; ++n)
        {
            float sum = 0.0F;
            for (int64_t k = 0; k < w.k; ++k)
            {
                const int64_t b = k / w.block;
                const uint8_t byte = w.packed[(n * blocks + b) * (w.block / 2) + (k % w.block) / 2];
                const int32_t u = (k % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
                const float weight = static_cast<float>(u - int4ZeroPoint(w, n, b)) * w.scales[n * blocks + b];
                sum += x[k] * weight;
            }
            p.y[row * w.n + n] = sum;
        }
    }
}

void matMulInt4(const Int4Product& product, ParallelFor parallelFor, void* runner)
{
    if (matMulInt4Vectorized() && product.weight.block % 32 == 0)
    {
        matMulInt4Avx512(product, parallelFor, runner);
        return;
    }
    matMulInt4Reference(product);
}

} // namespace qwen_vl
