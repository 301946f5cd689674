// What the shim's files share (not part of the C ABI: see hookrs_shim.h for that).
#pragma once

#include <torch/script.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "hookrs_shim.h"

namespace hookrs {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

// A malloc'd copy of `s` (the caller frees it with hookrs_free).
inline char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// `items` as a hookrs_strings (freed with hookrs_strings_free).
inline hookrs_strings strings(const std::vector<std::string>& items) {
  hookrs_strings out{nullptr, static_cast<int64_t>(items.size())};
  out.items = static_cast<char**>(std::calloc(items.size() + 1, sizeof(char*)));
  for (size_t i = 0; i < items.size(); ++i) out.items[i] = dup(items[i]);
  return out;
}

// Runs `body` (which returns 0 on success), turning every C++ exception into 1 and *err.
template <typename F>
int guard(char** err, F&& body) {
  try {
    *err = nullptr;
    return body();
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return 1;
}

// Every graph function of the module's compilation unit: the methods of every module class
// and any free function they call.
inline std::vector<std::shared_ptr<Graph>> all_graphs(torch::jit::Module& m) {
  std::vector<std::shared_ptr<Graph>> out;
  std::set<Graph*> seen;
  auto add = [&](torch::jit::Function* f) {
    if (f == nullptr || !f->isGraphFunction()) return;
    auto g = torch::jit::toGraphFunction(*f).graph();
    if (seen.insert(g.get()).second) out.push_back(g);
  };
  for (auto* f : m._ivalue()->compilation_unit()->get_functions()) add(f);
  for (const auto& sub : m.modules()) {
    for (const auto& method : sub.get_methods()) add(&method.function());
  }
  return out;
}

// Calls f on every node of `b` and of its nested blocks.
template <typename F>
void each_node(torch::jit::Block* b, F&& f) {
  for (Node* n : b->nodes()) {
    f(n);
    for (torch::jit::Block* sub : n->blocks()) each_node(sub, f);
  }
}

inline bool is_device_constant(Node* n) {
  return n->kind() == c10::prim::Constant && n->hasAttribute(c10::attr::value) &&
         n->output()->type()->kind() == c10::TypeKind::DeviceObjType;
}

inline bool is_tensor_constant(Node* n) {
  return n->kind() == c10::prim::Constant && n->hasAttribute(c10::attr::value) &&
         n->kindOf(c10::attr::value) == torch::jit::AttributeKind::t;
}

// devices.cpp: points every device constant of every graph at `target` and moves tensor
// constants there; returns how many changed.
int64_t retarget_devices(torch::jit::Module& m, const c10::Device& target);

}  // namespace hookrs
