// What every translation unit of the shim shares: the handle types behind the opaque C
// structs, and the guard that turns C++ exceptions into error strings.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "torch_ext.h"

struct tx_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct tx_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace tx {

// A malloc'd copy of `message`, freed by tx_string_free. Returns a static string if even that
// allocation fails, which tx_string_free recognises and leaves alone.
char* error_string(const std::string& message) noexcept;

// Runs `body`; returns NULL if it finished, else the exception's message. c10::Error (which
// every c10d error derives from) is reported without the C++ backtrace libtorch appends to
// what(): the caller wants the reason, and TORCH_SHOW_CPP_STACKTRACES=1 still adds it.
template <class F>
char* guard(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return error_string(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_string(e.what());
  } catch (...) {
    return error_string("unknown C++ exception");
  }
}

// Waits for a collective to finish; Work::wait rethrows a failed collective's exception.
inline void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
}

inline std::chrono::milliseconds millis(int64_t ms) {
  return std::chrono::milliseconds(ms);
}

} // namespace tx
