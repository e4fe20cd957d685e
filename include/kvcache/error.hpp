// kvcache::error: the one exception type of the library. Every message names
// the offending value and the limit it broke, so a log line is enough to act on.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvcache {
inline namespace v0 {

class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string message(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

//! Throws kvcache::error built from `parts` unless `ok`. The parts are only
//! formatted on failure, so checks cost a branch on the hot path.
template <class... Parts>
inline void require(bool ok, Parts&&... parts) {
  if (!ok) [[unlikely]]
    throw error(message("kvcache: ", std::forward<Parts>(parts)...));
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
