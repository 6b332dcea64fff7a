// Attention kernel selection (see attentionMma.h): environment choice and device capability, both cached.
#include "common/attentionMma.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime_api.h>

namespace
{
std::atomic<int32_t> gOverride{0};

qwen_vl::AttentionKernel environmentChoice()
{
    static qwen_vl::AttentionKernel const choice = []
    {
        char const* env = std::getenv("QWEN_VL_ATTENTION_KERNEL");
        if (env != nullptr && std::strcmp(env, "simt") == 0)
        {
            return qwen_vl::AttentionKernel::kSIMT;
        }
        if (env != nullptr && std::strcmp(env, "mma") == 0)
        {
            return qwen_vl::AttentionKernel::kMMA;
        }
        return qwen_vl::AttentionKernel::kAUTO;
    }();
    return choice;
}

//! Compute capability (major * 10 + minor) of the device current at first use; 0 if the query fails.
int32_t deviceComputeCapability()
{
    static int32_t const cc = []
    {
        int device = 0;
        int major = 0;
        int minor = 0;
        if (cudaGetDevice(&device) != cudaSuccess
            || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess
            || cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        {
            (void) cudaGetLastError(); // do not leave the failure for the launcher's cudaGetLastError
            return 0;
        }
        return major * 10 + minor;
    }();
    return cc;
}
} // namespace

namespace qwen_vl
{

bool useMmaAttention(DataKind dtype, int32_t headDim, std::initializer_list<void const*> pointers) noexcept
{
    int32_t const forced = gOverride.load(std::memory_order_relaxed);
    AttentionKernel const choice = forced != 0 ? static_cast<AttentionKernel>(forced) : environmentChoice();
    if (choice == AttentionKernel::kSIMT || (dtype != DataKind::kFLOAT16 && dtype != DataKind::kBFLOAT16)
        || !mmaSupportsHeadDim(headDim))
    {
        return false;
    }
    for (void const* p : pointers)
    {
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) // cp.async moves 16-byte chunks
        {
            return false;
        }
    }
    return deviceComputeCapability() >= 80;
}

} // namespace qwen_vl

extern "C" __attribute__((visibility("default"))) void qwen_vl_set_attention_kernel(int32_t kernel)
{
    gOverride.store(kernel >= 0 && kernel <= 2 ? kernel : 0, std::memory_order_relaxed);
}
