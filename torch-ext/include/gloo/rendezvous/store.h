// Declaration-only stand-in for gloo's header; see ../README.md for why.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

// PyTorch's pinned gloo defines this; ProcessGroupGloo::GlooStore then overrides the v2
// virtuals below, so they must be declared for the header to parse.
#define GLOO_STORE_HAS_STORE_V2 1

namespace gloo {
namespace rendezvous {

// Base of ProcessGroupGloo::GlooStore, which only libtorch constructs. The virtuals are
// declared with gloo's signatures so the `override`s in GlooStore match; none is defined.
// The protected constructor is defined nowhere (gloo's is implicit and inline, so libtorch
// exports none): constructing a GlooStore in our code, which would emit a vtable built from
// this stand-in, fails to link.
class Store {
 public:
  virtual ~Store();
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout);
  virtual bool has_v2_support();
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>& keys);
  virtual void multi_set(const std::vector<std::string>& keys, const std::vector<std::vector<char>>& values);
  virtual void append(const std::string& key, const std::vector<char>& data);
  virtual int64_t add(const std::string& key, int64_t value);

 protected:
  Store();
};

} // namespace rendezvous
} // namespace gloo
