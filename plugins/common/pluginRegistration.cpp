// The library's only exported symbols: getCreators and setLoggerFinder (IPluginRegistry::loadLibrary needs both).
#include "common/checkMacros.h"
#include "kvCacheAttention/kvCacheAttentionPlugin.h"
#include "moeExperts/moeExpertsPlugin.h"
#include "mrope/mropePlugin.h"
#include "varlenAttention/varlenAttentionPlugin.h"

#include <atomic>
#include <cstdio>
#include <iterator>

using namespace nvinfer1;

namespace
{
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
}

namespace qwen_vl
{
void logMessage(ILogger::Severity severity, char const* msg) noexcept
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(severity, msg);
    }
    else
    {
        std::fprintf(stderr, "[qwen_vl plugins] %s\n", msg);
    }
}
} // namespace qwen_vl

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder.store(finder);
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static IPluginCreatorInterface* const sCreators[] = {qwen_vl::mropePluginCreator(),
        qwen_vl::varlenAttentionPluginCreator(), qwen_vl::kvCacheAttentionPluginCreator(),
        qwen_vl::moeExpertsPluginCreator()};
    nbCreators = static_cast<int32_t>(std::size(sCreators));
    return sCreators;
}
