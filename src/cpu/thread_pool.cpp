#include "cpu/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/env.h"

namespace qmoe::cpu {
namespace {

int default_threads() {
  if (const int n = env_int("QMOE_NUM_THREADS"); n > 0) return n;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

thread_local bool t_inside_pool = false;
thread_local int t_worker = 0;

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  void run(int64_t n, RawBody body, void* ctx) {
    std::lock_guard<std::mutex> one_job(job_mu_);  // one job at a time
    {
      std::lock_guard<std::mutex> lock(mu_);
      body_ = body;
      ctx_ = ctx;
      n_ = n;
      next_.store(0);
      active_.store(int(workers_.size()));
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work(0);
    spin_until([this] { return active_.load() == 0; });
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_.load() == 0; });
    body_ = nullptr;
  }

 private:
  void work(int worker) {
    const bool was_inside = t_inside_pool;
    const int was_worker = t_worker;
    t_inside_pool = true;
    t_worker = worker;
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) body_(ctx_, i, worker);
    t_inside_pool = was_inside;
    t_worker = was_worker;
  }
  // Waits a little with the core before sleeping: a decode call lasts tens of
  // microseconds, about what waking a sleeping thread through the kernel costs
  // (seen: a 2-thread call of a tiny product took ~45 us more than 1 thread).
  template <class Ready>
  static void spin_until(Ready ready) {
    for (int i = 0; i < kSpins && !ready(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load() != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
      }
      work(id);
      if (active_.fetch_sub(1) == 1) {
        { std::lock_guard<std::mutex> lock(mu_); }  // the caller is waiting, or will see 0
        done_.notify_one();
      }
    }
  }

  static constexpr int kSpins = 4000;  // ~50-100 us of pause instructions

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  RawBody body_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
};

std::mutex g_pool_mu;
std::unique_ptr<Pool> g_pool;

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<Pool>(default_threads());
  return *g_pool;
}

void call_function(void* ctx, int64_t i, int /*worker*/) {
  (*static_cast<const std::function<void(int64_t)>*>(ctx))(i);
}

}  // namespace

void parallel_for_raw(int64_t n, RawBody body, void* ctx) {
  if (n <= 0) return;
  if (n == 1 || t_inside_pool) {
    for (int64_t i = 0; i < n; ++i) body(ctx, i, t_worker);
    return;
  }
  Pool& p = pool();
  if (p.size() == 1) {
    for (int64_t i = 0; i < n; ++i) body(ctx, i, 0);
    return;
  }
  p.run(n, body, ctx);
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& body) {
  parallel_for_raw(n, call_function, const_cast<std::function<void(int64_t)>*>(&body));
}

int pool_size() { return pool().size(); }

void set_pool_size(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.reset();  // joins the old workers
  g_pool = std::make_unique<Pool>(n > 0 ? n : default_threads());
}

}  // namespace qmoe::cpu
