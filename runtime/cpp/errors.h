// Errors the user can fix (bad request, artifacts, flags, a backend that cannot start): main() prints
// `error: <what()>` as one line on stderr and exits 2. Anything else reaching main() is a bug (exit 1).
#pragma once

#include <stdexcept>
#include <string>

namespace qvl
{

struct UserError : std::runtime_error
{
    explicit UserError(std::string const& what)
        : std::runtime_error(what)
    {
    }
};

} // namespace qvl
