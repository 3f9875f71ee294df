// Gradient checkpointing: a custom autograd function whose forward runs a Rust
// callback without recording a graph, keeping only its inputs, and whose backward
// runs the callback again with the graph recorded and differentiates it — what
// torch.utils.checkpoint does. The parameters the callback uses are passed in
// alongside the inputs, so their gradients come back through this node (as with
// `torch.autograd.grad`) rather than by a nested `backward` call: a block whose
// inputs need no gradient (frozen base model, LoRA) still gives its parameters theirs.
//
// The callback is a plain C function pointer plus an opaque context that Rust owns;
// the node frees the context (through `drop`) when the autograd graph releases it.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/custom_class.h>
#include <cstring>
#include <stdexcept>
#include <string>

namespace {

thread_local char last_error[512];

void set_error(const char* what) {
  std::strncpy(last_error, what, sizeof(last_error) - 1);
  last_error[sizeof(last_error) - 1] = 0;
}

// Runs the block: `inputs` are n_inputs new at::Tensor* handles the callee takes
// ownership of; it writes up to `max_outputs` new handles to `outputs` and their count
// to `n_outputs`. Returns 0 on success, otherwise writes a message to `error`.
typedef int (*dbt_ckpt_fn)(void* ctx, at::Tensor** inputs, size_t n_inputs, at::Tensor** outputs,
                           size_t max_outputs, size_t* n_outputs, char* error, size_t error_len);
typedef void (*dbt_ckpt_drop)(void* ctx);

constexpr size_t kMaxOutputs = 16;

struct Callback : torch::CustomClassHolder {
  dbt_ckpt_fn fn;
  dbt_ckpt_drop drop;
  void* ctx;
  Callback(dbt_ckpt_fn f, dbt_ckpt_drop d, void* c) : fn(f), drop(d), ctx(c) {}
  ~Callback() override { drop(ctx); }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    std::vector<at::Tensor*> in;
    in.reserve(inputs.size());
    for (const auto& t : inputs) in.push_back(new at::Tensor(t));
    at::Tensor* out[kMaxOutputs];
    size_t n_out = 0;
    char error[512] = {0};
    int rc = fn(ctx, in.data(), in.size(), out, kMaxOutputs, &n_out, error, sizeof(error));
    if (rc != 0) throw std::runtime_error(std::string("checkpointed block failed: ") + error);
    std::vector<at::Tensor> result;
    for (size_t i = 0; i < n_out; i++) {
      result.push_back(*out[i]);
      delete out[i];
    }
    return result;
  }
};

// The autocast state of the forward pass, restored for the recomputation (the
// backward pass may run on another thread, where autocast is off).
struct AutocastState {
  bool cpu, cuda;
  at::ScalarType cpu_dtype, cuda_dtype;
  static AutocastState now() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  // `args`: the block's inputs, then the parameters it uses.
  static variable_list forward(AutogradContext* ctx, at::TensorList args, c10::intrusive_ptr<Callback> cb,
                               int64_t n_inputs) {
    auto state = AutocastState::now();
    ctx->saved_data["n_inputs"] = n_inputs;
    ctx->saved_data["autocast"] = std::vector<int64_t>{state.cpu, state.cuda, (int64_t)state.cpu_dtype,
                                                       (int64_t)state.cuda_dtype};
    ctx->saved_data["callback"] = c10::IValue::make_capsule(cb);
    // Inputs only: the parameters are leaves, so saving them costs no memory.
    ctx->save_for_backward(args.vec());
    // Function::apply already runs forward with grad mode off: nothing inside is kept.
    std::vector<at::Tensor> inputs(args.begin(), args.begin() + n_inputs);
    return cb->run(inputs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    int64_t n_inputs = ctx->saved_data["n_inputs"].toInt();
    auto cb = c10::static_intrusive_pointer_cast<Callback>(ctx->saved_data["callback"].toCapsule());
    auto ac = ctx->saved_data["autocast"].toIntVector();

    std::vector<at::Tensor> inputs;
    for (int64_t i = 0; i < n_inputs; i++) {
      inputs.push_back(saved[i].detach().requires_grad_(saved[i].requires_grad()));
    }
    std::vector<at::Tensor> outputs;
    {
      auto outer = AutocastState::now();
      // Autocast's cache of low-precision weight copies lives until the outermost
      // autocast region ends, and the backward pass is inside none: with the cache
      // on, every block's recomputation would leave its bf16/fp16 weight copies in
      // it for the rest of the backward pass (the whole trained model, again, at
      // the peak). Off, each copy lives only as long as its block's graph.
      bool outer_cache = at::autocast::is_autocast_cache_enabled();
      at::autocast::set_autocast_cache_enabled(false);
      AutocastState{ac[0] != 0, ac[1] != 0, (at::ScalarType)ac[2], (at::ScalarType)ac[3]}.apply();
      at::AutoGradMode grad(true);
      try {
        outputs = cb->run(inputs);
      } catch (...) {
        outer.apply();
        at::autocast::set_autocast_cache_enabled(outer_cache);
        throw;
      }
      outer.apply();
      at::autocast::set_autocast_cache_enabled(outer_cache);
    }

    // Differentiate the outputs that carry a gradient w.r.t. what requires one.
    variable_list outs, gouts, targets;
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); i++) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        outs.push_back(outputs[i]);
        gouts.push_back(grad_outputs[i]);
      }
    }
    std::vector<int64_t> slot;
    for (size_t i = 0; i < saved.size(); i++) {
      const at::Tensor& t = (int64_t)i < n_inputs ? inputs[i] : saved[i];
      if (t.defined() && t.requires_grad()) {
        targets.push_back(t);
        slot.push_back(i);
      }
    }
    variable_list result(saved.size() + 2);  // + the callback and n_inputs arguments
    if (outs.empty() || targets.empty()) return result;
    auto grads = torch::autograd::grad(outs, targets, gouts, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    for (size_t k = 0; k < slot.size(); k++) result[slot[k]] = grads[k];
    return result;
  }
};

}  // namespace

extern "C" {

const char* dbt_ckpt_last_error() { return last_error; }

int dbt_ckpt_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Applies the checkpoint function to `n_inputs` inputs followed by `n_params`
// parameters. On success writes up to `max_outputs` new tensor handles and their
// count, and returns 0; on failure returns 1 (see dbt_ckpt_last_error). The node
// owns `ctx` from this call on, also on failure (it is dropped then).
int dbt_ckpt_apply(dbt_ckpt_fn fn, dbt_ckpt_drop drop, void* ctx, at::Tensor* const* args, size_t n_inputs,
                   size_t n_params, at::Tensor** outputs, size_t max_outputs, size_t* n_outputs) {
  try {
    auto cb = c10::make_intrusive<Callback>(fn, drop, ctx);
    std::vector<at::Tensor> list;
    for (size_t i = 0; i < n_inputs + n_params; i++) list.push_back(*args[i]);
    auto out = Checkpoint::apply(at::TensorList(list), cb, (int64_t)n_inputs);
    if (out.size() > max_outputs) throw std::runtime_error("a checkpointed block returned too many tensors");
    for (size_t i = 0; i < out.size(); i++) outputs[i] = new at::Tensor(out[i]);
    *n_outputs = out.size();
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what());
    return 1;
  }
}

}  // extern "C"
