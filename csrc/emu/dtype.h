// Element-type dispatch for the emulation entry points: 0 float32, 1 float16, 2 bfloat16
// (the codes of tests/emulation.py).
#pragma once

#include "cuda_emu.h"

namespace dart_emu {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return static_cast<int>(f(Tag<float>{}));
    case 1:
      return static_cast<int>(f(Tag<__half>{}));
    case 2:
      return static_cast<int>(f(Tag<__nv_bfloat16>{}));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace dart_emu
