// The Metal emulator's runtime: runs a launch plan from
// csrc/metal/launch_plan.cpp over kernels registered by the C++ build of
// metal/fused_moe.metal.
//
// - Every thread of a threadgroup is a fiber (ucontext to create, _setjmp /
//   _longjmp to switch, which skips the signal-mask syscall of swapcontext).
//   A scheduler runs each fiber until it reaches a SIMD-group function, a
//   threadgroup barrier or its end. The 32 lanes of a SIMD group then meet
//   in every SIMD-group function, and all threads of the threadgroup in
//   every barrier, as on the GPU; lanes that diverge are reported.
// - Device buffers are allocated by this library between guard pages
//   (PROT_NONE): the end of each buffer touches the trailing guard page, so
//   reading or writing one byte past it faults; the slack before a buffer's
//   start is filled with a canary that is checked after the run.
// - The kernel runs in forked worker processes (threadgroups dealt round
//   robin) over shared mappings; a fault kills only the worker, which first
//   writes which kernel and which buffer into a shared error page.
//
// Everything a worker needs is allocated before fork: the parent is Python
// with MLX's threads, and a forked child must not call malloc.
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <array>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include "emulator_runtime.h"
#include "metal/launch_plan.h"

// Access tracing (trace_hooks.cpp), linked only into the traffic build of
// tests/tools/metal_emulator/traffic.py. Weak: in the normal build they are null
// and every call below is skipped.
extern "C" {
__attribute__((weak)) void fm_trace_run_begin(int n_buffers, const char* const* names,
                                              void* const* data, const size_t* bytes,
                                              uint32_t threads);
__attribute__((weak)) void fm_trace_worker_begin(int worker);
__attribute__((weak)) bool fm_trace_skip_threadgroup(uint32_t x, uint32_t y, uint32_t z);
__attribute__((weak)) void fm_trace_thread(uint32_t thread);
__attribute__((weak)) void fm_trace_sync(uint32_t first_thread, uint32_t count);
__attribute__((weak)) void fm_trace_run_end();
}

namespace metal_emu {

namespace {

constexpr int kSimdWidth = 32;
constexpr size_t kThreadgroupMemoryBytes = 32 * 1024; // Apple GPUs' limit
constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr uint8_t kCanary = 0xA5;
constexpr size_t kErrorBytes = 4096;

struct Kernel {
  void (*fn)();
  Invoker invoker;
  int buffer_params;
};

std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> kernels;
  return kernels;
}

size_t page_size() {
  static const size_t size = size_t(sysconf(_SC_PAGESIZE));
  return size;
}

size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

// ---------------------------------------------------------------------------
// Guarded buffers
// ---------------------------------------------------------------------------

struct Buffer {
  uint8_t* base; // leading guard page
  size_t mapped; // bytes mapped, guards included
  uint8_t* data;
  size_t bytes;
};

// Live buffers by data pointer, to name a faulting address.
std::map<uintptr_t, Buffer>& buffers() {
  static std::map<uintptr_t, Buffer> live;
  return live;
}

// ---------------------------------------------------------------------------
// The state of one run, set up before fork
// ---------------------------------------------------------------------------

enum class State { runnable, at_simd, at_barrier, done };

struct Fiber {
  ucontext_t context; // used once, to start the fiber
  jmp_buf resume_point;
  bool started = false;
  State state = State::done;
  Position pos{};
  size_t tg_cursor = 0; // next threadgroup_alloc offset
  float simd_value = 0.0f;
};

struct Run {
  const char* kernel_name = nullptr;
  Kernel kernel{};
  void* const* slots = nullptr;
  uint32_t grid[3] = {0, 0, 0};
  uint32_t threads = 0; // per threadgroup
  std::vector<Fiber> fibers;
  std::vector<uint8_t*> stacks;
  uint8_t* threadgroup_memory = nullptr;
  char* error = nullptr; // shared page, first byte 0 while no error
  // (slot name, buffer) pairs for messages
  std::vector<std::pair<std::string, Buffer>> bound;
};

Run* g_run = nullptr;
Fiber* g_current = nullptr;
jmp_buf g_scheduler;

// Records the first error of this worker in the shared page and exits it.
[[noreturn]] void die(int code, const char* fmt, ...) {
  if (g_run && g_run->error && g_run->error[0] == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_run->error, kErrorBytes, fmt, ap);
    va_end(ap);
  }
  _exit(code);
}

void yield_to_scheduler(State state) {
  g_current->state = state;
  if (!_setjmp(g_current->resume_point)) {
    _longjmp(g_scheduler, 1);
  }
}

void fiber_main() {
  for (;;) {
    Fiber* f = g_current;
    f->tg_cursor = 0;
    g_run->kernel.invoker(g_run->kernel.fn, g_run->slots, f->pos);
    yield_to_scheduler(State::done);
  }
}

void resume(Fiber& f) {
  g_current = &f;
  if (!_setjmp(g_scheduler)) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.context);
    }
    _longjmp(f.resume_point, 1);
  }
}

const char* state_name(State s) {
  switch (s) {
    case State::runnable:
      return "running";
    case State::at_simd:
      return "in a SIMD-group function";
    case State::at_barrier:
      return "at threadgroup_barrier";
    case State::done:
      return "finished";
  }
  return "?";
}

// Sums like a butterfly of simd_shuffle_xor steps, the usual hardware order.
float butterfly_sum(const float* v) {
  float tmp[kSimdWidth];
  std::memcpy(tmp, v, sizeof(tmp));
  for (int offset = kSimdWidth / 2; offset >= 1; offset /= 2) {
    float next[kSimdWidth];
    for (int i = 0; i < kSimdWidth; ++i) {
      next[i] = tmp[i] + tmp[i ^ offset];
    }
    std::memcpy(tmp, next, sizeof(tmp));
  }
  return tmp[0];
}

void run_threadgroup(uint32_t x, uint32_t y, uint32_t z) {
  Run& run = *g_run;
  const uint32_t n = run.threads;
  // Threadgroup memory starts as garbage on a GPU: NaN-like bytes here, so a
  // kernel that forgets to initialise it gets wrong results.
  std::memset(run.threadgroup_memory, 0xFF, kThreadgroupMemoryBytes);
  for (uint32_t t = 0; t < n; ++t) {
    Fiber& f = run.fibers[t];
    f.state = State::runnable;
    f.pos = {{x, y, z}, t, t / kSimdWidth, t % kSimdWidth};
  }
  for (;;) {
    for (uint32_t t = 0; t < n; ++t) {
      if (run.fibers[t].state == State::runnable) {
        if (fm_trace_thread) {
          fm_trace_thread(t);
        }
        resume(run.fibers[t]);
      }
    }
    bool progress = false;
    int done = 0, at_barrier = 0;
    for (uint32_t g = 0; g * kSimdWidth < n; ++g) {
      Fiber* lanes = &run.fibers[g * kSimdWidth];
      int at_simd = 0;
      for (int l = 0; l < kSimdWidth; ++l) {
        at_simd += lanes[l].state == State::at_simd;
      }
      if (at_simd == 0) {
        continue;
      }
      if (at_simd != kSimdWidth) {
        for (int l = 0; l < kSimdWidth; ++l) {
          if (lanes[l].state != State::at_simd) {
            die(2,
                "kernel %s: divergent SIMD-group function in threadgroup "
                "(%u, %u, %u), SIMD group %u: lane %d is %s while %d lanes "
                "wait in simd_sum",
                run.kernel_name, x, y, z, g, l, state_name(lanes[l].state),
                at_simd);
          }
        }
      }
      if (fm_trace_sync) {
        fm_trace_sync(g * kSimdWidth, kSimdWidth);
      }
      float values[kSimdWidth];
      for (int l = 0; l < kSimdWidth; ++l) {
        values[l] = lanes[l].simd_value;
      }
      const float sum = butterfly_sum(values);
      for (int l = 0; l < kSimdWidth; ++l) {
        lanes[l].simd_value = sum;
        lanes[l].state = State::runnable;
      }
      progress = true;
    }
    if (progress) {
      continue;
    }
    for (uint32_t t = 0; t < n; ++t) {
      done += run.fibers[t].state == State::done;
      at_barrier += run.fibers[t].state == State::at_barrier;
    }
    if ((done == int(n) || at_barrier == int(n)) && fm_trace_sync) {
      fm_trace_sync(0, n);
    }
    if (done == int(n)) {
      return;
    }
    if (at_barrier == int(n)) {
      for (uint32_t t = 0; t < n; ++t) {
        run.fibers[t].state = State::runnable;
      }
      continue;
    }
    die(2,
        "kernel %s: threadgroup_barrier in threadgroup (%u, %u, %u) not "
        "reached by every thread: %d at the barrier, %d finished",
        run.kernel_name, x, y, z, at_barrier, done);
  }
}

void on_fault(int sig, siginfo_t* info, void*) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const char* what = sig == SIGSEGV ? "SIGSEGV" : "SIGBUS";
  if (g_run) {
    for (const auto& [name, b] : g_run->bound) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(b.base);
      const uintptr_t data = reinterpret_cast<uintptr_t>(b.data);
      const uintptr_t end = data + b.bytes;
      if (addr >= end && addr < lo + b.mapped) {
        die(3,
            "kernel %s: out-of-bounds access (%s) %zu bytes past the end of "
            "buffer '%s' (%zu bytes)",
            g_run->kernel_name, what, size_t(addr - end), name.c_str(),
            b.bytes);
      }
      if (addr >= lo && addr < data) {
        die(3,
            "kernel %s: out-of-bounds access (%s) %zu bytes before buffer "
            "'%s' (%zu bytes)",
            g_run->kernel_name, what, size_t(data - addr), name.c_str(),
            b.bytes);
      }
    }
    die(3, "kernel %s: invalid memory access (%s) at %p, outside every "
           "bound buffer", g_run->kernel_name, what, info->si_addr);
  }
  _exit(3);
}

void worker(int index, int workers) {
  static uint8_t alt_stack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof(alt_stack);
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);

  Run& run = *g_run;
  for (uint32_t t = 0; t < run.threads; ++t) {
    Fiber& f = run.fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = run.stacks[t];
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  if (fm_trace_worker_begin) {
    fm_trace_worker_begin(index);
  }
  uint64_t i = 0;
  for (uint32_t z = 0; z < run.grid[2]; ++z) {
    for (uint32_t y = 0; y < run.grid[1]; ++y) {
      for (uint32_t x = 0; x < run.grid[0]; ++x, ++i) {
        if (int(i % uint64_t(workers)) == index &&
            !(fm_trace_skip_threadgroup && fm_trace_skip_threadgroup(x, y, z))) {
          run_threadgroup(x, y, z);
        }
      }
    }
  }
  _exit(0);
}

void set_error(char* err, size_t len, const std::string& msg) {
  if (err && len) {
    std::snprintf(err, len, "%s", msg.c_str());
  }
}

} // namespace

// ---------------------------------------------------------------------------
// Called from kernel code
// ---------------------------------------------------------------------------

void register_kernel(const char* name, void (*fn)(), Invoker invoker,
                     int buffer_params) {
  registry()[name] = {fn, invoker, buffer_params};
}

float simd_sum(float v) {
  g_current->simd_value = v;
  yield_to_scheduler(State::at_simd);
  return g_current->simd_value;
}

void threadgroup_barrier() {
  yield_to_scheduler(State::at_barrier);
}

void* threadgroup_alloc(size_t bytes, size_t align) {
  Fiber* f = g_current;
  const size_t offset = round_up(f->tg_cursor, align);
  if (offset + bytes > kThreadgroupMemoryBytes) {
    die(2, "kernel %s: threadgroup arrays need more than %zu bytes",
        g_run->kernel_name, kThreadgroupMemoryBytes);
  }
  f->tg_cursor = offset + bytes;
  return g_run->threadgroup_memory + offset;
}

} // namespace metal_emu

// ---------------------------------------------------------------------------
// C API for the tests (tests/tools/metal_emulator/__init__.py, via ctypes)
// ---------------------------------------------------------------------------

using namespace metal_emu;
namespace plan_ns = fused_moe::metal;

namespace {

// Runs every threadgroup of `grid` with `threads` threads each, buffers bound
// in slot order; 0, or non-zero with a message in `err`.
int launch(const std::string& kernel_name, const Kernel& kernel, const uint32_t* grid,
           uint32_t threads, const std::vector<std::pair<std::string, void*>>& bound,
           int workers, char* err, size_t err_len) {
  Run run;
  run.kernel_name = kernel_name.c_str();
  run.kernel = kernel;
  std::vector<void*> slots;
  for (const auto& [name, p] : bound) {
    auto it = buffers().find(reinterpret_cast<uintptr_t>(p));
    if (it == buffers().end()) {
      set_error(err, err_len,
                "buffer '" + name + "' was not allocated by fm_emu_buffer_alloc");
      return 1;
    }
    run.bound.emplace_back(name, it->second);
    slots.push_back(p);
  }
  run.slots = slots.data();
  for (int d = 0; d < 3; ++d) {
    run.grid[d] = grid[d];
  }
  run.threads = threads;
  if (run.threads % 32 != 0) {
    set_error(err, err_len, "threadgroup size must be a multiple of 32");
    return 1;
  }
  run.fibers.resize(run.threads);
  for (uint32_t t = 0; t < run.threads; ++t) {
    run.stacks.push_back(static_cast<uint8_t*>(
        mmap(nullptr, kFiberStackBytes, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)));
  }
  run.threadgroup_memory = static_cast<uint8_t*>(std::malloc(kThreadgroupMemoryBytes));
  run.error = static_cast<char*>(mmap(nullptr, kErrorBytes,
                                      PROT_READ | PROT_WRITE,
                                      MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  run.error[0] = 0;

  const uint64_t groups =
      uint64_t(run.grid[0]) * run.grid[1] * run.grid[2];
  const int n_workers =
      int(std::max<uint64_t>(1, std::min<uint64_t>(groups, uint64_t(std::max(workers, 1)))));
  int status_code = 0;
  std::string message;
  if (fm_trace_run_begin) {
    std::vector<const char*> names;
    std::vector<void*> data;
    std::vector<size_t> bytes;
    for (const auto& [name, b] : run.bound) {
      names.push_back(name.c_str());
      data.push_back(b.data);
      bytes.push_back(b.bytes);
    }
    fm_trace_run_begin(int(names.size()), names.data(), data.data(), bytes.data(),
                       run.threads);
  }
  if (groups > 0) {
    g_run = &run;
    std::fflush(nullptr);
    std::vector<pid_t> pids;
    for (int w = 0; w < n_workers; ++w) {
      const pid_t pid = fork();
      if (pid == 0) {
        worker(w, n_workers);
      }
      pids.push_back(pid);
    }
    for (pid_t pid : pids) {
      int status = 0;
      waitpid(pid, &status, 0);
      if (status_code == 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        status_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
    }
    g_run = nullptr;
    if (status_code != 0) {
      message = run.error[0] ? std::string(run.error)
                             : "kernel " + kernel_name +
              ": emulator worker died with status " +
              std::to_string(status_code);
    }
  }
  if (fm_trace_run_end) {
    fm_trace_run_end();
  }
  // Writes before a buffer's start land in its canary slack.
  for (const auto& [name, b] : run.bound) {
    for (uint8_t* p = b.base + page_size(); p < b.data; ++p) {
      if (*p != kCanary && message.empty()) {
        status_code = 3;
        message = "kernel " + kernel_name + ": out-of-bounds write " +
            std::to_string(b.data - p) + " bytes before buffer '" + name + "'";
      }
    }
  }
  for (auto* s : run.stacks) {
    munmap(s, kFiberStackBytes);
  }
  std::free(run.threadgroup_memory);
  munmap(run.error, kErrorBytes);
  if (status_code != 0) {
    set_error(err, err_len, message);
    return status_code;
  }
  return 0;
}

} // namespace

// The Problem (csrc/metal/launch_plan.h) as the C API passes it.
struct FmEmuProblem {
  const char* op;
  const char* dtype;
  const char* mode;
  const char* activation;
  const char* gate_dtype; // the router's unquantized gate
  int bits, group_size, tokens, top_k, hidden, intermediate, experts;
  int bias, global_scale, x_per_slot, combine;
  float limit, alpha, beta, linear_beta;
};

namespace {

template <typename Enum, size_t N>
Enum by_name(const char* name, const std::array<const char*, N>& names, const char* what) {
  for (size_t i = 0; i < N; ++i) {
    if (std::strcmp(name, names[i]) == 0) {
      return static_cast<Enum>(i);
    }
  }
  throw std::invalid_argument(std::string("unknown ") + what + " '" + name + "'");
}

plan_ns::Problem to_problem(const FmEmuProblem& q) {
  plan_ns::Problem p{plan_ns::op_from_name(q.op), plan_ns::dtype_from_name(q.dtype),
                     q.bits, q.group_size, q.tokens, q.top_k, q.hidden,
                     q.intermediate, q.experts, plan_ns::dtype_from_name(q.gate_dtype)};
  p.mode = by_name<fused_moe::QuantMode>(q.mode, fused_moe::kModeNames, "mode");
  std::array<const char*, fused_moe::kActivations.size()> activations{};
  for (size_t i = 0; i < activations.size(); ++i) {
    activations[i] = fused_moe::kActivations[i].name;
  }
  p.activation = by_name<fused_moe::Activation>(q.activation, activations, "activation");
  p.bias = q.bias != 0;
  p.global_scale = q.global_scale != 0;
  p.x_per_slot = q.x_per_slot != 0;
  p.combine = q.combine != 0;
  p.limit = q.limit;
  p.alpha = q.alpha;
  p.beta = q.beta;
  p.linear_beta = q.linear_beta;
  return p;
}

} // namespace

extern "C" {

// A buffer of `bytes` between guard pages; its last byte touches the
// trailing guard page.
void* fm_emu_buffer_alloc(size_t bytes) {
  const size_t page = page_size();
  const size_t body = round_up(bytes, page);
  const size_t mapped = body + 2 * page;
  void* base = mmap(nullptr, mapped, PROT_NONE, MAP_SHARED | MAP_ANONYMOUS,
                    -1, 0);
  if (base == MAP_FAILED) {
    return nullptr;
  }
  uint8_t* b = static_cast<uint8_t*>(base);
  if (body && mprotect(b + page, body, PROT_READ | PROT_WRITE) != 0) {
    munmap(base, mapped);
    return nullptr;
  }
  uint8_t* data = b + page + (body - bytes);
  std::memset(b + page, kCanary, body - bytes);
  buffers()[reinterpret_cast<uintptr_t>(data)] = {b, mapped, data, bytes};
  return data;
}

void fm_emu_buffer_free(void* data) {
  auto it = buffers().find(reinterpret_cast<uintptr_t>(data));
  if (it != buffers().end()) {
    munmap(it->second.base, it->second.mapped);
    buffers().erase(it);
  }
}

int fm_emu_kernel_count() {
  return int(registry().size());
}

// Name of registered kernel i (in name order), for the tests' coverage check.
const char* fm_emu_kernel_name(int i) {
  auto it = registry().begin();
  std::advance(it, i);
  return it->first.c_str();
}

// Whether a kernel of this name is registered (its library is loaded).
int fm_emu_has_kernel(const char* name) {
  return registry().count(name) ? 1 : 0;
}

// Runs one op call: builds the launch plan with the host code, binds the
// Primitive's inputs and outputs (guarded buffers from fm_emu_buffer_alloc)
// by the plan's bindings, and runs every threadgroup. Returns 0, or
// non-zero with a message in `err`. The kernel's name goes to `kernel_out`.
// An absent input's slot gets a buffer of no bytes: any read of it faults.
int fm_emu_run(const FmEmuProblem* problem, void* const* inputs, int n_inputs,
               void* const* outputs, int n_outputs, int workers,
               char* kernel_out, size_t kernel_out_len, char* err,
               size_t err_len) {
  plan_ns::LaunchPlan plan;
  try {
    plan = plan_ns::make_launch_plan(to_problem(*problem));
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
  set_error(kernel_out, kernel_out_len, plan.kernel);
  auto found = registry().find(plan.kernel);
  if (found == registry().end()) {
    set_error(err, err_len,
              "Metal kernel '" + plan.kernel +
                  "' is in the launch plan but no loaded emulator build of "
                  "metal/fused_moe.metal registered it");
    return 1;
  }
  if (found->second.buffer_params != int(plan.buffers.size())) {
    set_error(err, err_len,
              "kernel " + plan.kernel + " declares " +
                  std::to_string(found->second.buffer_params) +
                  " buffers but its launch plan binds " +
                  std::to_string(plan.buffers.size()));
    return 1;
  }

  std::vector<void*> own; // args and absent buffers, freed after the run
  std::vector<std::pair<std::string, void*>> bound;
  for (const auto& b : plan.buffers) {
    void* p = nullptr;
    if (b.source == plan_ns::Source::input || b.source == plan_ns::Source::output) {
      const bool input = b.source == plan_ns::Source::input;
      const int given = input ? n_inputs : n_outputs;
      const std::string what = input ? "input" : "output";
      if (b.index >= given) {
        for (void* o : own) {
          fm_emu_buffer_free(o);
        }
        set_error(err, err_len,
                  "kernel " + plan.kernel + " binds " + what + " " +
                      std::to_string(b.index) + " ('" + b.name + "') but " +
                      std::to_string(given) + " " + what + "s were given");
        return 1;
      }
      p = (input ? inputs : outputs)[b.index];
    } else if (b.source == plan_ns::Source::args) {
      p = fm_emu_buffer_alloc(plan.args.size());
      std::memcpy(p, plan.args.data(), plan.args.size());
      own.push_back(p);
    } else {
      p = fm_emu_buffer_alloc(0);
      own.push_back(p);
    }
    bound.emplace_back(std::string(b.name) +
                           (b.source == plan_ns::Source::absent ? " (absent)" : ""),
                       p);
  }
  const uint32_t threads = plan.threads_per_threadgroup[0] *
      plan.threads_per_threadgroup[1] * plan.threads_per_threadgroup[2];
  const int rc = launch(plan.kernel, found->second, plan.threadgroups.data(),
                        threads, bound, workers, err, err_len);
  for (void* o : own) {
    fm_emu_buffer_free(o);
  }
  return rc;
}

// Runs one registered kernel on a grid the caller gives, with buffers from
// fm_emu_buffer_alloc bound in slot order: the traffic probes
// (trace_probes.metal), which have no launch plan.
int fm_emu_run_kernel(const char* kernel, const uint32_t* grid, uint32_t threads,
                      void* const* buffers, const char* const* names, int n_buffers,
                      int workers, char* err, size_t err_len) {
  auto found = registry().find(kernel);
  if (found == registry().end()) {
    set_error(err, err_len, std::string("no emulated kernel named '") + kernel + "'");
    return 1;
  }
  if (found->second.buffer_params != n_buffers) {
    set_error(err, err_len, std::string("kernel ") + kernel + " declares " +
                  std::to_string(found->second.buffer_params) + " buffers, " +
                  std::to_string(n_buffers) + " given");
    return 1;
  }
  std::vector<std::pair<std::string, void*>> bound;
  for (int i = 0; i < n_buffers; ++i) {
    bound.emplace_back(names[i], buffers[i]);
  }
  return launch(kernel, found->second, grid, threads, bound, workers, err, err_len);
}

} // extern "C"
