// The emulator's scheduler: a block's threads are ucontext fibers on the launching thread.
#include "simt/simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace facekernels {
namespace simt {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

enum class State { kRunnable, kAtBarrier, kDone, kFailed };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  unsigned int index = 0;
  State state = State::kDone;
  // The barrier this thread waits at.
  const char* file = nullptr;
  int line = 0;
  const void* storage = nullptr;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time: the state below is the running block's
  std::mt19937_64 rng;
  uint64_t seed = 0;
  uint64_t launches = 0;  // since the seed was set
  int64_t total_launches = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  uint3 block_idx{0, 0, 0}, block_dim{0, 1, 1}, grid_dim{0, 1, 1};
  uint64_t block_serial = 0;  // distinct for every block run, so stale StorageUse is ignored
  uint64_t epoch = 0;         // barriers passed by the running block
  std::string failure;        // why the running block stopped
  std::string pending;        // the last launch's error, until a launch check reads it

  Runtime() {
    const char* env = std::getenv("FACEKERNELS_SIMT_SEED");
    if (env != nullptr && *env != '\0') {
      reseed(std::strtoull(env, nullptr, 10));
    } else {
      reseed(std::random_device{}());
      std::cerr << "facekernels_simt: seed " << seed << " (FACEKERNELS_SIMT_SEED=" << seed
                << " replays it)" << std::endl;
    }
  }

  void reseed(uint64_t s) {
    seed = s;
    rng.seed(s);
    launches = 0;
  }
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

Fiber& current_fiber() {
  Fiber* f = runtime().current;
  TORCH_CHECK(f != nullptr, "facekernels_simt: a device built-in was used outside a kernel");
  return *f;
}

void fiber_main() {
  Runtime& r = runtime();
  Fiber& f = *r.current;
  try {
    (*r.body)();
    f.state = State::kDone;
  } catch (const std::exception& e) {
    r.failure = std::string("thread threw: ") + e.what();
    f.state = State::kFailed;
  }
  // Returning resumes uc_link, the scheduler.
}

void prepare_fibers(Runtime& r, unsigned int threads) {
  if (r.fibers.size() < threads) {
    r.fibers.resize(threads);
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (unsigned int t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.stack == nullptr) {
      // A guard page below each stack turns an overflow into a fault, not corruption.
      void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(memory != MAP_FAILED, "facekernels_simt: cannot map a fiber stack");
      mprotect(memory, page, PROT_NONE);
      f.stack = static_cast<char*>(memory) + page;
    }
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, &fiber_main, 0);
    f.index = t;
    f.state = State::kRunnable;
  }
}

std::string site(const Fiber& f) {
  std::ostringstream out;
  out << f.file;
  if (f.line > 0) {
    out << ":" << f.line;
  }
  return out.str();
}

// Runs one block to its end; false with r.failure set when it went wrong.
bool run_block(Runtime& r, unsigned int block) {
  const unsigned int threads = r.block_dim.x;
  r.block_idx = {block, 0, 0};
  ++r.block_serial;
  r.epoch = 0;
  prepare_fibers(r, threads);
  std::vector<unsigned int> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  while (true) {
    std::shuffle(order.begin(), order.end(), r.rng);
    for (const unsigned int t : order) {
      Fiber& f = r.fibers[t];
      r.current = &f;
      swapcontext(&r.scheduler, &f.context);
      r.current = nullptr;
      if (f.state == State::kFailed) {
        r.failure = "thread " + std::to_string(t) + " of block " + std::to_string(block) + ": " +
                    r.failure;
        return false;
      }
    }
    order.clear();
    unsigned int done = 0;
    for (unsigned int t = 0; t < threads; ++t) {
      const Fiber& f = r.fibers[t];
      if (f.state == State::kAtBarrier) {
        order.push_back(t);
      } else {
        ++done;
      }
    }
    if (order.empty()) {
      return true;
    }
    const Fiber& first = r.fibers[order.front()];
    if (done > 0) {
      r.failure = "block " + std::to_string(block) + ": the barrier at " + site(first) +
                  " was reached by " + std::to_string(order.size()) + " of " +
                  std::to_string(threads) + " threads; the others had exited";
      return false;
    }
    for (const unsigned int t : order) {
      const Fiber& f = r.fibers[t];
      if (f.file != first.file || f.line != first.line || f.storage != first.storage) {
        r.failure = "block " + std::to_string(block) + ": thread " + std::to_string(first.index) +
                    " waits at the barrier at " + site(first) + ", thread " + std::to_string(t) +
                    " at another one, " + site(f);
        return false;
      }
    }
    ++r.epoch;
    for (const unsigned int t : order) {
      r.fibers[t].state = State::kRunnable;
    }
  }
}

}  // namespace

uint3 thread_index() { return {current_fiber().index, 0, 0}; }
uint3 block_index() { return runtime().block_idx; }
uint3 block_dim() { return runtime().block_dim; }
uint3 grid_dim() { return runtime().grid_dim; }

void barrier(const char* file, int line, const void* storage) {
  Fiber& f = current_fiber();
  f.state = State::kAtBarrier;
  f.file = file;
  f.line = line;
  f.storage = storage;
  swapcontext(&f.context, &runtime().scheduler);
}

void fail(const std::string& message) {
  Runtime& r = runtime();
  Fiber& f = current_fiber();
  r.failure = message;
  f.state = State::kFailed;
  swapcontext(&f.context, &r.scheduler);
  std::abort();  // a failed thread is never resumed
}

void random_bytes(void* out, size_t size) {
  Runtime& r = runtime();
  auto* bytes = static_cast<unsigned char*>(out);
  for (size_t i = 0; i < size; ++i) {
    bytes[i] = static_cast<unsigned char>(r.rng());
  }
}

void collective_enter(const char* collective, StorageUse& use, int block_dim_x) {
  Runtime& r = runtime();
  if (static_cast<int64_t>(r.block_dim.x) != block_dim_x) {
    fail(std::string(collective) + " is instantiated for " + std::to_string(block_dim_x) +
         " threads but the block has " + std::to_string(r.block_dim.x));
  }
  if (use.block == r.block_serial && use.epoch == r.epoch) {
    fail(std::string(collective) +
         ": its TempStorage is reused before a __syncthreads() since the last collective read it");
  }
}

void collective_barrier(StorageUse& use) {
  barrier("cub::BlockReduce (its internal barrier)", 0, &use);
  Runtime& r = runtime();
  use.block = r.block_serial;
  use.epoch = r.epoch;
}

cudaStream_t current_stream() { return nullptr; }

void launch(const char* kernel, int64_t grid, int64_t block, cudaStream_t stream,
            const std::function<void()>& body) {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  if (!r.pending.empty()) {
    const std::string error = r.pending;
    r.pending.clear();
    TORCH_CHECK(false, "facekernels_simt: ", kernel,
                " launched after an earlier launch failed unchecked (no C10_CUDA_KERNEL_LAUNCH_CHECK): ",
                error);
  }
  TORCH_CHECK(stream == current_stream(), "facekernels_simt: ", kernel,
              " launched on a stream other than the current one");
  if (grid < 1 || grid > kMaxGridX || block < 1 || block > kMaxThreadsPerBlock) {
    std::ostringstream out;
    out << "invalid configuration argument: " << kernel << "<<<" << grid << ", " << block
        << ">>> (blocks must lie in [1, 2^31 - 1], threads per block in [1, "
        << kMaxThreadsPerBlock << "])";
    r.pending = out.str();
    return;
  }
  const uint64_t launch_number = r.launches++;
  ++r.total_launches;
  r.grid_dim = {static_cast<unsigned int>(grid), 1, 1};
  r.block_dim = {static_cast<unsigned int>(block), 1, 1};
  r.body = &body;
  std::vector<unsigned int> blocks(static_cast<size_t>(grid));
  std::iota(blocks.begin(), blocks.end(), 0u);
  std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (const unsigned int b : blocks) {
    if (!run_block(r, b)) {
      r.body = nullptr;
      TORCH_CHECK(false, "facekernels_simt: ", kernel, "<<<", grid, ", ", block, ">>> (seed ",
                  r.seed, ", launch ", launch_number, " since): ", r.failure);
    }
  }
  r.body = nullptr;
}

void check_last_launch(const char* file, int line) {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  if (r.pending.empty()) {
    return;
  }
  const std::string error = r.pending;
  r.pending.clear();
  TORCH_CHECK(false, "CUDA error: ", error, " (checked at ", file, ":", line, ")");
}

int64_t launch_count() {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  return r.total_launches;
}

void set_seed(int64_t seed) {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  r.reseed(static_cast<uint64_t>(seed));
}

}  // namespace simt
}  // namespace facekernels
