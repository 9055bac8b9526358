// Collectives that autograd differentiates through, as torch::autograd::Function: tch's
// backward() runs them like any libtorch op. The process group is kept alive by the graph
// (saved as an IValue capsule), so backward works even after the Rust handle is dropped.
//
// Both assume the loss being differentiated is the sum of every rank's local loss, and that
// every rank runs backward through these ops in the same order (each backward is itself a
// collective; a rank that skips it leaves the others waiting until the group's timeout).
#include <torch/csrc/autograd/custom_function.h>

#include "collectives.hpp"
#include "common.hpp"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void save_group(AutogradContext* ctx, const c10::intrusive_ptr<c10d::Backend>& pg) {
  c10::intrusive_ptr<torch::CustomClassHolder> holder = pg;
  ctx->saved_data["pg"] = c10::IValue::make_capsule(std::move(holder));
}

c10::intrusive_ptr<c10d::Backend> saved_group(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<c10d::Backend>(ctx->saved_data["pg"].toCapsule());
}

// y = sum over ranks of x_r, on every rank. dL/dx_r = sum over ranks of dL_r'/dy.
struct AllReduceSum : public torch::autograd::Function<AllReduceSum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const c10::intrusive_ptr<c10d::Backend>& pg) {
    save_group(ctx, pg);
    return tx::all_reduce_sum_copy(*pg, input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {tx::all_reduce_sum_copy(*saved_group(ctx), grads[0]), at::Tensor()};
  }
};

// Y = cat(x_0, ..., x_{world-1}) along dim 0, on every rank. Every rank's loss may depend on
// every block of Y, so dL/dx_r is rank r's rows of the all-reduced dL/dY (solo-learn's
// GatherLayer).
struct AllGather : public torch::autograd::Function<AllGather> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const c10::intrusive_ptr<c10d::Backend>& pg) {
    save_group(ctx, pg);
    ctx->saved_data["rows"] = input.dim() >= 1 ? input.size(0) : int64_t{0};
    return tx::all_gather_cat(*pg, input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto pg = saved_group(ctx);
    const int64_t rows = ctx->saved_data["rows"].toInt();
    at::Tensor total = tx::all_reduce_sum_copy(*pg, grads[0]);
    return {total.narrow(0, pg->getRank() * rows, rows), at::Tensor()};
  }
};

} // namespace

extern "C" char* tx_differentiable_all_reduce_sum(const tx_pg* pg, const tx_tensor* input, tx_tensor** out) {
  return tx::guard([&] { *out = new at::Tensor(AllReduceSum::apply(*input, pg->backend)); });
}

extern "C" char* tx_differentiable_all_gather(const tx_pg* pg, const tx_tensor* input, tx_tensor** out) {
  return tx::guard([&] { *out = new at::Tensor(AllGather::apply(*input, pg->backend)); });
}
