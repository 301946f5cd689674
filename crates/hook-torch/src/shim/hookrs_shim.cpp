// hookrs shim: the `hookrs::point` op and the TorchScript graph rewrite that inserts it.
//
// Every exported function catches every C++ exception and reports it as an error string:
// no exception crosses into Rust. The op calls back into Rust through one function pointer;
// the Rust side never unwinds into C++ (it catches panics) and reports failures with a
// status code, on which the op throws a c10::Error that surfaces from the forward call.

#include <torch/script.h>
#include <torch/library.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>

#include <cstring>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// Rust callback: (site, borrowed-as-owned input tensor, out replacement) -> status.
// status 0: *out is null (unchanged) or a heap at::Tensor* the caller takes over.
// status != 0: a hook failed; the Rust side keeps the error, we abort the forward.
using Callback = int (*)(int64_t site, at::Tensor* x, at::Tensor** out);
std::atomic<Callback> g_callback{nullptr};

at::Tensor point_impl(const at::Tensor& x, int64_t site) {
  Callback cb = g_callback.load(std::memory_order_acquire);
  if (cb == nullptr) {
    return x;
  }
  at::Tensor* out = nullptr;
  int status = cb(site, new at::Tensor(x), &out);
  if (status != 0) {
    TORCH_CHECK(false, "hookrs: a hook failed at site ", site, " (the error is reported by hookrs)");
  }
  if (out == nullptr) {
    return x;
  }
  at::Tensor r = std::move(*out);
  delete out;
  return r;
}

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o += buf;
        } else {
          o += c;
        }
    }
  }
  return o;
}

struct Site {
  int64_t id;
  std::string module;  // dotted module path
  std::string kind;    // output | input | attention_matrix | attention_matrix_pre_softmax
  std::string dtype_note;
};

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

// Inserts `hookrs::point(v, self.<attr>)` after `after` (or at the start of the graph when
// `after` is null) and returns the new value.
Value* insert_point(Graph& g, Value* self, const std::string& attr, Value* v, Node* insert_before) {
  torch::jit::WithInsertPoint guard(insert_before);
  Node* get = g.insertNode(g.createGetAttr(self, attr));
  get->output()->setType(c10::IntType::get());
  Node* op = g.create(c10::Symbol::fromQualString("hookrs::point"), {v, get->output()}, 1);
  op->output()->setType(v->type());
  g.insertNode(op);
  return op->output();
}

struct Rewriter {
  std::vector<Site> sites;
  int64_t next = 0;
  std::set<const c10::ClassType*> rewritten;
  // per rewritten class: attribute names in order (out, in, sm0_out, sm0_in, ...)
  std::unordered_map<const c10::ClassType*, std::vector<std::pair<std::string, std::string>>> attrs;

  static bool is_tensor(Value* v) { return v->type()->kind() == c10::TypeKind::TensorType; }

  // Rewrites the forward graph of `cls` once; returns the (attribute, kind) list.
  std::vector<std::pair<std::string, std::string>>& rewrite(torch::jit::Module& m) {
    auto cls = m.type().get();
    auto found = attrs.find(cls);
    if (found != attrs.end()) {
      return found->second;
    }
    std::vector<std::pair<std::string, std::string>> list;
    auto method = m.find_method("forward");
    if (!method) {
      return attrs[cls] = list;
    }
    auto& fn = torch::jit::toGraphFunction(method->function());
    auto g = fn.graph();
    Value* self = g->inputs().at(0);
    // attribute slots first (so the graph can read them)
    auto add_attr = [&](const std::string& name) {
      if (!m.type()->hasAttribute(name)) {
        m.type()->addAttribute(name, c10::IntType::get());
      }
    };
    // .input: the module's main input (easyroutine: args[0], else kwargs["hidden_states"]).
    // Traced graphs lose argument names and may order kwargs first (Gemma3's decoder layer takes
    // cache_position first), so: the first graph input the module hands to its first child
    // call (input_layernorm, q_proj, gate_proj, ...); for leaf modules, the first tensor input.
    Value* main_in = nullptr;
    for (Node* n : g->nodes()) {
      if (n->kind() != c10::prim::CallMethod) continue;
      for (size_t a = 1; a < n->inputs().size() && !main_in; ++a) {
        Value* v = n->inputs()[a];
        if (v->node()->kind() == c10::prim::Param && is_tensor(v)) main_in = v;
      }
      break;
    }
    for (size_t i = 1; i < g->inputs().size(); ++i) {
      Value* in = g->inputs()[i];
      if (main_in ? in == main_in : is_tensor(in)) {
        add_attr("__hookrs_in");
        Node* first = g->block()->nodes().front();
        Value* hooked = insert_point(*g, self, "__hookrs_in", in, first);
        in->replaceAllUsesAfterNodeWith(hooked->node(), hooked);
        list.emplace_back("__hookrs_in", "input");
        break;
      }
    }
    // attention pattern: every softmax inside the module (followed by a dtype cast: hook after it)
    int k = 0;
    std::vector<Node*> softmaxes;
    for (Node* n : g->nodes()) {
      if (n->kind() == c10::Symbol::fromQualString("aten::softmax")) softmaxes.push_back(n);
    }
    for (Node* sm : softmaxes) {
      std::string pre = "__hookrs_sm" + std::to_string(k) + "_pre";
      std::string post = "__hookrs_sm" + std::to_string(k) + "_out";
      add_attr(pre);
      add_attr(post);
      Value* scores = sm->inputs()[0];
      Value* hooked_scores = insert_point(*g, self, pre, scores, sm);
      sm->replaceInput(0, hooked_scores);
      Node* last = sm;
      if (sm->output()->uses().size() == 1 && sm->output()->uses()[0].user->kind() == c10::Symbol::fromQualString("aten::to")) {
        last = sm->output()->uses()[0].user;
      }
      Value* pat = last->output();
      Value* hooked = insert_point(*g, self, post, pat, last->next());
      pat->replaceAllUsesAfterNodeWith(hooked->node(), hooked);
      list.emplace_back(pre, "attention_matrix_pre_softmax" + (k ? std::to_string(k) : std::string()));
      list.emplace_back(post, "attention_matrix" + (k ? std::to_string(k) : std::string()));
      ++k;
    }
    // .output: the returned tensor, or element 0 of a returned tuple
    Node* ret = g->return_node();
    Value* out = ret->inputs().at(0);
    if (is_tensor(out)) {
      add_attr("__hookrs_out");
      Value* hooked = insert_point(*g, self, "__hookrs_out", out, ret);
      ret->replaceInput(0, hooked);
      list.emplace_back("__hookrs_out", "output");
    } else if (out->node()->kind() == c10::prim::TupleConstruct && !out->node()->inputs().empty() &&
               is_tensor(out->node()->inputs()[0])) {
      Node* tc = out->node();
      add_attr("__hookrs_out");
      // a fresh TupleConstruct in front of return, so other users of the tuple are untouched
      Value* hooked = insert_point(*g, self, "__hookrs_out", tc->inputs()[0], ret);
      std::vector<Value*> items(tc->inputs().begin(), tc->inputs().end());
      items[0] = hooked;
      torch::jit::WithInsertPoint guard(ret);
      Node* ntc = g->insertNode(g->createTuple(items));
      ret->replaceInput(0, ntc->output());
      list.emplace_back("__hookrs_out", "output");
    }
    return attrs[cls] = list;
  }

  void instrument(torch::jit::Module& m, const std::string& name) {
    auto& list = rewrite(m);
    for (auto& [attr, kind] : list) {
      int64_t id = next++;
      m._ivalue()->setAttr(attr, c10::IValue(id));
      sites.push_back(Site{id, name, kind, ""});
    }
  }
};

// Sites in execution order would need a run; we list them in module order, inputs first.
std::string sites_json(const std::vector<Site>& sites) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < sites.size(); ++i) {
    if (i) o << ",";
    o << "{\"id\":" << sites[i].id << ",\"module\":\"" << json_escape(sites[i].module) << "\",\"kind\":\"" << sites[i].kind << "\"}";
  }
  o << "]";
  return o.str();
}

}  // namespace

TORCH_LIBRARY(hookrs, m) {
  m.def(torch::schema("hookrs::point(Tensor x, int site) -> Tensor", c10::AliasAnalysisKind::CONSERVATIVE));
}

TORCH_LIBRARY_IMPL(hookrs, CompositeImplicitAutograd, m) {
  m.impl("point", point_impl);
}

extern "C" {

void hookrs_set_callback(Callback cb) { g_callback.store(cb, std::memory_order_release); }

void hookrs_free(void* p) { std::free(p); }

// Loads `path`, instruments every submodule, and returns the rewritten module as bytes plus
// the site list (JSON) and the `hookrs.json` extra file (empty when absent).
// Returns 0 on success; on failure *err holds a message. Every out string is freed with hookrs_free.
int hookrs_instrument(const char* path, char** out_bytes, size_t* out_len, char** out_sites, char** out_desc, char** err) {
  try {
    torch::jit::ExtraFilesMap extra{{"hookrs.json", ""}};
    torch::jit::Module m = torch::jit::load(std::string(path), c10::Device(c10::kCPU), extra);
    Rewriter rw;
    for (const auto& item : m.named_modules()) {
      if (item.name.empty()) continue;  // the root: its input is token ids, its output the logits
      torch::jit::Module sub = item.value;
      rw.instrument(sub, item.name);
    }
    std::ostringstream buf;
    m.save(buf, extra);
    std::string bytes = buf.str();
    *out_bytes = static_cast<char*>(std::malloc(bytes.size()));
    std::memcpy(*out_bytes, bytes.data(), bytes.size());
    *out_len = bytes.size();
    *out_sites = dup(sites_json(rw.sites));
    *out_desc = dup(extra["hookrs.json"]);
    *err = nullptr;
    return 0;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return 1;
}

}  // extern "C"
