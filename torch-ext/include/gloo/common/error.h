// Declaration-only stand-in for gloo's header; see ../README.md for why.
// ProcessGroupGloo.hpp includes it but uses nothing from it: gloo errors reach us as
// c10::Error / std::exception thrown by libtorch's own code.
#pragma once
