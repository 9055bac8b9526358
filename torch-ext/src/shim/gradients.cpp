// Drops a tensor's accumulated gradient, as `param.grad = None` does in Python (what
// `torch.optim.Optimizer.zero_grad()` does by default since PyTorch 2.0). tch can only zero it
// in place, after which every backward pass adds into the old buffer instead of writing a
// fresh one.
#include "common.hpp"

extern "C" char* tx_clear_grad(tx_tensor* tensor) {
  return tx::guard([&] { tensor->mutable_grad().reset(); });
}
