// matMulF32's dispatch (AVX-512 where the CPU has it) and its scalar reference.
#include "matMulF32Kernel.h"

namespace qwen_vl
{

void matMulF32Reference(const F32Product& p)
{
    for (int64_t row = 0; row < p.m; ++row)
    {
        const float* x = p.x + row * p.k;
        for (int64_t n = 0; n < p.n; ++n)
        {
            float sum = 0.0F;
            for (int64_t k = 0; k < p.k; ++k)
            {
                sum += x[k] * (p.transposed ? p.w[n * p.k + k] : p.w[k * p.n + n]);
            }
            p.y[row * p.n + n] = sum;
        }
    }
}

void matMulF32(const F32Product& product, ParallelFor parallelFor, void* runner)
{
    if (matMulInt4Vectorized()) // AVX-512F
    {
        matMulF32Avx512(product, parallelFor, runner);
        return;
    }
    matMulF32Reference(product);
}

} // namespace qwen_vl
