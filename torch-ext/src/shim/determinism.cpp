// The process-wide switches that make CUDA kernels reproducible or fast: ATen's global
// context, as `torch.backends.cudnn.deterministic`, `torch.backends.cudnn.benchmark` and
// `torch.use_deterministic_algorithms(mode, warn_only=...)` set them from Python. tch reaches
// only the benchmark flag. None of them needs a GPU to be set; CPU kernels ignore the cuDNN
// ones.
#include <ATen/Context.h>

#include "common.hpp"

extern "C" char* tx_set_determinism(const tx_determinism* wanted) {
  return tx::guard([&] {
    at::Context& context = at::globalContext();
    context.setDeterministicCuDNN(wanted->cudnn_deterministic != 0);
    context.setBenchmarkCuDNN(wanted->cudnn_benchmark != 0);
    context.setDeterministicAlgorithms(wanted->deterministic_algorithms != 0, wanted->warn_only != 0);
  });
}

extern "C" char* tx_determinism_state(tx_determinism* out) {
  return tx::guard([&] {
    const at::Context& context = at::globalContext();
    out->cudnn_deterministic = context.deterministicCuDNN() ? 1 : 0;
    out->cudnn_benchmark = context.benchmarkCuDNN() ? 1 : 0;
    out->deterministic_algorithms = context.deterministicAlgorithms() ? 1 : 0;
    out->warn_only = context.deterministicAlgorithmsWarnOnly() ? 1 : 0;
  });
}
