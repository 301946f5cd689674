// DLPack: zero-copy exchange of tensors with another framework in the same process (the
// Python `torch` the hookrs package runs next to). `managed` is a DLManagedTensor*.

#include <ATen/DLConvertor.h>

#include "internal.h"

using namespace hookrs;

extern "C" {

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

}  // extern "C"
