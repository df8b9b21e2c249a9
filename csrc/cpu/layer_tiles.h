// Tiles of [B, K, P, N] tensors (K channels, rows (b, p) of N contiguous columns) for the CPU
// kernels that run GEMMs over the channels of a block of columns (separable_layer_project.cpp):
// the cut into tiles, packing a tile into a dense float32 (float64) buffer and back into the
// tensor's dtype (row_ops.h's VecIO), prefetching the next tile, and a task loop that balances
// the threads.
//
// Include vec_isa.h before this header (it selects at::vec's AVX-512/AVX2 implementation).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "row_ops.h"

namespace mvit2::tiles {

// The rows (b, p) of a [B, K, P, N] tensor are its N-contiguous lines, P * N elements apart per
// channel k. A tile is `rows` consecutive rows (row = b * P + p) x a block of `cols` columns
// from n0, each row padded to `seg` (a whole number of vectors) in the tile's own layout
// [K][rows * seg]: a vector never straddles two rows, so its ctx is one scalar.
struct Tile {
  int64_t row0, rows, n0, cols, seg;
  int64_t width() const { return rows * seg; }
};

// The cut of the [B * P, N] plane into tiles of about kTileColumns columns: blocks of one row when
// N is wide, several whole rows when N is narrow (N = 16 or 64 in MobileViTv2's later stages),
// but never fewer than kMinTasks tasks where the rows allow it, to feed both cores at B = 1. A
// function of the shape alone: results do not depend on the thread count.
struct Tiling {
  int64_t width;                // vector width: tile rows are padded to a multiple of it
  int64_t BP, N;                // rows (b, p) and columns of the plane
  int64_t rows, blocks, cols;   // rows per tile, column blocks per row, columns per block
  int64_t tasks;

  Tiling(int64_t B, int64_t P, int64_t N_, int64_t vector_width)
      : width(vector_width), BP(B * P), N(N_) {
    constexpr int64_t kTileColumns = 128, kMinTasks = 8;  // 64 to 192 columns measured alike
    if (round_up(N) >= kTileColumns) {
      rows = 1;
      blocks = (N + kTileColumns - 1) / kTileColumns;
      cols = round_up((N + blocks - 1) / blocks);
    } else {
      const int64_t most = (BP + kMinTasks - 1) / kMinTasks;
      rows = std::max<int64_t>(1, std::min(kTileColumns / round_up(N), most));
      blocks = 1;
      cols = N;
    }
    tasks = (BP + rows - 1) / rows * blocks;
  }
  int64_t round_up(int64_t n) const { return (n + width - 1) / width * width; }
  // The largest tile's width, for buffers.
  int64_t max_width() const { return rows * round_up(cols); }

  Tile tile(int64_t task) const {
    const int64_t row0 = task / blocks * rows, n0 = task % blocks * cols;
    const int64_t c = std::min(cols, N - n0);
    return {row0, std::min(rows, BP - row0), n0, c, round_up(c)};
  }
};

// Offset of row `row` (= b * P + p), column 0, channel 0 in a [B, K, P, N] tensor.
inline int64_t row_offset(int64_t row, int64_t K, int64_t P, int64_t N) {
  return (row / P) * K * P * N + (row % P) * N;
}

// tile[k][r * seg + j] = src row (row0 + r), channel k, column n0 + j, as acc_t, for j < cols;
// zeros up to seg. Dense tiles also keep the GEMM off the source's layout, whose rows lie
// P * N elements apart (4 KiB for the common shapes) and would share a few L1 sets.
template <typename scalar_t, typename acc_t>
void pack_tile(const scalar_t* src, int64_t K, int64_t P, int64_t N, const Tile& t, acc_t* tile) {
  using IO = VecIO<scalar_t>;
  for (int64_t r = 0; r < t.rows; ++r) {
    const scalar_t* row = src + row_offset(t.row0 + r, K, P, N) + t.n0;
    for (int64_t k = 0; k < K; ++k) {
      acc_t* dst = tile + k * t.width() + r * t.seg;
      for (int64_t j = 0; j < t.seg; j += IO::W) {
        IO::load(row + k * P * N + j, std::min(IO::W, t.cols - j)).store(dst + j);
      }
    }
  }
}

// The inverse of pack_tile, into dst in its dtype; stream: bypass the cache where aligned
// (measured at B=32, D=128, P=4, N=256: 4-10% faster).
template <typename scalar_t, typename acc_t>
void unpack_tile(const acc_t* tile, const Tile& t, int64_t K, int64_t P, int64_t N, scalar_t* dst,
                 bool stream) {
  using IO = VecIO<scalar_t>;
  for (int64_t r = 0; r < t.rows; ++r) {
    scalar_t* row = dst + row_offset(t.row0 + r, K, P, N) + t.n0;
    for (int64_t k = 0; k < K; ++k) {
      scalar_t* out = row + k * P * N;
      const acc_t* src = tile + k * t.width() + r * t.seg;
      const bool st = stream && aligned_to(out, IO::kStreamAlign);
      for (int64_t j = 0; j < t.seg; j += IO::W) {
        IO::put(st, out + j, IO::Vec::loadu(src + j), std::min(IO::W, t.cols - j));
      }
    }
  }
}

// Prefetches the source lines of a coming tile into L2, one cache line per next(): called from
// the epilogues of the tile before, the loads overlap its GEMMs instead of stalling the next
// pack_tile (the rows are one 4 KiB page apart, which the hardware prefetchers do not cross).
// Measured at B=32, D=128, P=4, N=256: the forward 8% faster.
class TilePrefetcher {
 public:
  template <typename scalar_t>
  TilePrefetcher(const scalar_t* src, int64_t K, int64_t P, int64_t N, const Tile& t)
      : src_(reinterpret_cast<const char*>(src)), K_(K), P_(P), N_(N), t_(t),
        elem_(sizeof(scalar_t)), bytes_(t.cols * elem_) {
    start_row();
  }
  void next() {
    if (r_ >= t_.rows) return;
#if defined(__GNUC__)
    __builtin_prefetch(line_ + at_, 0, 2);
#endif
    if ((at_ += 64) < bytes_) return;
    at_ = 0;
    if (++k_ < K_) {
      line_ += P_ * N_ * elem_;
    } else {
      k_ = 0;
      ++r_;
      start_row();
    }
  }

 private:
  void start_row() {
    if (r_ < t_.rows) line_ = src_ + (row_offset(t_.row0 + r_, K_, P_, N_) + t_.n0) * elem_;
  }
  const char* src_;
  const char* line_ = nullptr;
  int64_t K_, P_, N_;
  Tile t_;
  int64_t elem_, bytes_, r_ = 0, k_ = 0, at_ = 0;
};

// Runs body(scratch, task, next) for every task in [0, tasks) on the intra-op threads, handing the
// tasks out one at a time: on cores shared with other work, a thread that runs takes over the
// tasks of one that waits, where at::parallel_for's fixed shares would wait for it. No result
// depends on which thread runs a task. `next` is the task the thread runs after this one (-1 if
// none), claimed in advance so that its data can be prefetched; scratch = make_scratch(), once
// per thread.
template <typename MakeScratch, typename Body>
void run_tasks(int64_t tasks, const MakeScratch& make_scratch, const Body& body) {
  std::atomic<int64_t> counter{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t task = counter++; task < tasks;) {
      const int64_t next = counter++;
      body(scratch, task, next < tasks ? next : -1);
      task = next;
    }
    fence_streaming_stores();
  });
}

}  // namespace mvit2::tiles
