#include "cpu/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qmoe::cpu {
namespace {

int default_threads() {
  if (const char* env = std::getenv("QMOE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

thread_local bool t_inside_pool = false;

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
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

  void run(int64_t n, const std::function<void(int64_t)>& body) {
    std::lock_guard<std::mutex> one_job(job_mu_);  // one job at a time
    {
      std::lock_guard<std::mutex> lock(mu_);
      body_ = &body;
      n_ = n;
      next_.store(0);
      active_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_ == 0; });
    body_ = nullptr;
  }

 private:
  void work() {
    const bool was_inside = t_inside_pool;
    t_inside_pool = true;
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*body_)(i);
    t_inside_pool = was_inside;
  }
  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex g_pool_mu;
std::unique_ptr<Pool> g_pool;

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<Pool>(default_threads());
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  if (n == 1 || t_inside_pool) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  Pool& p = pool();
  if (p.size() == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  p.run(n, body);
}

int pool_size() { return pool().size(); }

void set_pool_size(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.reset();  // joins the old workers
  g_pool = std::make_unique<Pool>(n > 0 ? n : default_threads());
}

}  // namespace qmoe::cpu
