// Runtime of the CUDA emulation (see cuda_emu.h): fibers, the block scheduler, barriers, warp
// exchanges, launch checks, the host API subset and the bf16 / fp16 conversions.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define DART_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DART_EMU_ASAN 1
#endif
#endif
#ifndef DART_EMU_ASAN
#define DART_EMU_ASAN 0
#endif
#if DART_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switch: a few instructions on x86-64 (saves the callee-saved registers on the old
// stack, swaps stack pointers); ucontext elsewhere (correct, but each switch is a syscall).
#if defined(__x86_64__)
#define DART_EMU_ASM_SWITCH 1
extern "C" void dart_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .p2align 4
  .globl dart_emu_switch
  .hidden dart_emu_switch
  .type dart_emu_switch, @function
dart_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dart_emu_switch, .-dart_emu_switch
)");
#else
#define DART_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace dart_emu {

uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;
long long g_atomics = 0;

namespace {

constexpr size_t kStackBytes = DART_EMU_ASAN ? (512u << 10) : (128u << 10);
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
// Device limits of an H100 / H200 (sm_90).
constexpr int kNumSms = 132;
constexpr size_t kDefaultSmem = 48u << 10;
constexpr size_t kOptinSmem = 232448;
constexpr size_t kSmemPerSm = 233472;

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kExited };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
    case WarpOp::kReduceAdd: return "__reduce_add_sync";
    case WarpOp::kReduceMin: return "__reduce_min_sync";
    case WarpOp::kReduceMax: return "__reduce_max_sync";
    case WarpOp::kReduceAnd: return "__reduce_and_sync";
    case WarpOp::kReduceOr: return "__reduce_or_sync";
    case WarpOp::kReduceXor: return "__reduce_xor_sync";
  }
  return "?";
}

struct Fiber {
#if DART_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // lowest usable byte (a guard page lies below)
  void* fake_stack = nullptr;
  State state = State::kExited;
  uint3 tid{0, 0, 0};
  int lane = 0, warp = 0;
  // warp exchange slot
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  // barrier slot
  int bar_kind = 0, bar_pred = 0, bar_result = 0;
};

struct Runtime {
  std::mutex mu;  // one launch at a time (the thread / block indices are globals)
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  Fiber* current = nullptr;
#if DART_EMU_ASM_SWITCH
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;

  bool in_launch = false;
  bool aborted = false;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0, live = 0, at_barrier = 0;
  int warp_size[kMaxWarps] = {}, warp_live[kMaxWarps] = {}, warp_waiting[kMaxWarps] = {};
  std::vector<int> order;
  char* smem = nullptr;
  size_t smem_bytes = 0;

  cudaError_t pending = cudaSuccess;  // returned (and cleared) by cudaGetLastError
  std::string message;                // of the last error; kept until the next one

  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint32_t seed = 0;
  std::mt19937 rng;

  std::map<const void*, int> max_dyn_smem;
  std::map<std::string, long long> counters;
};

Runtime& rt() {
  static Runtime* r = new Runtime();  // never destroyed: fibers may outlive static teardown
  return *r;
}

void count(const char* name, long long n = 1) { rt().counters[name] += n; }

void set_error(cudaError_t code, const std::string& msg) {
  Runtime& r = rt();
  if (r.pending == cudaSuccess) r.pending = code;
  r.message = msg;
  if (const char* e = std::getenv("DART_EMU_ABORT"); e != nullptr && e[0] == '1') {
    std::fprintf(stderr, "dart_emu: %s\n", msg.c_str());
    std::abort();
  }
}

std::string where(const Fiber* f) {
  char buf[128];
  if (f == nullptr) return "host";
  std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", g_block_idx.x,
                g_block_idx.y, g_block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  return buf;
}

// ---- fibers ----------------------------------------------------------------------------------

void fiber_main();

// slot: the fiber's index in the block; stack tops are staggered by it so that 1024 fibers do not
// map their hot frames onto the same cache sets (a large slowdown otherwise).
void prepare_fiber(Fiber& f, int slot) {
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "dart_emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    f.stack = static_cast<char*>(m) + page;
  }
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes -
                         static_cast<uintptr_t>(slot % 61) * 272u) & ~uintptr_t{15};
#if DART_EMU_ASAN
  // The previous fiber on this stack left the frames it never returned from (fiber_main, the
  // switch, a failed check) poisoned; instrumented frames rewrite their own shadow on entry, so
  // clearing the top of the stack suffices.
  constexpr size_t kClear = 64u << 10;
  const uintptr_t end = reinterpret_cast<uintptr_t>(f.stack) + kStackBytes;
  __asan_unpoison_memory_region(reinterpret_cast<char*>(top) - kClear, kClear + (end - top));
#endif
  f.fake_stack = nullptr;
#if DART_EMU_ASM_SWITCH
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                       // fiber_main's return address slot
  *--sp = reinterpret_cast<void*>(&fiber_main);          // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = top - reinterpret_cast<uintptr_t>(f.stack);
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
}

// main -> fiber
void resume(Fiber& f) {
  Runtime& r = rt();
  r.current = &f;
  g_thread_idx = f.tid;
#if DART_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.main_fake_stack, f.stack, kStackBytes);
#endif
#if DART_EMU_ASM_SWITCH
  dart_emu_switch(&r.main_sp, f.sp);
#else
  swapcontext(&r.main_ctx, &f.ctx);
#endif
#if DART_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.main_fake_stack, nullptr, nullptr);
#endif
  r.current = nullptr;
}

// fiber -> main; a dying fiber is never resumed.
void to_main(bool dying) {
  Runtime& r = rt();
  Fiber* f = r.current;
#if DART_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f->fake_stack, r.main_stack_bottom,
                                 r.main_stack_size);
#else
  (void)dying;
#endif
#if DART_EMU_ASM_SWITCH
  dart_emu_switch(&f->sp, r.main_sp);
#else
  swapcontext(&f->ctx, &r.main_ctx);
#endif
#if DART_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &r.main_stack_bottom, &r.main_stack_size);
#endif
  g_thread_idx = f->tid;
}

[[noreturn]] void abandon_current(cudaError_t code, const std::string& msg) {
  Runtime& r = rt();
  set_error(code, msg);
  r.aborted = true;
  r.current->state = State::kExited;
  to_main(true);
  __builtin_unreachable();
}

void release_barrier() {
  Runtime& r = rt();
  int kind = -1, acc = 0, all = 1, any = 0;
  for (int t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.state != State::kBarrier) continue;
    if (kind == -1) kind = f.bar_kind;
    if (f.bar_kind != kind) {
      abandon_current(cudaErrorLaunchFailure,
                      where(&f) + ": threads of one block wait in different __syncthreads "
                                  "variants (__syncthreads / _count / _and / _or)");
    }
    acc += f.bar_pred != 0;
    all &= f.bar_pred != 0;
    any |= f.bar_pred != 0;
  }
  const int result = kind == 1 ? acc : kind == 2 ? all : kind == 3 ? any : 0;
  for (int t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.state == State::kBarrier) {
      f.bar_result = result;
      f.state = State::kRunnable;
    }
  }
  r.at_barrier = 0;
  count("barriers");
}

void resolve_warp(int w) {
  Runtime& r = rt();
  Fiber* lanes = &r.fibers[w * 32];
  const WarpOp op = lanes[0].op;
  const int width = lanes[0].width;
  for (int l = 1; l < 32; ++l) {
    if (lanes[l].op != op || lanes[l].width != width) {
      abandon_current(cudaErrorLaunchFailure,
                      where(&lanes[l]) + ": lanes of one warp meet in different collectives (" +
                          op_name(lanes[l].op) + " vs " + op_name(op) +
                          " of lane 0): divergent warp");
    }
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    abandon_current(cudaErrorLaunchFailure,
                    where(r.current) + ": " + op_name(op) + " width must be a power of 2 <= 32");
  }
  uint64_t v[32];
  for (int l = 0; l < 32; ++l) v[l] = lanes[l].value;
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= (v[l] != 0 ? 1u : 0u) << l;
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lanes[l];
    const int seg = l & ~(width - 1);
    const int sub = l & (width - 1);
    uint64_t res = 0;
    switch (op) {
      case WarpOp::kShfl:
        res = v[seg + (f.arg & (width - 1))];
        break;
      case WarpOp::kShflUp:
        res = sub >= f.arg ? v[l - f.arg] : v[l];
        break;
      case WarpOp::kShflDown:
        res = sub + f.arg < width ? v[l + f.arg] : v[l];
        break;
      case WarpOp::kShflXor: {
        const int src = l ^ (f.arg & 31);
        res = src < seg + width ? v[src] : v[l];  // later groups are out of reach
        break;
      }
      case WarpOp::kBallot:
        res = ballot;
        break;
      case WarpOp::kAny:
        res = ballot != 0;
        break;
      case WarpOp::kAll:
        res = ballot == 0xffffffffu;
        break;
      case WarpOp::kMatchAny: {
        unsigned m = 0;
        for (int s = 0; s < 32; ++s) m |= (v[s] == v[l] ? 1u : 0u) << s;
        res = m;
        break;
      }
      case WarpOp::kSyncWarp:
        break;
      case WarpOp::kReduceAdd:
      case WarpOp::kReduceMin:
      case WarpOp::kReduceMax:
      case WarpOp::kReduceAnd:
      case WarpOp::kReduceOr:
      case WarpOp::kReduceXor: {
        uint32_t a = static_cast<uint32_t>(v[0]);
        for (int s = 1; s < 32; ++s) {
          const uint32_t b = static_cast<uint32_t>(v[s]);
          a = op == WarpOp::kReduceAdd   ? a + b
              : op == WarpOp::kReduceMin ? std::min(a, b)
              : op == WarpOp::kReduceMax ? std::max(a, b)
              : op == WarpOp::kReduceAnd ? (a & b)
              : op == WarpOp::kReduceOr  ? (a | b)
                                         : (a ^ b);
        }
        res = a;
        break;
      }
    }
    f.result = res;
    f.state = State::kRunnable;
  }
  r.warp_waiting[w] = 0;
  count("warp_collectives");
}

void exit_current() {
  Runtime& r = rt();
  Fiber* f = r.current;
  f->state = State::kExited;
  --r.live;
  --r.warp_live[f->warp];
  if (r.warp_waiting[f->warp] > 0) {
    abandon_current(cudaErrorLaunchFailure,
                    where(f) + " returned while other lanes of its warp wait in a warp "
                               "collective with a full mask");
  }
  if (r.at_barrier > 0 && r.at_barrier == r.live) release_barrier();
  to_main(true);
}

void fiber_main() {
  Runtime& r = rt();
#if DART_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.main_stack_bottom, &r.main_stack_size);
#endif
  r.body(r.ctx);
  exit_current();
  __builtin_unreachable();
}

// Order in which blocks (or threads) 0..n-1 are visited: i -> (a*i + b) mod n, a coprime to n.
struct Permutation {
  uint64_t n, a = 1, b = 0;
  Permutation(uint64_t count, int mode, std::mt19937& rng) : n(count) {
    if (mode == 1) {
      a = n - 1;  // reverse: (n-1)*i + (n-1) = n-1-i (mod n)
      b = n - 1;
    } else if (mode == 2 && n > 2) {
      do {
        a = 1 + rng() % (n - 1);
      } while (std::gcd(a, n) != 1);
      b = rng() % n;
    }
    if (n <= 1) a = 1, b = 0;
  }
  uint64_t operator()(uint64_t i) const {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + b) % n);
  }
};

void run_block(uint64_t linear) {
  Runtime& r = rt();
  const dim3 g = g_grid_dim, b = g_block_dim;
  g_block_idx = uint3{static_cast<unsigned>(linear % g.x),
                      static_cast<unsigned>((linear / g.x) % g.y),
                      static_cast<unsigned>(linear / (static_cast<uint64_t>(g.x) * g.y))};
  const int n = r.nthreads;
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    prepare_fiber(f, t);
    f.state = State::kRunnable;
    f.tid = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
    f.lane = t % 32;
    f.warp = t / 32;
  }
  for (int w = 0; w * 32 < n; ++w) {
    r.warp_size[w] = std::min(32, n - w * 32);
    r.warp_live[w] = r.warp_size[w];
    r.warp_waiting[w] = 0;
  }
  r.live = n;
  r.at_barrier = 0;
  std::memset(r.smem, 0xff, r.smem_bytes);
  const Permutation perm(static_cast<uint64_t>(n), r.schedule, r.rng);
  for (int i = 0; i < n; ++i) r.order[i] = static_cast<int>(perm(i));
  if (r.schedule == 2) std::shuffle(r.order.begin(), r.order.begin() + n, r.rng);

  while (r.live > 0 && !r.aborted) {
    bool ran = false;
    for (int i = 0; i < n && !r.aborted; ++i) {
      Fiber& f = r.fibers[r.order[i]];
      if (f.state == State::kRunnable) {
        resume(f);
        ran = true;
      }
    }
    if (!ran && !r.aborted) {
      int at_warp = 0;
      std::string detail;
      for (int t = 0; t < n; ++t) {
        const Fiber& f = r.fibers[t];
        if (f.state == State::kWarp) {
          if (at_warp++ == 0) detail = " (first: " + where(&f) + " in " + op_name(f.op) + ")";
        }
      }
      set_error(cudaErrorLaunchFailure,
                "deadlock in block (" + std::to_string(g_block_idx.x) + "," +
                    std::to_string(g_block_idx.y) + "," + std::to_string(g_block_idx.z) +
                    "): " + std::to_string(r.at_barrier) + " threads wait at __syncthreads, " +
                    std::to_string(at_warp) + " in warp collectives" + detail +
                    " (a collective or barrier inside divergent code)");
      r.aborted = true;
    }
  }
  count("blocks");
  count("threads", n);
}

// The reason a launch configuration is rejected, with the cudaError_t CUDA returns for it.
struct ConfigError {
  cudaError_t code = cudaSuccess;
  std::string message;
};

ConfigError config_error(const LaunchConfig& c) {
  Runtime& r = rt();
  auto dims = [](dim3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
  };
  const uint64_t threads = static_cast<uint64_t>(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreads || c.block.x > 1024 || c.block.y > 1024 ||
      c.block.z > 64) {
    return {cudaErrorInvalidConfiguration,
            "invalid block " + dims(c.block) + ": at most 1024 threads, z <= 64"};
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu ||
      c.grid.y > 65535 || c.grid.z > 65535) {
    return {cudaErrorInvalidConfiguration,
            "invalid grid " + dims(c.grid) + ": x in [1, 2^31-1], y and z in [1, 65535]"};
  }
  if (c.smem > kOptinSmem) {
    return {cudaErrorInvalidValue, std::to_string(c.smem) +
                                       " bytes of dynamic shared memory exceed the device's " +
                                       std::to_string(kOptinSmem)};
  }
  if (c.smem > kDefaultSmem) {
    auto it = r.max_dyn_smem.find(c.kernel);
    const int allowed = it == r.max_dyn_smem.end() ? 0 : it->second;
    if (static_cast<size_t>(allowed) < c.smem) {
      return {cudaErrorInvalidValue,
              std::to_string(c.smem) +
                  " bytes of dynamic shared memory need "
                  "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
                  ">= that) first (set: " +
                  std::to_string(allowed) + ")"};
    }
  }
  return {};
}

}  // namespace

// ---- entry points used by cuda_emu.h ---------------------------------------------------------

void fail(cudaError_t code, const char* what) {
  Runtime& r = rt();
  if (r.current == nullptr) {
    std::fprintf(stderr, "dart_emu: %s (outside a kernel)\n", what);
    std::abort();
  }
  abandon_current(code, where(r.current) + ": " + what);
}

void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "misaligned address %p for a %zu-byte %s", p, bytes, what);
    fail(static_cast<cudaError_t>(716), buf);  // cudaErrorMisalignedAddress
  }
}

void* dynamic_smem() {
  Runtime& r = rt();
  if (r.current == nullptr) fail(cudaErrorLaunchFailure, "dynamic shared memory outside a kernel");
  return r.smem;
}

void sync_threads() { sync_threads_reduce(0, 0); }

int sync_threads_reduce(int kind, int pred) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (f == nullptr) fail(cudaErrorLaunchFailure, "__syncthreads outside a kernel");
  if (r.warp_waiting[f->warp] > 0) {
    abandon_current(cudaErrorLaunchFailure,
                    where(f) + " reached __syncthreads while other lanes of its warp wait in " +
                        op_name(r.fibers[f->warp * 32].op) + ": divergent warp");
  }
  f->state = State::kBarrier;
  f->bar_kind = kind;
  f->bar_pred = pred;
  if (++r.at_barrier == r.live) {
    release_barrier();
  } else {
    to_main(false);
  }
  return f->bar_result;
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (f == nullptr) fail(cudaErrorLaunchFailure, "warp collective outside a kernel");
  char buf[200];
  if (mask != 0xffffffffu) {
    std::snprintf(buf, sizeof(buf),
                  "%s with mask 0x%08x: the emulation supports only full-warp collectives "
                  "(0xffffffff)",
                  op_name(op), mask);
    fail(cudaErrorNotSupported, buf);
  }
  if (r.warp_size[f->warp] != 32) {
    std::snprintf(buf, sizeof(buf), "%s with a full mask in a warp of %d threads (block size)",
                  op_name(op), r.warp_size[f->warp]);
    fail(cudaErrorLaunchFailure, buf);
  }
  if (r.warp_live[f->warp] != 32) {
    std::snprintf(buf, sizeof(buf), "%s with a full mask after %d lanes of the warp returned",
                  op_name(op), 32 - r.warp_live[f->warp]);
    fail(cudaErrorLaunchFailure, buf);
  }
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->state = State::kWarp;
  if (++r.warp_waiting[f->warp] == 32) {
    resolve_warp(f->warp);
  } else {
    to_main(false);
  }
  return f->result;
}

// Which lanes run converged is a property of the hardware's scheduler that fibers do not model.
unsigned active_mask() {
  fail(cudaErrorNotSupported,
       "__activemask: convergence is not modelled by the emulation (use a full-mask collective)");
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  count("func_set_attribute");
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kOptinSmem) return cudaErrorInvalidValue;
    r.max_dyn_smem[kernel] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

// Threads and shared memory only (registers are unknown here): an upper bound of the real one.
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t smem) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  (void)kernel;
  count("occupancy_queries");
  if (blocks == nullptr || block_size < 1 || block_size > kMaxThreads) {
    return cudaErrorInvalidValue;
  }
  int n = std::min(2048 / block_size, 32);
  n = std::min<int>(n, static_cast<int>(kSmemPerSm / (smem + 1024)));  // 1 KB reserved per CTA
  *blocks = n;
  return cudaSuccess;
}

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  Runtime& r = rt();
  if (r.in_launch) fail(cudaErrorNotSupported, "kernel launch from a kernel");
  std::lock_guard<std::mutex> lock(r.mu);
  count("launches");
  const ConfigError bad = config_error(cfg);
  if (bad.code != cudaSuccess) {
    set_error(bad.code, "launch: " + bad.message);
    return;
  }
  r.in_launch = true;
  r.aborted = false;
  r.body = body;
  r.ctx = ctx;
  g_grid_dim = cfg.grid;
  g_block_dim = cfg.block;
  r.nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  r.order.resize(kMaxThreads);
  r.smem_bytes = cfg.smem;
  r.smem = new char[cfg.smem];  // exactly the launch's size: ASan catches overruns
  r.rng.seed(r.seed);
  const uint64_t nblocks = static_cast<uint64_t>(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  const Permutation perm(nblocks, r.schedule, r.rng);
  for (uint64_t i = 0; i < nblocks && !r.aborted; ++i) run_block(perm(i));
  delete[] r.smem;
  r.smem = nullptr;
  r.in_launch = false;
  g_thread_idx = uint3{0, 0, 0};
  g_block_idx = uint3{0, 0, 0};
}

// ---- bf16 / fp16 -----------------------------------------------------------------------------

uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow -> inf)
  return static_cast<uint16_t>(u >> 16);
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t u = x & 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7fff;
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // inf, or rounds to it
  uint32_t r, rem, half;
  if (u >= 0x38800000u) {  // normal half
    const uint32_t m = u - 0x38000000u;  // exponent rebiased from 127 to 15
    r = m >> 13;
    rem = m & 0x1fffu;
    half = 0x1000u;
  } else if (u <= 0x33000000u) {  // <= 2^-25: rounds to zero (2^-25 ties to even 0)
    return static_cast<uint16_t>(sign);
  } else {  // subnormal half: units of 2^-24
    const uint32_t e = u >> 23;
    const uint32_t mant = (u & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    r = mant >> shift;
    rem = mant & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
  }
  if (rem > half || (rem == half && (r & 1u))) ++r;  // a carry into the exponent is correct
  return static_cast<uint16_t>(sign | r);
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    u = sign | ((e + 112u) << 23) | (m << 13);
  } else {
    const float v = std::ldexp(static_cast<float>(m), -24);  // exact
    std::memcpy(&u, &v, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace dart_emu

// ---- host API ----------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  auto& r = dart_emu::rt();
  const cudaError_t e = r.pending;
  r.pending = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return dart_emu::rt().pending; }
cudaError_t cudaDeviceSynchronize() { return dart_emu::rt().pending; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return dart_emu::rt().pending; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (static_cast<int>(err)) {
    case 0: return "cudaSuccess";
    case 1: return "cudaErrorInvalidValue";
    case 2: return "cudaErrorMemoryAllocation";
    case 9: return "cudaErrorInvalidConfiguration";
    case 98: return "cudaErrorInvalidDeviceFunction";
    case 101: return "cudaErrorInvalidDevice";
    case 701: return "cudaErrorLaunchOutOfResources";
    case 710: return "cudaErrorAssert";
    case 716: return "cudaErrorMisalignedAddress";
    case 719: return "cudaErrorLaunchFailure";
    case 801: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t err) { return cudaGetErrorName(err); }

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return cudaErrorInvalidValue;
  if (device != 0) return cudaErrorInvalidDevice;
  dart_emu::count("device_attribute_queries");
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = dart_emu::kNumSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(dart_emu::kSmemPerSm);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(dart_emu::kOptinSmem);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

// ---- C ABI for the tests (tests/emulation.py) -------------------------------------------------

extern "C" {

// The message of the last failed launch ("" if none yet).
const char* dart_emu_last_error_message() { return dart_emu::rt().message.c_str(); }

void dart_emu_clear_error() {
  dart_emu::rt().pending = cudaSuccess;
  dart_emu::rt().message.clear();
}

// mode: 0 blocks and threads in index order, 1 reversed, 2 seeded random.
void dart_emu_set_schedule(int mode, unsigned seed) {
  dart_emu::rt().schedule = mode;
  dart_emu::rt().seed = seed;
}

long long dart_emu_counter(const char* name) {
  if (std::string(name) == "atomics") return dart_emu::g_atomics;
  auto& c = dart_emu::rt().counters;
  auto it = c.find(name);
  return it == c.end() ? 0 : it->second;
}

void dart_emu_reset_counters() {
  dart_emu::rt().counters.clear();
  dart_emu::g_atomics = 0;
}

void dart_emu_float_to_bf16(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = dart_emu::float_to_bf16_bits(in[i]);
}
void dart_emu_float_to_half(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = dart_emu::float_to_half_bits(in[i]);
}
void dart_emu_bf16_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = dart_emu::bf16_bits_to_float(in[i]);
}
void dart_emu_half_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = dart_emu::half_bits_to_float(in[i]);
}

}  // extern "C"
