#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace fused_moe::cpu {

namespace {

int default_threads() {
  if (const char* env = std::getenv("FUSED_MOE_NUM_THREADS")) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || n < 1 || n > 4096) {
      throw std::invalid_argument(
          "FUSED_MOE_NUM_THREADS must be a positive integer, got '" +
          std::string(env) + "'");
    }
    return static_cast<int>(n);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// One batch of work shared by all participating threads.
//
// The tasks are cut into one contiguous range per thread. Each thread walks
// its own range from the front, so consecutive tasks (consecutive weight
// rows) stay on one core and its prefetchers see one long stream; a thread
// that runs out takes tasks from the back of the other ranges, so a core
// slowed by something else does not hold up the call. At one MiniMax token
// A+B took about 2% less time than with tasks handed out one by one.
class Job {
 public:
  Job(const std::function<void(int)>& fn, int n, int parts)
      : fn_(fn), parts_(parts), ranges_(new std::atomic<uint64_t>[parts]) {
    for (int p = 0; p < parts; ++p) {
      ranges_[p] = pack(static_cast<int64_t>(n) * p / parts,
                        static_cast<int64_t>(n) * (p + 1) / parts);
    }
  }

  // Called once by each of the `parts` participating threads.
  void run() {
    const int me = next_part_.fetch_add(1);
    for (int k = 0; k < parts_ && !stop_; ++k) {
      const int p = (me + k) % parts_;
      for (int i; !stop_ && take(p, /*front=*/k == 0, i);) {
        try {
          fn_(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex_);
          if (!error_) {
            error_ = std::current_exception();
          }
          stop_ = true; // stop handing out work
        }
      }
    }
  }

  const std::exception_ptr& error() const {
    return error_;
  }

 private:
  // A range [begin, end) as one word, so that a take is one compare-and-swap.
  static uint64_t pack(int64_t begin, int64_t end) {
    return static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(end);
  }

  // Takes the first (owner) or last (others) task left in range p.
  bool take(int p, bool front, int& task) {
    uint64_t r = ranges_[p].load();
    for (;;) {
      const uint32_t begin = r >> 32, end = r & 0xFFFFFFFFu;
      if (begin >= end) {
        return false;
      }
      const uint64_t rest = front ? pack(begin + 1, end) : pack(begin, end - 1);
      if (ranges_[p].compare_exchange_weak(r, rest)) {
        task = static_cast<int>(front ? begin : end - 1);
        return true;
      }
    }
  }

  const std::function<void(int)>& fn_;
  const int parts_;
  std::unique_ptr<std::atomic<uint64_t>[]> ranges_;
  std::atomic<int> next_part_{0};
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;
  std::mutex error_mutex_;
};

// Lets a spinning thread yield its core's resources while it waits.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long a thread spins for the next job (worker) or for the workers to
// finish (caller) before it sleeps. A layer calls parallel_for a few times,
// microseconds apart; waking a sleeping thread costs tens of microseconds.
constexpr std::chrono::microseconds kSpin{50};

// Spins until done() or kSpin has passed; returns done().
template <typename Done>
bool spin_until(Done done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1; !done(); ++i) {
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) {
      return done();
    }
  }
  return true;
}

class Pool {
 public:
  ~Pool() {
    resize(0);
  }

  void resize(int workers) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) {
      t.join();
    }
    threads_.clear();
    stop_ = false;
    // Workers start from the current generation, read here rather than in
    // the new thread, which might only run after the next job is posted.
    for (int i = 0; i < workers; ++i) {
      threads_.emplace_back([this, g = generation_.load()] { worker(g); });
    }
  }

  int workers() const {
    return static_cast<int>(threads_.size());
  }

  void run(Job& job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = workers();
      ++generation_;
    }
    wake_.notify_all();
    job.run();
    if (!spin_until([this] { return active_.load() == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      finished_.wait(lock, [this] { return active_.load() == 0; });
    }
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = nullptr;
  }

 private:
  void worker(uint64_t seen) {
    for (;;) {
      spin_until([&] { return stop_.load() || generation_.load() != seen; });
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
        if (stop_) {
          return;
        }
        seen = generation_;
        job = job_;
      }
      job->run();
      if (active_.fetch_sub(1) == 1) {
        // Under the mutex, so a caller between its check and its wait
        // cannot miss this.
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  Job* job_ = nullptr; // guarded by mutex_
  std::atomic<uint64_t> generation_{0}; // written under mutex_
  std::atomic<int> active_{0};
  std::atomic<bool> stop_{false}; // written under mutex_
};

std::mutex& config_mutex() {
  static std::mutex m;
  return m;
}

int& requested_threads() {
  static int n = default_threads();
  return n;
}

Pool& pool() {
  static Pool p;
  return p;
}

} // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(config_mutex());
  return requested_threads();
}

void set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument(
        "set_num_threads: n must be >= 1, got " + std::to_string(n));
  }
  std::lock_guard<std::mutex> lock(config_mutex());
  requested_threads() = n;
}

void parallel_for(int n, const std::function<void(int)>& fn) {
  if (n <= 0) {
    return;
  }
  // One parallel_for at a time: MLX may evaluate on several CPU streams.
  std::lock_guard<std::mutex> lock(config_mutex());
  const int threads = requested_threads();
  const int parts = n == 1 ? 1 : threads;
  Job job(fn, n, parts);
  if (parts == 1) {
    job.run();
  } else {
    // The pool keeps requested - 1 workers; it is rebuilt only when the
    // requested count changes, never per call. Every worker and the caller
    // each run the job once.
    Pool& p = pool();
    if (p.workers() != threads - 1) {
      p.resize(threads - 1);
    }
    p.run(job);
  }
  if (job.error()) {
    std::rethrow_exception(job.error());
  }
}

} // namespace fused_moe::cpu
