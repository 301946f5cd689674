// Devices: an archive traced on one device runs on any (its graphs' device constants and
// tensor constants pointed at the target), the list of those constants (for tests and
// diagnostics), and which CUDA runtime libtorch's CUDA hooks report.

#include <ATen/detail/CUDAHooksInterface.h>

#include "internal.h"

namespace hookrs {

// Points every device constant of every graph at `target`, and moves tensor constants there.
// A traced graph holds the device it was traced on (`torch.arange(..., device="cpu")` in the
// rotary embedding, the causal mask): without this, a model exported on one device fails on
// another with "Expected all tensors to be on the same device".
int64_t retarget_devices(torch::jit::Module& m, const c10::Device& target) {
  int64_t changed = 0;
  const std::string name = target.str();
  for (auto& g : all_graphs(m)) {
    each_node(g->block(), [&](Node* n) {
      if (is_device_constant(n)) {
        if (c10::Device(n->s(c10::attr::value)) != target) {
          n->s_(c10::attr::value, name);
          ++changed;
        }
      } else if (is_tensor_constant(n)) {
        const at::Tensor& t = n->t(c10::attr::value);
        if (t.device() != target) {
          n->t_(c10::attr::value, t.to(target));
          ++changed;
        }
      }
    });
  }
  return changed;
}

}  // namespace hookrs

using namespace hookrs;

extern "C" {

int hookrs_device_constants(void* module, hookrs_strings* out, char** err) {
  return guard(err, [&]() -> int {
    std::vector<std::string> found;
    for (auto& g : all_graphs(*static_cast<torch::jit::Module*>(module))) {
      each_node(g->block(), [&](Node* n) {
        if (is_device_constant(n)) {
          found.push_back(c10::Device(n->s(c10::attr::value)).str());
        } else if (is_tensor_constant(n)) {
          found.push_back(n->t(c10::attr::value).device().str());
        }
      });
    }
    *out = strings(found);
    return 0;
  });
}

// The CUDA runtime version libtorch's CUDA hooks report (e.g. 13000), or -1 when the hooks
// are libtorch's stub (libtorch_cuda.so was not loaded before the first CUDA query).
long hookrs_cuda_runtime_version() {
  try {
    return at::detail::getCUDAHooks().versionCUDART();
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
