// Linked instead of trt_backend.cpp when build.sh found no TensorRT headers + library + CUDA runtime.
#include "backend.h"
#include "errors.h"

#ifndef QVL_TRT_MISSING
#define QVL_TRT_MISSING "TensorRT was not found at build time"
#endif

namespace qvl
{

std::unique_ptr<Backend> makeTensorRTBackend(Manifest const&, BackendOptions const&)
{
    throw UserError(std::string("this qwen-vl-generate was built without the tensorrt backend (") + QVL_TRT_MISSING
        + "); rebuild with runtime/cpp/build.sh where TensorRT and CUDA are installed, or use --backend worker");
}

} // namespace qvl
