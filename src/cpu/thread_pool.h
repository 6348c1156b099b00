// A small fork-join thread pool owned by qmoe.
//
// Why not OpenMP: PyTorch wheels bundle their own OpenMP runtime, and two
// runtimes in one process oversubscribe the cores and can spin against each
// other. These workers sleep on a condition variable between calls, so they
// cost nothing while PyTorch's pool runs, and the pool size is qmoe's own
// setting (QMOE_NUM_THREADS or qmoe::set_num_threads).
#pragma once

#include <cstdint>
#include <functional>

namespace qmoe::cpu {

// Calls body(i) for every i in [0, n), spread over the pool's threads
// (the calling thread takes part). Items are claimed one at a time, so give
// it coarse items. A call from inside a body runs serially.
void parallel_for(int64_t n, const std::function<void(int64_t)>& body);

// The same with a plain function pointer (no std::function: the SIMD files
// compiled with -mavx512* use this so that no inline library template is
// instantiated there with wider instructions than the rest of the binary).
// `worker` is in [0, pool_size()) and names the thread running the item, so
// bodies can index per-thread scratch. A nested call runs serially with the
// caller's worker id.
using RawBody = void (*)(void* ctx, int64_t item, int worker);
void parallel_for_raw(int64_t n, RawBody body, void* ctx);

int pool_size();
void set_pool_size(int n);  // n < 1: default

}  // namespace qmoe::cpu
