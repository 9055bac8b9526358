// Declaration-only stand-in for gloo's header; see README.md in this folder for why.
// ProcessGroupGloo.hpp includes it but uses nothing from it.
#pragma once
