// ONNX Runtime's entry point of libqwen_vl_ort_kernels.so (SessionOptions.register_custom_ops_library): the domain
// qwen_vl with MatMulInt4 and MatMulF32.
#include "ortOps.h"

#include <mutex>

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* apiBase)
{
    static std::once_flag once;
    static Ort::CustomOpDomain* domain = nullptr;
    try
    {
        std::call_once(once,
            [&]
            {
                Ort::InitApi(apiBase->GetApi(ORT_API_VERSION));
                domain = new Ort::CustomOpDomain(qwen_vl::kDomain);
                domain->Add(qwen_vl::matMulInt4Op());
                domain->Add(qwen_vl::matMulF32Op());
            });
        Ort::UnownedSessionOptions(options).Add(*domain);
        return nullptr;
    }
    catch (const std::exception& e)
    {
        return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
}
