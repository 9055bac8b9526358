// Declaration-only stand-in for gloo's header; see README.md in this folder for why.
#pragma once

#include <chrono>

namespace gloo {

// Held by ProcessGroupGloo only through std::shared_ptr. setTimeout is named by the inline
// ProcessGroupGloo::setTimeout (declared with gloo's signature; the shim never calls it). The
// private constructor makes constructing a Context in our code a compile error.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);

 private:
  Context();
};

} // namespace gloo
