// Converting a module's dtype: its parameters and buffers, and the constants tracing baked
// into its graphs (dtype arguments, the masks' finfo fill values).

#include <limits>

#include "internal.h"

namespace hookrs {
namespace {

double lowest_of(c10::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::lowest());
    default: TORCH_CHECK(false, "not a model dtype: ", t, " (expected float32, bfloat16 or float16)");
  }
}

double max_of(c10::ScalarType t) { return -lowest_of(t); }

// The inputs of `n` that are constants given for an argument named `dtype` in its schema.
std::vector<size_t> dtype_inputs(Node* n) {
  std::vector<size_t> out;
  const c10::FunctionSchema* s = n->maybeSchema();
  if (s == nullptr) return out;
  const auto& args = s->arguments();
  for (size_t i = 0; i < n->inputs().size() && i < args.size(); ++i) {
    if (args[i].name() == "dtype" && n->input(i)->node()->kind() == c10::prim::Constant) out.push_back(i);
  }
  return out;
}

// Converts a module exported in dtype `from` to dtype `to`: its `from` parameters and buffers
// (tensors kept in another dtype on purpose, such as float32 rotary frequencies, stay as they
// are), and the constants tracing baked into its graphs: `dtype` arguments equal to `from`
// (`x.to(input_dtype)`, `torch.full(..., dtype=...)`), and `torch.finfo(from).min/max` (the
// attention masks' fill values, as scalars or 0-dim tensors), which become `to`'s. `dtype`
// arguments naming another dtype (the float32 upcasts of norms and softmax) stay. Returns
// how many tensors and constants changed.
int64_t retarget_dtype(torch::jit::Module& m, c10::ScalarType from, c10::ScalarType to) {
  int64_t changed = 0;
  const double lo_from = lowest_of(from), lo_to = lowest_of(to), hi_from = max_of(from), hi_to = max_of(to);
  auto limit = [&](double v, double* out) {
    if (v == lo_from) *out = lo_to;
    else if (v == hi_from) *out = hi_to;
    else return false;
    return true;
  };
  for (auto sub : m.modules()) {
    std::vector<std::pair<std::string, at::Tensor>> convert;
    for (const auto& a : sub.named_attributes(/*recurse=*/false)) {
      if (a.value.isTensor() && a.value.toTensor().scalar_type() == from) convert.emplace_back(a.name, a.value.toTensor());
    }
    for (auto& [name, t] : convert) {
      sub.setattr(name, t.to(to));
      ++changed;
    }
  }
  for (auto& g : all_graphs(m)) {
    std::vector<std::pair<Node*, size_t>> dtypes, limits;
    std::vector<Node*> tensors;
    each_node(g->block(), [&](Node* n) {
      for (size_t i : dtype_inputs(n)) {
        auto v = torch::jit::toIValue(n->input(i));
        if (v && v->isInt() && v->toInt() == static_cast<int64_t>(from)) dtypes.emplace_back(n, i);
      }
      for (size_t i = 0; i < n->inputs().size(); ++i) {
        torch::jit::Value* in = n->input(i);
        if (in->node()->kind() != c10::prim::Constant || in->type()->kind() != c10::TypeKind::FloatType) continue;
        auto v = torch::jit::toIValue(in);
        double r;
        if (v && v->isDouble() && limit(v->toDouble(), &r)) limits.emplace_back(n, i);
      }
      if (is_tensor_constant(n)) tensors.push_back(n);
    });
    // new constants per use: a pooled constant may also feed arguments that are not dtypes
    for (auto& [n, i] : dtypes) {
      torch::jit::WithInsertPoint at(n);
      n->replaceInput(i, g->insertConstant(c10::IValue(static_cast<int64_t>(to))));
      ++changed;
    }
    for (auto& [n, i] : limits) {
      double r = 0;
      limit(torch::jit::toIValue(n->input(i))->toDouble(), &r);
      torch::jit::WithInsertPoint at(n);
      n->replaceInput(i, g->insertConstant(c10::IValue(r)));
      ++changed;
    }
    for (Node* n : tensors) {
      const at::Tensor t = n->t(c10::attr::value);
      double r = 0;
      if (t.scalar_type() == from) {
        n->t_(c10::attr::value, t.to(to));
        ++changed;
      } else if (t.is_floating_point() && t.dim() == 0 && limit(t.item<double>(), &r)) {
        n->t_(c10::attr::value, at::full({}, r, t.options()));
        ++changed;
      }
    }
  }
  return changed;
}

}  // namespace
}  // namespace hookrs

using namespace hookrs;

extern "C" {

// Converts the module from dtype `from` to dtype `to` (ScalarType codes): see retarget_dtype.
int hookrs_retarget_dtype(void* module, int64_t from, int64_t to, int64_t* changed, char** err) {
  return guard(err, [&]() -> int {
    *changed = retarget_dtype(*static_cast<torch::jit::Module*>(module), static_cast<c10::ScalarType>(from),
                              static_cast<c10::ScalarType>(to));
    return 0;
  });
}

int hookrs_dtype_constants(void* module, hookrs_strings* out, char** err) {
  return guard(err, [&]() -> int {
    std::vector<std::string> found;
    for (auto& g : all_graphs(*static_cast<torch::jit::Module*>(module))) {
      each_node(g->block(), [&](Node* n) {
        for (size_t i : dtype_inputs(n)) {
          auto v = torch::jit::toIValue(n->input(i));
          if (!v || !v->isInt()) continue;
          const int64_t k = v->toInt();
          found.push_back((k >= 0 && k < static_cast<int64_t>(c10::ScalarType::NumOptions)) ? std::string(c10::toString(static_cast<c10::ScalarType>(k)))
                                                                                              : "invalid(" + std::to_string(k) + ")");
        }
      });
    }
    *out = strings(found);
    return 0;
  });
}

}  // extern "C"
