// The `worker` backend: the graphs run in a Python child process (runtime/graph_worker.py: ONNX Runtime, numpy,
// no torch), spoken to over two pipes in frames of an 8-byte little-endian length + a safetensors blob whose
// __metadata__ is the command (the protocol table is in graph_worker.py). The child's stderr goes to a temporary
// file, so a Python traceback never reaches the user; its last line is quoted when the child dies. The child exits
// when its stdin closes: when this process ends or dies, or first when it asks it to (PR_SET_PDEATHSIG).
#include "backend.h"
#include "errors.h"
#include "safetensors.h"

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace qvl
{
namespace
{

class WorkerBackend : public Backend
{
public:
    WorkerBackend(Manifest const& m, BackendOptions const& opt)
    {
        char errPath[] = "/tmp/qwen-vl-worker-XXXXXX";
        int errFd = mkstemp(errPath);
        if (errFd < 0)
            throw UserError("worker backend: cannot create a temporary file for the worker's log");
        mErrPath = errPath;
        int toChild[2], fromChild[2];
        if (pipe(toChild) != 0 || pipe(fromChild) != 0)
            throw UserError("worker backend: cannot create pipes");
        pid_t const parent = getpid();
        mPid = fork();
        if (mPid < 0)
            throw UserError("worker backend: cannot fork");
        if (mPid == 0)
        {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent)
                _exit(1);
            dup2(toChild[0], 0);
            dup2(fromChild[1], 1);
            dup2(errFd, 2);
            for (int fd : {toChild[0], toChild[1], fromChild[0], fromChild[1], errFd})
                close(fd);
            std::string const module = "qwen_vl_trt.runtime.graph_worker";
            execlp(opt.python.c_str(), opt.python.c_str(), "-m", module.c_str(), m.directory.c_str(), "--ort-graphs",
                opt.ortGraphs.c_str(), static_cast<char*>(nullptr));
            std::fprintf(stderr, "cannot execute %s: %s\n", opt.python.c_str(), std::strerror(errno));
            _exit(127);
        }
        close(toChild[0]);
        close(fromChild[1]);
        close(errFd);
        mTo = toChild[1];
        mFrom = fromChild[0];
        fcntl(mTo, F_SETFD, FD_CLOEXEC);
        fcntl(mFrom, F_SETFD, FD_CLOEXEC);
        Metadata meta;
        receive(&meta);
        mDtype = meta["dtype"];
        if (mDtype != m.dtype)
            throw UserError("worker backend: the worker opened " + mDtype + " graphs, manifest.json says " + m.dtype);
    }

    ~WorkerBackend() override
    {
        close(mTo); // EOF: the worker returns from its loop
        close(mFrom);
        int status = 0;
        for (int i = 0; i < 200 && waitpid(mPid, &status, WNOHANG) == 0; ++i)
            usleep(10000);
        if (waitpid(mPid, &status, WNOHANG) == 0)
        {
            kill(mPid, SIGKILL);
            waitpid(mPid, &status, 0);
        }
        std::remove(mErrPath.c_str());
    }

    std::string name() const override { return "worker"; }

    void startCache(int64_t batch, int64_t cacheLen) override
    {
        send({}, {{"op", "cache"}, {"batch", std::to_string(batch)}, {"cache_len", std::to_string(cacheLen)}});
        receive(nullptr);
    }

    TensorMap run(std::string const& graph, TensorMap const& feeds) override
    {
        send(feeds, {{"op", "run"}, {"graph", graph}});
        return receive(nullptr);
    }

private:
    void send(TensorMap const& tensors, Metadata const& meta)
    {
        std::vector<uint8_t> blob = encodeSafetensors(tensors, meta);
        uint64_t n = blob.size();
        writeAll(reinterpret_cast<uint8_t const*>(&n), 8);
        writeAll(blob.data(), blob.size());
    }

    TensorMap receive(Metadata* metaOut)
    {
        uint64_t n = 0;
        readAll(reinterpret_cast<uint8_t*>(&n), 8);
        std::vector<uint8_t> blob(n);
        readAll(blob.data(), n);
        Metadata meta;
        TensorMap out = decodeSafetensors(blob, "a worker reply", &meta);
        if (meta["status"] == "error")
            throw UserError(meta["error"]);
        if (metaOut)
            *metaOut = meta;
        return out;
    }

    void writeAll(uint8_t const* p, size_t n) { transferAll(::write, mTo, p, n); }

    void readAll(uint8_t* p, size_t n) { transferAll(::read, mFrom, p, n); }

    // all n bytes through `io` (::read or ::write), retrying short transfers and EINTR; the worker gone -> died()
    template <typename Io, typename Byte>
    void transferAll(Io io, int fd, Byte* p, size_t n)
    {
        while (n > 0)
        {
            ssize_t k = io(fd, p, n);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                throw died();
            p += k;
            n -= static_cast<size_t>(k);
        }
    }

    UserError died()
    {
        int status = 0;
        waitpid(mPid, &status, 0);
        std::ifstream f(mErrPath);
        std::string line, last;
        while (std::getline(f, line))
            if (!line.empty())
                last = line;
        std::string const how = WIFEXITED(status) ? "exited with code " + std::to_string(WEXITSTATUS(status))
                                                  : "was killed by signal " + std::to_string(WTERMSIG(status));
        return UserError("graph worker " + how + (last.empty() ? "" : ": " + last)
            + " (is qwen_vl_trt installed for this --python?)");
    }

    pid_t mPid = -1;
    int mTo = -1, mFrom = -1;
    std::string mErrPath, mDtype;
};

} // namespace

std::unique_ptr<Backend> makeWorkerBackend(Manifest const& m, BackendOptions const& opt)
{
    return std::make_unique<WorkerBackend>(m, opt);
}

} // namespace qvl
