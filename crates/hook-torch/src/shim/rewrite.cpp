// Loading a TorchScript module and instrumenting it: every submodule's forward graph gets
// `hookrs::point` sites (its main input, its output, the scores and pattern of each softmax),
// rewritten once per module class; each instance gets its own site ids as int attributes.
// The same module object is handed back (no save and reload). Also: its forward, its
// parameters.

#include "internal.h"

namespace hookrs {
namespace {

struct Site {
  int64_t id;
  std::string module;  // dotted module path
  std::string kind;    // output | input | attention_matrix | attention_matrix_pre_softmax
};

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

  // Rewrites the graphs of `cls` once (every traced method of a module: `forward`, and
  // `forward1`, ... where the archive's cached step called it too), with the same attributes,
  // so a site fires in whichever graph runs; returns the (attribute, kind) list.
  std::vector<std::pair<std::string, std::string>>& rewrite(torch::jit::Module& m) {
    auto cls = m.type().get();
    auto found = attrs.find(cls);
    if (found != attrs.end()) {
      return found->second;
    }
    std::vector<std::pair<std::string, std::string>> list;
    for (const auto& method : m.get_methods()) {
      const std::string& name = method.name();
      if (name.rfind("forward", 0) != 0) continue;
      rewrite_graph(m, *torch::jit::toGraphFunction(method.function()).graph(), list);
    }
    return attrs[cls] = list;
  }

  void rewrite_graph(torch::jit::Module& m, Graph& graph, std::vector<std::pair<std::string, std::string>>& list) {
    Graph* g = &graph;
    auto note = [&](const std::string& attr, const std::string& kind) {
      for (auto& e : list) {
        if (e.first == attr) return;
      }
      list.emplace_back(attr, kind);
    };
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
        note("__hookrs_in", "input");
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
      note(pre, "attention_matrix_pre_softmax" + (k ? std::to_string(k) : std::string()));
      note(post, "attention_matrix" + (k ? std::to_string(k) : std::string()));
      ++k;
    }
    // .output: the returned tensor, or element 0 of a returned tuple
    Node* ret = g->return_node();
    Value* out = ret->inputs().at(0);
    if (is_tensor(out)) {
      add_attr("__hookrs_out");
      Value* hooked = insert_point(*g, self, "__hookrs_out", out, ret);
      ret->replaceInput(0, hooked);
      note("__hookrs_out", "output");
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
      note("__hookrs_out", "output");
    }
  }

  void instrument(torch::jit::Module& m, const std::string& name) {
    auto& list = rewrite(m);
    for (auto& [attr, kind] : list) {
      int64_t id = next++;
      m._ivalue()->setAttr(attr, c10::IValue(id));
      sites.push_back(Site{id, name, kind});
    }
  }
};


}  // namespace
}  // namespace hookrs

using namespace hookrs;

extern "C" {

int hookrs_load(const char* path, const char* device, const char* constants_device, void** out_module, hookrs_sites* out_sites,
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
    out_sites->len = static_cast<int64_t>(rw.sites.size());
    out_sites->items = static_cast<hookrs_site*>(std::calloc(rw.sites.size() + 1, sizeof(hookrs_site)));
    for (size_t i = 0; i < rw.sites.size(); ++i) {
      out_sites->items[i] = hookrs_site{rw.sites[i].id, dup(rw.sites[i].module), dup(rw.sites[i].kind)};
    }
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

// step(input_ids, attention_mask, past...) -> (logits, new keys and values...): the archive's
// cached step. n_past tensors in; 1 + n_past owned tensors written to out (capacity n_past + 1).
// An archive without the method, or a result of another shape, is an error naming it.
int hookrs_step(void* module, at::Tensor* ids, at::Tensor* mask, at::Tensor** past, int64_t n_past, at::Tensor** out, char** err) {
  return guard(err, [&]() -> int {
    auto* m = static_cast<torch::jit::Module*>(module);
    auto method = m->find_method("step");
    if (!method) {
      *err = dup("the archive has no cached step graph (it was exported by an older export.py): export the model again");
      return 1;
    }
    // The profiling executor would profile and re-optimise the graph for every new past length
    // (half a second each on SmolLM2, paid again as the cache grows); the plain interpreter
    // runs a step as fast as eager PyTorch from the first token. The switch is this thread's
    // (thread-local in libtorch) and the guard restores it when the call returns.
    torch::jit::GraphOptimizerEnabledGuard unoptimized(false);
    std::vector<c10::IValue> args{*ids, *mask};
    args.reserve(2 + n_past);
    for (int64_t i = 0; i < n_past; ++i) args.emplace_back(*past[i]);
    c10::IValue r = (*method)(std::move(args));
    if (!r.isTuple() || static_cast<int64_t>(r.toTupleRef().elements().size()) != n_past + 1) {
      *err = dup("the cached step returned " + r.tagKind() + ", expected a tuple of the logits and " + std::to_string(n_past) + " key/value tensors");
      return 1;
    }
    const auto& items = r.toTupleRef().elements();
    for (const auto& item : items) {
      if (!item.isTensor()) {
        *err = dup("the cached step returned a " + item.tagKind() + " where a tensor belongs");
        return 1;
      }
    }
    for (int64_t i = 0; i <= n_past; ++i) out[i] = new at::Tensor(items[i].toTensor());
    *err = nullptr;
    return 0;
  });
}

int hookrs_parameters(void* module, hookrs_parameter_visitor visit, void* ctx, char** err) {
  return guard(err, [&]() -> int {
    auto* m = static_cast<torch::jit::Module*>(module);
    for (const auto& p : m->named_parameters(/*recurse=*/true)) {
      visit(ctx, p.name.c_str(), new at::Tensor(p.value));
    }
    *err = nullptr;
    return 0;
  });
}

}  // extern "C"
