// Error handling shared by the qwen_vl plugins: every TensorRT-facing method is noexcept and routes
// failures through try/catch -> caughtError(), which logs through the TensorRT logger (setLoggerFinder).
#pragma once

#include <NvInferRuntime.h>

#include <exception>
#include <stdexcept>
#include <string>

namespace qwen_vl
{

class PluginError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

//! Logs through the logger TensorRT handed to setLoggerFinder (stderr when none was given).
void logMessage(nvinfer1::ILogger::Severity severity, char const* msg) noexcept;

inline void caughtError(std::exception const& e) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, e.what());
}

} // namespace qwen_vl

#define QWEN_STRINGIFY_(x) #x
#define QWEN_STRINGIFY(x) QWEN_STRINGIFY_(x)

//! Throws PluginError("file:line: msg") when `cond` is false; callers catch it in their noexcept method.
#define QWEN_VALIDATE(cond, msg)                                                                                     \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            throw ::qwen_vl::PluginError(std::string(__FILE__ ":" QWEN_STRINGIFY(__LINE__) ": ") + (msg));           \
        }                                                                                                              \
    } while (0)
