// hookrs shim: the `hookrs::point` op and the TorchScript graph rewrite that inserts it.
//
// Every exported function catches every C++ exception and reports it as an error string:
// no exception crosses into Rust. The op calls back into Rust through one function pointer;
// the Rust side never unwinds into C++ (it catches panics) and reports failures with a
// status code, on which the op throws a c10::Error that surfaces from the forward call.

#include <torch/script.h>
#include <torch/library.h>
#include <ATen/DLConvertor.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <mutex>

#include <atomic>
#include <limits>
#include <cstring>
#include <memory>
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

// The armed-site table of the forward running on this thread: byte `site` is non-zero when a
// hook waits there. An idle site (no table, or a zero byte) returns its input at once and
// never crosses into Rust. Rust sets the table for the duration of one forward.
thread_local const uint8_t* t_armed = nullptr;
thread_local int64_t t_armed_len = 0;
// How many sites ran on this thread (armed or idle): diagnostics and tests.
thread_local uint64_t t_point_calls = 0;

at::Tensor point_impl(const at::Tensor& x, int64_t site) {
  ++t_point_calls;
  if (site < 0 || site >= t_armed_len || t_armed[site] == 0) {
    return x;
  }
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


// Every graph function of the module's compilation unit: the methods of every module class
// and any free function they call.
std::vector<std::shared_ptr<Graph>> all_graphs(torch::jit::Module& m) {
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

template <typename F>
void each_node(torch::jit::Block* b, F&& f) {
  for (Node* n : b->nodes()) {
    f(n);
    for (torch::jit::Block* sub : n->blocks()) each_node(sub, f);
  }
}

bool is_device_constant(Node* n) {
  return n->kind() == c10::prim::Constant && n->hasAttribute(c10::attr::value) &&
         n->output()->type()->kind() == c10::TypeKind::DeviceObjType;
}

bool is_tensor_constant(Node* n) {
  return n->kind() == c10::prim::Constant && n->hasAttribute(c10::attr::value) &&
         n->kindOf(c10::attr::value) == torch::jit::AttributeKind::t;
}

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

// The dtypes named by constant `dtype` arguments in the module's graphs, one entry per use
// (`Float`, `BFloat16`, `Long`, ...), as JSON.
std::string dtype_constants_json(torch::jit::Module& m) {
  std::ostringstream o;
  o << "[";
  bool first = true;
  for (auto& g : all_graphs(m)) {
    each_node(g->block(), [&](Node* n) {
      for (size_t i : dtype_inputs(n)) {
        auto v = torch::jit::toIValue(n->input(i));
        if (!v || !v->isInt()) continue;
        const int64_t k = v->toInt();
        std::string name = (k >= 0 && k < static_cast<int64_t>(c10::ScalarType::NumOptions))
                               ? std::string(c10::toString(static_cast<c10::ScalarType>(k)))
                               : "invalid(" + std::to_string(k) + ")";
        o << (first ? "" : ",") << "\"" << json_escape(name) << "\"";
        first = false;
      }
    });
  }
  o << "]";
  return o.str();
}

// The devices named by constants in the module's graphs (device constants and tensor
// constants), one entry per constant, as JSON.
std::string device_constants_json(torch::jit::Module& m) {
  std::ostringstream o;
  o << "[";
  bool first = true;
  for (auto& g : all_graphs(m)) {
    each_node(g->block(), [&](Node* n) {
      std::string d;
      if (is_device_constant(n)) {
        d = c10::Device(n->s(c10::attr::value)).str();
      } else if (is_tensor_constant(n)) {
        d = n->t(c10::attr::value).device().str();
      } else {
        return;
      }
      o << (first ? "" : ",") << "\"" << json_escape(d) << "\"";
      first = false;
    });
  }
  o << "]";
  return o.str();
}

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

// The memory guard: libtorch's CPU allocator, wrapped so that the bytes held by live CPU
// tensors cannot pass a limit (by default 90 % of the machine's memory). A model whose
// constants or inputs ask for more gets a c10::Error naming the sizes (a clean error in Rust)
// instead of the kernel's OOM killer. Allocations keep data == context, so raw_allocate works.
namespace {

struct MemoryGuard final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> limit{0};  // 0: no limit
  std::string why;                 // where the limit came from (set with it, read on refusal)
  std::mutex mu;
  std::unordered_map<void*, std::pair<size_t, c10::DeleterFnPtr>> held;

  static MemoryGuard& get() {
    static MemoryGuard* g = new MemoryGuard();  // never destroyed: tensors may outlive statics
    return *g;
  }

  static void release(void* p) {
    if (p == nullptr) return;
    auto& g = get();
    std::pair<size_t, c10::DeleterFnPtr> e{0, nullptr};
    {
      std::lock_guard<std::mutex> lock(g.mu);
      auto it = g.held.find(p);
      if (it != g.held.end()) {
        e = it->second;
        g.held.erase(it);
      }
    }
    g.live.fetch_sub(static_cast<int64_t>(e.first));
    if (e.second != nullptr) e.second(p);
  }

  c10::DataPtr allocate(size_t n) override {
    const int64_t lim = limit.load(std::memory_order_relaxed);
    const int64_t now = live.load(std::memory_order_relaxed);
    if (lim > 0 && now + static_cast<int64_t>(n) > lim) {
      std::string why_now;
      {
        std::lock_guard<std::mutex> lock(mu);
        why_now = why;
      }
      TORCH_CHECK(false, "out of memory guard: a tensor of ", n, " bytes would bring the CPU tensors held to ", now + static_cast<int64_t>(n),
                  " bytes, past hookrs's limit of ", lim, " bytes (", why_now, "). ",
                  "The model or its input asks for more memory than there is: check the input's size and the model's sizes.");
    }
    c10::DataPtr d = inner->allocate(n);
    void* data = d.get();
    if (data == nullptr || d.get_context() != data) return d;  // not ours to track
    c10::DeleterFnPtr del = d.get_deleter();
    d.release_context();
    {
      std::lock_guard<std::mutex> lock(mu);
      held[data] = {n, del};
    }
    live.fetch_add(static_cast<int64_t>(n));
    return c10::DataPtr(data, data, &MemoryGuard::release, d.device());
  }

  c10::DeleterFnPtr raw_deleter() const override { return &MemoryGuard::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

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

// A batch of device -> host copies queued on a side stream (see hookrs_host_copy). The
// sources are kept alive until the copies are complete: freed earlier, the caching allocator
// could hand their memory to the next forward pass on the compute stream while the side
// stream still reads it.
struct HostCopy {
  c10::Event done;
  std::vector<at::Tensor> sources;
  explicit HostCopy(c10::DeviceType t) : done(t) {}
  ~HostCopy() {
    try {
      done.synchronize();  // never release the sources under a running copy
    } catch (...) {
    }
  }
};

extern "C" {

void hookrs_set_callback(Callback cb) { g_callback.store(cb, std::memory_order_release); }

// Sets this thread's armed-site table (null: no site armed) and returns the previous one
// through `prev`/`prev_len`, so nested forwards restore it.
void hookrs_set_armed(const uint8_t* table, int64_t len, const uint8_t** prev, int64_t* prev_len) {
  *prev = t_armed;
  *prev_len = t_armed_len;
  t_armed = table;
  t_armed_len = table == nullptr ? 0 : len;
}

void hookrs_free(void* p) { std::free(p); }

uint64_t hookrs_point_calls() { return t_point_calls; }

// Loads `path` with its tensors on `device` (c10 device string: "cpu", "cuda:0"), points
// the graphs' device constants at `constants_device` (normally the same device), puts the
// module in eval mode and instruments every submodule in place: the same module object is
// handed back (no save and reload, so loading costs what a plain load costs).
// Returns 0 and an owned torch::jit::Module* in *out_module (free with hookrs_module_free),
// the site list (JSON), the `hookrs.json` extra file (empty when absent); on failure 1 and *err.
int hookrs_load(const char* path, const char* device, const char* constants_device, void** out_module, char** out_sites,
                char** out_desc, char** err) {
  return guard(err, [&]() -> int {
    c10::Device dev(device);
    c10::Device cdev(constants_device);
    torch::jit::ExtraFilesMap extra{{"hookrs.json", ""}};
    auto m = std::make_unique<torch::jit::Module>(torch::jit::load(std::string(path), dev, extra));
    m->eval();
    retarget_devices(*m, cdev);
    Rewriter rw;
    for (const auto& item : m->named_modules()) {
      if (item.name.empty()) continue;  // the root: its input is token ids, its output the logits
      torch::jit::Module sub = item.value;
      rw.instrument(sub, item.name);
    }
    *out_sites = dup(sites_json(rw.sites));
    *out_desc = dup(extra["hookrs.json"]);
    *out_module = m.release();
    *err = nullptr;
    return 0;
  });
}

void hookrs_module_free(void* m) { delete static_cast<torch::jit::Module*>(m); }

// forward(input_ids, attention_mask) -> the logits: the returned tensor, or element 0 of a
// returned tuple. 0 and an owned tensor in *out; 1 and *err otherwise.
int hookrs_forward(void* module, at::Tensor* ids, at::Tensor* mask, at::Tensor** out, char** err) {
  return guard(err, [&]() -> int {
    auto* m = static_cast<torch::jit::Module*>(module);
    c10::IValue r = m->forward({*ids, *mask});
    if (r.isTuple() && !r.toTupleRef().elements().empty()) {
      r = r.toTupleRef().elements()[0];
    }
    if (!r.isTensor()) {
      *err = dup("the module returned " + r.tagKind() + ", expected the logits tensor (or a tuple starting with it)");
      return 1;
    }
    *out = new at::Tensor(r.toTensor());
    *err = nullptr;
    return 0;
  });
}

// Calls `visit(ctx, name, tensor)` for every parameter (recursively named, `a.b.weight`);
// the tensor is owned by the callee.
int hookrs_parameters(void* module, void (*visit)(void* ctx, const char* name, at::Tensor* t), void* ctx, char** err) {
  return guard(err, [&]() -> int {
    auto* m = static_cast<torch::jit::Module*>(module);
    for (const auto& p : m->named_parameters(/*recurse=*/true)) {
      visit(ctx, p.name.c_str(), new at::Tensor(p.value));
    }
    *err = nullptr;
    return 0;
  });
}

// The devices named by the graphs' constants, as a JSON list (one entry per constant).
int hookrs_device_constants(void* module, char** out_json, char** err) {
  return guard(err, [&]() -> int {
    *out_json = dup(device_constants_json(*static_cast<torch::jit::Module*>(module)));
    *err = nullptr;
    return 0;
  });
}

// DLPack: zero-copy exchange of tensors with another framework in the same process (the
// Python `torch` the hookrs package runs next to). `managed` is a DLManagedTensor*.
int hookrs_from_dlpack(void* managed, at::Tensor** out, char** err) {
  return guard(err, [&]() -> int {
    *out = new at::Tensor(at::fromDLPack(static_cast<DLManagedTensor*>(managed)));
    return 0;
  });
}

int hookrs_to_dlpack(at::Tensor* t, void** out, char** err) {
  return guard(err, [&]() -> int {
    *out = at::toDLPack(*t);
    return 0;
  });
}

void hookrs_dlpack_delete(void* managed) {
  auto* m = static_cast<DLManagedTensor*>(managed);
  if (m != nullptr && m->deleter != nullptr) m->deleter(m);
}

// Copies `n` tensors of one non-CPU device into pinned host memory on a side stream: the
// side stream first waits for the work already queued on the device's current (compute)
// stream, so the copies see the finished values, and then runs beside whatever is queued
// next (the next batch's forward). Nothing here blocks the host. `dsts` receives n owned
// host tensors, readable only after hookrs_host_copy_wait; `*out_handle` owns the event and
// the sources (free with hookrs_host_copy_free, which waits first). 0, or 1 and *err.
int hookrs_host_copy(at::Tensor** srcs, int64_t n, at::Tensor** dsts, void** out_handle, char** err) {
  return guard(err, [&]() -> int {
    *out_handle = nullptr;
    TORCH_CHECK(n > 0, "hookrs_host_copy: no tensors");
    const c10::Device dev = srcs[0]->device();
    TORCH_CHECK(!dev.is_cpu(), "hookrs_host_copy: the tensors are already in host memory");
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK(srcs[i]->device() == dev, "hookrs_host_copy: tensors on ", dev, " and ", srcs[i]->device());
    }
    c10::impl::VirtualGuardImpl impl(dev.type());
    const c10::Stream compute = impl.getStream(dev);
    const c10::Stream side = impl.getStreamFromGlobalPool(dev, /*isHighPriority=*/false);
    c10::Event ready(dev.type());
    ready.record(compute);
    ready.block(side);
    auto handle = std::make_unique<HostCopy>(dev.type());
    std::vector<at::Tensor> out;
    out.reserve(n);
    {
      c10::StreamGuard on_side(side);
      for (int64_t i = 0; i < n; ++i) {
        const at::Tensor& src = *srcs[i];
        at::Tensor host = at::empty(src.sizes(), src.options().device(at::kCPU).pinned_memory(true));
        host.copy_(src, /*non_blocking=*/true);
        out.push_back(host);
        handle->sources.push_back(src);
      }
    }
    handle->done.record(side);
    for (int64_t i = 0; i < n; ++i) dsts[i] = new at::Tensor(std::move(out[i]));
    *out_handle = handle.release();
    return 0;
  });
}

// Blocks until the copies of `handle` are complete.
int hookrs_host_copy_wait(void* handle, char** err) {
  return guard(err, [&]() -> int {
    static_cast<HostCopy*>(handle)->done.synchronize();
    return 0;
  });
}

void hookrs_host_copy_free(void* handle) { delete static_cast<HostCopy*>(handle); }

// Converts the module from dtype `from` to dtype `to` (ScalarType codes): see retarget_dtype.
int hookrs_retarget_dtype(void* module, int64_t from, int64_t to, int64_t* changed, char** err) {
  return guard(err, [&]() -> int {
    *changed = retarget_dtype(*static_cast<torch::jit::Module*>(module), static_cast<c10::ScalarType>(from),
                              static_cast<c10::ScalarType>(to));
    return 0;
  });
}

// The dtypes named by the graphs' constant `dtype` arguments, as a JSON list.
int hookrs_dtype_constants(void* module, char** out_json, char** err) {
  return guard(err, [&]() -> int {
    *out_json = dup(dtype_constants_json(*static_cast<torch::jit::Module*>(module)));
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

// Installs the memory guard over libtorch's CPU allocator (once) and sets its limit in bytes
// (0: no limit). Returns the bytes the CPU tensors hold now.
// `why` says where the limit came from, for the refusal's message.
int64_t hookrs_memory_guard(int64_t limit, const char* why) {
  try {
    auto& g = MemoryGuard::get();
    static std::once_flag once;
    std::call_once(once, [&] {
      g.inner = c10::GetCPUAllocator();
      c10::SetCPUAllocator(&g, /*priority=*/1);
    });
    {
      std::lock_guard<std::mutex> lock(g.mu);
      g.why = why != nullptr ? why : "";
    }
    g.limit.store(limit);
    return g.live.load();
  } catch (...) {
    return -1;
  }
}

// The bytes the CPU tensors allocated through the memory guard hold now.
int64_t hookrs_memory_held() { return MemoryGuard::get().live.load(); }

}  // extern "C"
