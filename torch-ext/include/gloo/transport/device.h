// Declaration-only stand-in for gloo's header; see ../README.md for why.
// ProcessGroupGloo.hpp holds these only as std::shared_ptr / std::unique_ptr, so incomplete
// types are enough.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
