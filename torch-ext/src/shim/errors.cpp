// Error strings and byte buffers handed to Rust, and how Rust gives them back.
#include "common.hpp"

namespace {
// Returned when malloc fails while reporting an error, so an error is never lost as NULL.
char kOutOfMemory[] = "out of memory while reporting a C++ error";
} // namespace

namespace tx {

char* error_string(const std::string& message) noexcept {
  char* copy = static_cast<char*>(std::malloc(message.size() + 1));
  if (copy == nullptr) {
    return kOutOfMemory;
  }
  std::memcpy(copy, message.c_str(), message.size() + 1);
  return copy;
}

} // namespace tx

extern "C" void tx_string_free(char* message) {
  if (message != kOutOfMemory) {
    std::free(message);
  }
}

extern "C" void tx_bytes_free(uint8_t* bytes) {
  std::free(bytes);
}
