// Device-memory access tracing for the traffic build of the emulator
// (traffic.py). The kernels are compiled with clang's
// -fsanitize-coverage=trace-loads,trace-stores, which calls the
// __sanitizer_cov_load<N> / __sanitizer_cov_store<N> hooks below before every
// load and store; this file is compiled without that instrumentation.
//
// - Only addresses inside the run's bound buffers count (the emulator hands
//   them over in fm_trace_run_begin); stack, threadgroup memory and the
//   emulator's own data are ignored.
// - Every lane keeps the list of its device accesses since its SIMD group last
//   met (simd_sum, a barrier, the end of the threadgroup). When the group
//   meets, the k-th access of every lane is taken as one SIMD-group
//   instruction: it must be the same load site (return address), buffer and
//   direction in every lane that has a k-th access (lanes with fewer accesses
//   are masked off). If the lanes disagree, that access and every later one
//   of the segment are counted as divergent, lane by lane, and not grouped.
// - Per instruction: the bytes used (the union of the lanes' bytes) and the
//   distinct 32-byte sectors they fall in, offsets taken from the buffer's
//   start (a Metal buffer starts page-aligned). Per buffer: how many
//   instructions read each byte (saturating at 255), so that re-reads across
//   lanes, SIMD groups and threadgroups show.
//
// Everything a worker writes lives in shared mappings made in the parent
// before fork; the parent merges the workers' slots in fm_trace_run_end.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <sys/mman.h>

namespace {

constexpr int kMaxBuffers = 16;
constexpr int kLanes = 32;
constexpr int kMaxWorkers = 64;
constexpr uint32_t kMaxThreads = 1024;
constexpr size_t kLaneCapacity = size_t(1) << 14; // accesses between two syncs
constexpr int kSiteSlots = 2048; // load/store sites per worker (hash table)
constexpr size_t kSector = 32;
constexpr size_t kPage = 4096; // granule of the touched-page bitmap

struct Access {
  uintptr_t pc;
  uint32_t offset;
  uint8_t buffer;
  uint8_t size;
  uint8_t store;
};

// One buffer and direction (0 load, 1 store), or one site.
struct Stats {
  uint64_t instructions; // SIMD-group instructions (lockstep groups)
  uint64_t lane_accesses; // lane accesses inside them
  uint64_t bytes_requested; // Σ access sizes over those lanes
  uint64_t bytes_used; // Σ per instruction of the union of the lanes' bytes
  uint64_t sectors; // Σ per instruction of distinct 32-byte sectors
  uint64_t divergent_accesses; // lane accesses not grouped (lanes disagreed)
  uint64_t divergent_bytes;
};

struct Site {
  uintptr_t pc; // 0: free slot
  uint32_t buffer;
  uint32_t store;
  Stats stats;
};

struct WorkerSlot {
  Stats buffers[kMaxBuffers][2];
  Site sites[kSiteSlots];
  uint64_t overflowed_lanes; // lanes that hit kLaneCapacity (then untraced)
  uint64_t lost_sites; // site table full
};

// The run, set up by fm_trace_run_begin in the parent.
struct Trace {
  int n_buffers = 0;
  std::string names[kMaxBuffers];
  uintptr_t lo[kMaxBuffers] = {};
  size_t len[kMaxBuffers] = {};
  uint8_t* reads[kMaxBuffers] = {}; // per byte: instructions reading it
  uint64_t* touched[kMaxBuffers] = {}; // per page of `reads`: bit set if used
  size_t touched_words[kMaxBuffers] = {};
  uint32_t threads = 0;
  WorkerSlot* workers = nullptr; // shared, kMaxWorkers slots
  Access* lanes = nullptr; // kLaneCapacity per thread
  uint32_t* lane_count = nullptr; // per thread
  bool active = false;
};

Trace g_trace;
WorkerSlot* g_slot = nullptr; // this worker's
uint32_t g_thread = 0; // the fiber running now
uint32_t g_sample_stride = 1; // trace threadgroups with x % stride == 0

// Results of the last run, merged in the parent.
struct BufferResult {
  std::string name;
  size_t bytes;
  Stats load, store;
  uint64_t distinct_read; // bytes read at least once
  uint64_t read_histogram[256]; // bytes by instructions reading them
};
std::vector<BufferResult> g_results;
std::vector<Site> g_sites;
uint64_t g_overflowed_lanes = 0, g_lost_sites = 0;

void* shared_zeroed(size_t bytes) {
  if (bytes == 0) {
    return nullptr;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

void release() {
  for (int b = 0; b < g_trace.n_buffers; ++b) {
    if (g_trace.reads[b]) {
      munmap(g_trace.reads[b], g_trace.len[b]);
    }
    if (g_trace.touched[b]) {
      munmap(g_trace.touched[b], g_trace.touched_words[b] * 8);
    }
    g_trace.reads[b] = nullptr;
    g_trace.touched[b] = nullptr;
  }
  if (g_trace.workers) {
    munmap(g_trace.workers, sizeof(WorkerSlot) * kMaxWorkers);
  }
  if (g_trace.lanes) {
    munmap(g_trace.lanes, sizeof(Access) * kLaneCapacity * g_trace.threads);
    munmap(g_trace.lane_count, sizeof(uint32_t) * g_trace.threads);
  }
  g_trace.workers = nullptr;
  g_trace.lanes = nullptr;
  g_trace.active = false;
}

inline __attribute__((always_inline)) void record(const void* addr, uint8_t size,
                                                  uint8_t store, uintptr_t pc) {
  if (!g_trace.active) {
    return;
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  for (int b = 0; b < g_trace.n_buffers; ++b) {
    const uintptr_t off = a - g_trace.lo[b];
    if (off < g_trace.len[b]) {
      uint32_t& n = g_trace.lane_count[g_thread];
      if (n >= kLaneCapacity) {
        if (n == kLaneCapacity) {
          ++g_slot->overflowed_lanes;
          ++n;
        }
        return;
      }
      g_trace.lanes[size_t(g_thread) * kLaneCapacity + n++] = {
          pc, uint32_t(off), uint8_t(b), size, store};
      return;
    }
  }
}

Site* site(uintptr_t pc, uint32_t buffer, uint32_t store) {
  uint64_t h = (pc ^ (uint64_t(buffer) << 1) ^ store) * 0x9E3779B97F4A7C15ull;
  for (int probe = 0; probe < kSiteSlots; ++probe) {
    Site& s = g_slot->sites[(h >> 40) % kSiteSlots];
    if (s.pc == pc && s.buffer == buffer && s.store == store) {
      return &s;
    }
    if (s.pc == 0) {
      s.pc = pc;
      s.buffer = buffer;
      s.store = store;
      return &s;
    }
    ++h;
    h = h * 0x9E3779B97F4A7C15ull;
  }
  ++g_slot->lost_sites;
  return nullptr;
}

// Counts one more instruction reading bytes [begin, end) of buffer b.
void count_reads(int b, size_t begin, size_t end) {
  uint8_t* r = g_trace.reads[b];
  for (size_t i = begin; i < end; ++i) {
    uint8_t v = __atomic_load_n(&r[i], __ATOMIC_RELAXED);
    while (v != 255 &&
           !__atomic_compare_exchange_n(&r[i], &v, uint8_t(v + 1), true,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
  for (size_t page = begin / kPage; page <= (end - 1) / kPage; ++page) {
    __atomic_fetch_or(&g_trace.touched[b][page / 64], uint64_t(1) << (page % 64),
                      __ATOMIC_RELAXED);
  }
}

void add(Stats& s, const Stats& d) {
  s.instructions += d.instructions;
  s.lane_accesses += d.lane_accesses;
  s.bytes_requested += d.bytes_requested;
  s.bytes_used += d.bytes_used;
  s.sectors += d.sectors;
  s.divergent_accesses += d.divergent_accesses;
  s.divergent_bytes += d.divergent_bytes;
}

// One lockstep instruction: the lanes' accesses `a` (all one site, buffer
// and direction).
void instruction(const Access* const* a, int n) {
  struct Span {
    uint32_t begin, end;
  } spans[kLanes];
  for (int i = 0; i < n; ++i) {
    spans[i] = {a[i]->offset, a[i]->offset + a[i]->size};
  }
  std::sort(spans, spans + n, [](Span x, Span y) { return x.begin < y.begin; });
  Stats d{};
  d.instructions = 1;
  d.lane_accesses = uint64_t(n);
  const int b = a[0]->buffer;
  const bool store = a[0]->store;
  int64_t last_sector = -1;
  uint32_t begin = spans[0].begin, end = spans[0].end;
  auto close = [&](uint32_t s, uint32_t e) {
    d.bytes_used += e - s;
    int64_t first = int64_t(s / kSector), last = int64_t((e - 1) / kSector);
    if (first <= last_sector) {
      first = last_sector + 1;
    }
    if (last >= first) {
      d.sectors += uint64_t(last - first + 1);
    }
    last_sector = std::max(last_sector, last);
    if (!store) {
      count_reads(b, s, e);
    }
  };
  for (int i = 0; i < n; ++i) {
    d.bytes_requested += a[i]->size;
    if (i == 0) {
      continue;
    }
    if (spans[i].begin <= end) {
      end = std::max(end, spans[i].end);
    } else {
      close(begin, end);
      begin = spans[i].begin;
      end = spans[i].end;
    }
  }
  close(begin, end);
  add(g_slot->buffers[b][store], d);
  if (Site* s = site(a[0]->pc, uint32_t(b), store)) {
    add(s->stats, d);
  }
}

void divergent(const Access& a) {
  Stats d{};
  d.divergent_accesses = 1;
  d.divergent_bytes = a.size;
  add(g_slot->buffers[a.buffer][a.store], d);
  if (Site* s = site(a.pc, a.buffer, a.store)) {
    add(s->stats, d);
  }
  if (!a.store) {
    count_reads(a.buffer, a.offset, a.offset + a.size);
  }
}

// The SIMD group of threads [first, first + 32) has met: group its lanes'
// accesses by ordinal.
void flush_group(uint32_t first) {
  const Access* lane_access[kLanes];
  uint32_t counts[kLanes];
  uint32_t longest = 0;
  for (int l = 0; l < kLanes; ++l) {
    counts[l] = std::min<uint32_t>(g_trace.lane_count[first + l], kLaneCapacity);
    longest = std::max(longest, counts[l]);
  }
  bool diverged = false;
  for (uint32_t k = 0; k < longest; ++k) {
    int n = 0;
    for (int l = 0; l < kLanes; ++l) {
      if (k < counts[l]) {
        lane_access[n++] = &g_trace.lanes[size_t(first + l) * kLaneCapacity + k];
      }
    }
    for (int i = 1; i < n && !diverged; ++i) {
      diverged = lane_access[i]->pc != lane_access[0]->pc ||
          lane_access[i]->buffer != lane_access[0]->buffer ||
          lane_access[i]->store != lane_access[0]->store;
    }
    if (diverged) {
      for (int i = 0; i < n; ++i) {
        divergent(*lane_access[i]);
      }
    } else {
      instruction(lane_access, n);
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    g_trace.lane_count[first + l] = 0;
  }
}

} // namespace

extern "C" {

// ---- Called by emulator_runtime.cpp (weak there).

void fm_trace_run_begin(int n_buffers, const char* const* names, void* const* data,
                        const size_t* bytes, uint32_t threads) {
  release();
  g_results.clear();
  g_sites.clear();
  if (n_buffers > kMaxBuffers || threads > kMaxThreads) {
    std::fprintf(stderr, "fm_trace: %d buffers / %u threads exceed the tracer's limits\n",
                 n_buffers, threads);
    g_trace.n_buffers = 0;
    return;
  }
  g_trace.n_buffers = n_buffers;
  g_trace.threads = threads;
  for (int b = 0; b < n_buffers; ++b) {
    g_trace.names[b] = names[b];
    g_trace.lo[b] = reinterpret_cast<uintptr_t>(data[b]);
    g_trace.len[b] = bytes[b];
    g_trace.reads[b] = static_cast<uint8_t*>(shared_zeroed(bytes[b]));
    g_trace.touched_words[b] = (bytes[b] + kPage * 64 - 1) / (kPage * 64);
    g_trace.touched[b] =
        static_cast<uint64_t*>(shared_zeroed(g_trace.touched_words[b] * 8));
  }
  g_trace.workers = static_cast<WorkerSlot*>(shared_zeroed(sizeof(WorkerSlot) * kMaxWorkers));
  // Private: each forked worker gets its own copy.
  g_trace.lanes = static_cast<Access*>(mmap(nullptr, sizeof(Access) * kLaneCapacity * threads,
                                            PROT_READ | PROT_WRITE,
                                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  g_trace.lane_count = static_cast<uint32_t*>(mmap(nullptr, sizeof(uint32_t) * threads,
                                                   PROT_READ | PROT_WRITE,
                                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  g_slot = &g_trace.workers[0];
}

void fm_trace_worker_begin(int worker) {
  g_slot = &g_trace.workers[worker % kMaxWorkers];
  g_trace.active = g_trace.n_buffers > 0;
}

bool fm_trace_skip_threadgroup(uint32_t x, uint32_t, uint32_t) {
  return x % g_sample_stride != 0;
}

void fm_trace_thread(uint32_t thread) {
  g_thread = thread;
}

void fm_trace_sync(uint32_t first_thread, uint32_t count) {
  if (!g_trace.active) {
    return;
  }
  for (uint32_t t = first_thread; t < first_thread + count; t += kLanes) {
    flush_group(t);
  }
}

void fm_trace_run_end() {
  if (!g_trace.workers) {
    return;
  }
  g_overflowed_lanes = g_lost_sites = 0;
  for (int b = 0; b < g_trace.n_buffers; ++b) {
    BufferResult r{};
    r.name = g_trace.names[b];
    r.bytes = g_trace.len[b];
    for (int w = 0; w < kMaxWorkers; ++w) {
      add(r.load, g_trace.workers[w].buffers[b][0]);
      add(r.store, g_trace.workers[w].buffers[b][1]);
    }
    for (size_t word = 0; word < g_trace.touched_words[b]; ++word) {
      for (int bit = 0; bit < 64; ++bit) {
        if (!(g_trace.touched[b][word] >> bit & 1)) {
          continue;
        }
        const size_t page = word * 64 + size_t(bit);
        const size_t end = std::min(g_trace.len[b], (page + 1) * kPage);
        for (size_t i = page * kPage; i < end; ++i) {
          ++r.read_histogram[g_trace.reads[b][i]];
        }
      }
    }
    for (int c = 1; c < 256; ++c) {
      r.distinct_read += r.read_histogram[c];
    }
    g_results.push_back(r);
  }
  for (int w = 0; w < kMaxWorkers; ++w) {
    const WorkerSlot& slot = g_trace.workers[w];
    g_overflowed_lanes += slot.overflowed_lanes;
    g_lost_sites += slot.lost_sites;
    for (const Site& s : slot.sites) {
      if (s.pc == 0) {
        continue;
      }
      // Offsets in the library holding the site (a kernel's own library,
      // which traffic.py symbolizes).
      Dl_info info{};
      uintptr_t base = 0;
      if (dladdr(reinterpret_cast<void*>(s.pc), &info)) {
        base = reinterpret_cast<uintptr_t>(info.dli_fbase);
      }
      Site rel = s;
      rel.pc = s.pc - base;
      auto it = std::find_if(g_sites.begin(), g_sites.end(), [&](const Site& o) {
        return o.pc == rel.pc && o.buffer == rel.buffer && o.store == rel.store;
      });
      if (it == g_sites.end()) {
        g_sites.push_back(rel);
      } else {
        add(it->stats, rel.stats);
      }
    }
  }
  release();
}

// ---- The results, for traffic.py (ctypes).

// Traces only threadgroups whose x (row block) is a multiple of `stride`;
// the others do not run at all. 1 runs everything.
void fm_trace_set_sample_stride(uint32_t stride) {
  g_sample_stride = stride ? stride : 1;
}

int fm_trace_buffer_count() {
  return int(g_results.size());
}

const char* fm_trace_buffer_name(int b) {
  return g_results.at(size_t(b)).name.c_str();
}

// out: bytes, distinct_read, then the 7 Stats fields of loads, then of stores.
void fm_trace_buffer_stats(int b, uint64_t* out) {
  const BufferResult& r = g_results.at(size_t(b));
  out[0] = r.bytes;
  out[1] = r.distinct_read;
  std::memcpy(out + 2, &r.load, sizeof(Stats));
  std::memcpy(out + 2 + 7, &r.store, sizeof(Stats));
}

// 256 counts: bytes of buffer b read by exactly c instructions (255: 255 or more).
void fm_trace_read_histogram(int b, uint64_t* out) {
  std::memcpy(out, g_results.at(size_t(b)).read_histogram, sizeof(uint64_t) * 256);
}

int fm_trace_site_count() {
  return int(g_sites.size());
}

// out: pc (offset in the library holding the site), buffer, store, then the 7 Stats fields.
void fm_trace_site(int i, uint64_t* out) {
  const Site& s = g_sites.at(size_t(i));
  out[0] = s.pc;
  out[1] = s.buffer;
  out[2] = s.store;
  std::memcpy(out + 3, &s.stats, sizeof(Stats));
}

// Lanes whose accesses between two syncs passed the tracer's capacity, and
// sites that did not fit its table: both must be 0 for a complete trace.
uint64_t fm_trace_overflowed_lanes() {
  return g_overflowed_lanes;
}

uint64_t fm_trace_lost_sites() {
  return g_lost_sites;
}

// ---- The hooks clang's trace-loads / trace-stores instrumentation calls.

void __sanitizer_cov_8bit_counters_init(char*, char*) {}

#define FM_TRACE_HOOKS(n)                                                   \
  void __sanitizer_cov_load##n(void* addr) {                                \
    record(addr, n, 0, reinterpret_cast<uintptr_t>(__builtin_return_address(0))); \
  }                                                                         \
  void __sanitizer_cov_store##n(void* addr) {                               \
    record(addr, n, 1, reinterpret_cast<uintptr_t>(__builtin_return_address(0))); \
  }
FM_TRACE_HOOKS(1)
FM_TRACE_HOOKS(2)
FM_TRACE_HOOKS(4)
FM_TRACE_HOOKS(8)
FM_TRACE_HOOKS(16)
#undef FM_TRACE_HOOKS

} // extern "C"
