"""Compiled CPU kernels for the search (optional; the eager code is the reference).

On a CPU the per-step certificate check of :class:`nws.search.Certificates` (every row's
movement against its radius, then the exact plane test of the rows past it) is ~40 eager
tensor operations, each a pass over memory, and :class:`nws.search.ScalarLookup` ~10. One C++
loop over the rows does the same work in a single pass, on every core (OpenMP). The searches
themselves (:class:`nws.search._Cells`: nearest entry, nearest bisectors, ``beyond``; and
:class:`nws.search.FullSearch`'s argmin) run one row at a time: 512 distances in eight-lane
vectors held in L1, instead of a (2048 x 512) product and ~8 passes over it. Compiled
against eager, kernel by kernel and per training step: docs/performance.md, NWS search
internals.

Built on first use with :mod:`torch.utils.cpp_extension` (needs a C++ compiler with OpenMP and
ninja; once, then loaded from torch's extension cache; its time: docs/performance.md, The
test suite and the tools' start-up), with AVX2/FMA where torch
reports them (a separately named build otherwise). If the build fails, or with
``NWS_CPU_KERNELS=0``, the eager code runs instead (warned once): both are exact, they differ
only in rounding inside the allowances, i.e. a row on the edge of its certificate may be
searched by one and not the other.

The build never hangs. Jobs sharing one cache (a cluster's home directory) build one at a
time under an ``fcntl.flock`` on ``<build dir>/nws.build.lock``, waited for at most
``$NWS_KERNELS_WAIT`` seconds (default 600). Older torch releases guard the build with a
``lock`` file (``FileBaton``) whose mere existence blocks, forever once a build was killed; on
those a ``lock`` file still present after the same bounded wait is reported as stale (delete
it). Past the wait the eager code runs, with a warning naming the file. The cache folder:
``$NWS_KERNELS_DIR`` (per job, e.g. on node-local disk; also ``benchmarks.run --kernels-dir``),
else ``$TORCH_EXTENSIONS_DIR``, else torch's default. ``flock`` across machines needs a file
system that supports it (see :mod:`benchmarks.core.lock`); a per-job folder avoids the question.
"""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

ENV = "NWS_CPU_KERNELS"
DIR_ENV = "NWS_KERNELS_DIR"
WAIT_ENV = "NWS_KERNELS_WAIT"
DEFAULT_WAIT_S = 600.0

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// float16 no larger than x: shrink, clamp, round to nearest (nws.search._down16).
static inline c10::Half down16(float x) {
  float y = x * (1.0f - 0x1p-10f) - 0x1p-24f;
  if (y > 65504.0f) y = 65504.0f;
  return c10::Half(y);
}

// nws.search.Certificates.update's check, one pass over the rows: a row that moved less than
// its radius keeps its entry; one past it is tested exactly on its planes and against beyond
// from its origin, and re-anchored in place if it passes. Returns the rows to search, ascending.
torch::Tensor recertify(torch::Tensor rows, torch::Tensor anchor, torch::Tensor origin,
                        torch::Tensor radius, torch::Tensor beyond, torch::Tensor index,
                        torch::Tensor planes, torch::Tensor pool, torch::Tensor inv_gap,
                        double eps_d, double shrink_d) {
  for (const auto& t : {rows, anchor, origin, radius, beyond, index, planes, pool, inv_gap})
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "recertify: contiguous CPU tensors");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && anchor.scalar_type() == at::kFloat &&
              pool.scalar_type() == at::kFloat && inv_gap.scalar_type() == at::kFloat &&
              origin.scalar_type() == at::kHalf && radius.scalar_type() == at::kHalf &&
              beyond.scalar_type() == at::kHalf && index.scalar_type() == at::kInt &&
              planes.scalar_type() == at::kShort, "recertify: unexpected dtypes");
  TORCH_CHECK(anchor.sizes() == rows.sizes() && origin.sizes() == rows.sizes() &&
              pool.size(1) == rows.size(1), "recertify: shapes do not match");
  const int64_t d = rows.size(0), dim = rows.size(1), n = pool.size(0), k = planes.size(1);
  const float eps = static_cast<float>(eps_d), shrink = static_cast<float>(shrink_d);
  const float allow = 2.0f * static_cast<float>(dim + 2) * eps;  // as in _recertify
  const float grow = 1.0f + 64.0f * eps;
  const float* w_all = rows.data_ptr<float>();
  float* a_all = anchor.data_ptr<float>();
  const c10::Half* o_all = origin.data_ptr<c10::Half>();
  c10::Half* r_all = radius.data_ptr<c10::Half>();
  const c10::Half* b_all = beyond.data_ptr<c10::Half>();
  const int32_t* idx = index.data_ptr<int32_t>();
  const int16_t* pl = planes.data_ptr<int16_t>();
  const float* p = pool.data_ptr<float>();
  const float* g = inv_gap.data_ptr<float>();
  const int64_t grain = 16384, chunks = (d + grain - 1) / grain;
  std::vector<std::vector<int64_t>> lost(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(d, (c + 1) * grain);
      for (int64_t r = c * grain; r < end; ++r) {
        const float* w = w_all + r * dim;
        float* a = a_all + r * dim;
        float moved = 0.0f;
        for (int64_t j = 0; j < dim; ++j) moved += (w[j] - a[j]) * (w[j] - a[j]);
        if (!(std::sqrt(moved) >= static_cast<float>(r_all[r]))) continue;
        const int32_t i = idx[r];
        const float* pi = p + static_cast<int64_t>(i) * dim;
        const c10::Half* o = o_all + r * dim;
        float near = 0.0f, drift = 0.0f;
        for (int64_t j = 0; j < dim; ++j) {
          near += (w[j] - pi[j]) * (w[j] - pi[j]);
          const float u = w[j] - static_cast<float>(o[j]);
          drift += u * u;
        }
        bool inside = true;
        float wall = std::numeric_limits<float>::infinity();
        for (int64_t q = 0; q < k; ++q) {
          const int64_t e = pl[r * k + q];
          if (e == i) continue;  // no plane
          const float* pe = p + e * dim;
          float other = 0.0f;
          for (int64_t j = 0; j < dim; ++j) other += (pe[j] - w[j]) * (pe[j] - w[j]);
          const float margin = other - near - allow * (other + near);
          if (!(margin > 0.0f)) inside = false;
          wall = std::min(wall, margin * g[static_cast<int64_t>(i) * n + e] * shrink);
        }
        const float left = static_cast<float>(b_all[r]) - std::sqrt(drift) * grow;
        if (!(inside && left > 0.0f)) {
          lost[c].push_back(r);
          continue;
        }
        std::copy(w, w + dim, a);
        r_all[r] = down16(std::min(wall, left * shrink));
      }
    }
  });
  int64_t total = 0;
  for (const auto& v : lost) total += static_cast<int64_t>(v.size());
  auto result = torch::empty({total}, torch::kLong);
  int64_t* out = result.data_ptr<int64_t>();
  for (const auto& v : lost) out = std::copy(v.begin(), v.end(), out);
  return result;
}
// Eight float32 lanes (GCC vector extensions: AVX2 where the build targets it, else SSE).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// The lowest position holding the minimum of x[0 .. 8 nb) (NaN never wins; none finite: 0).
static inline int64_t first_min(const v8f* x, int64_t nb, float* value) {
  const float inf = std::numeric_limits<float>::infinity();
  v8f low = {inf, inf, inf, inf, inf, inf, inf, inf};
  v8i at = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < nb; ++b) {  // per lane: the first block holding its minimum
    const v8i less = x[b] < low;
    low = less ? x[b] : low;
    at = less ? (v8i{} + static_cast<int32_t>(b)) : at;
  }
  float m = inf;
  int64_t best = 0;
  for (int l = 0; l < 8; ++l) {
    const int64_t j = static_cast<int64_t>(at[l]) * 8 + l;
    if (l == 0 || low[l] < m || (low[l] == m && j < best)) { m = low[l]; best = j; }
  }
  *value = m;
  return best;
}

// Expanded distances ||p||^2 - 2 w.p of row w to every entry (pool_aug: (dim + 1, n), as
// nws.search._expanded_pool) into dist; returns the nearest entry (ties: lowest index).
// DIM > 0: the row length known when compiled (3x3 kernels: 9), its values kept in registers.
template <int DIM>
static inline int64_t expanded(const float* w, int64_t dim, const v8f* cols, int64_t nb,
                               v8f* dist, float* nearest) {
  if (DIM > 0) dim = DIM;
  for (int64_t b = 0; b < nb; ++b) {
    v8f acc = cols[dim * nb + b];
    for (int64_t q = 0; q < dim; ++q) acc += w[q] * cols[q * nb + b];
    dist[b] = acc;
  }
  return first_min(dist, nb, nearest);
}

static inline int64_t expanded_any(const float* w, int64_t dim, const v8f* cols, int64_t nb,
                                   v8f* dist, float* nearest) {
  return dim == 9 ? expanded<9>(w, dim, cols, nb, dist, nearest)
                  : expanded<0>(w, dim, cols, nb, dist, nearest);
}

static void check_pool(const torch::Tensor& rows, const torch::Tensor& pool_aug) {
  for (const auto& t : {rows, pool_aug})
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat,
                "nws kernels: contiguous float32 CPU tensors");
  TORCH_CHECK(pool_aug.size(0) == rows.size(1) + 1 && pool_aug.size(1) % 8 == 0 &&
              reinterpret_cast<uintptr_t>(pool_aug.data_ptr()) % 32 == 0,
              "nws kernels: pool_aug must be (dim + 1, 8k), 32-byte aligned");
}

// nws.search._argmin_chunks: the nearest entry of every row (int32).
torch::Tensor nearest_entry(torch::Tensor rows, torch::Tensor pool_aug) {
  check_pool(rows, pool_aug);
  const int64_t m = rows.size(0), dim = rows.size(1), nb = pool_aug.size(1) / 8;
  auto index = torch::empty({m}, torch::kInt);
  const float* w = rows.data_ptr<float>();
  const v8f* cols = reinterpret_cast<const v8f*>(pool_aug.data_ptr<float>());
  int32_t* idx = index.data_ptr<int32_t>();
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    std::vector<v8f> dist(nb);
    float nearest;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t best = expanded_any(w + r * dim, dim, cols, nb, dist.data(), &nearest);
      idx[r] = static_cast<int32_t>(best);
    }
  });
  return index;
}

// nws.search._Cells.search: nearest entry, radius (distance to the nearest bisector), the k
// nearest bisectors' entries (the row's own entry: no plane) and beyond (distance to the
// next), as the eager code computes them but one row at a time in registers and L1.
std::vector<torch::Tensor> cell_search(torch::Tensor rows, torch::Tensor pool_aug,
                                       torch::Tensor inv_gap, double err_scale_d,
                                       double pool_max_sq, double shrink_d, int64_t k) {
  check_pool(rows, pool_aug);
  const int64_t m = rows.size(0), dim = rows.size(1), n = pool_aug.size(1), nb = n / 8;
  TORCH_CHECK(inv_gap.is_contiguous() && inv_gap.scalar_type() == at::kFloat &&
              inv_gap.size(0) == n && inv_gap.size(1) == n && k >= 1 && k < n &&
              reinterpret_cast<uintptr_t>(inv_gap.data_ptr()) % 32 == 0,
              "cell_search: inv_gap must be (n, n) float32, 32-byte aligned; 1 <= k < n");
  auto index = torch::empty({m}, torch::kInt);
  auto radius = torch::empty({m}, torch::kHalf);
  auto planes = torch::empty({m, k}, torch::kShort);
  auto beyond = torch::empty({m}, torch::kHalf);
  const float* w_all = rows.data_ptr<float>();
  const v8f* cols = reinterpret_cast<const v8f*>(pool_aug.data_ptr<float>());
  const float* g = inv_gap.data_ptr<float>();
  int32_t* idx = index.data_ptr<int32_t>();
  c10::Half* rad = radius.data_ptr<c10::Half>();
  int16_t* pl = planes.data_ptr<int16_t>();
  c10::Half* bey = beyond.data_ptr<c10::Half>();
  const float err_scale = static_cast<float>(err_scale_d);
  const float pool_sq3 = 3.0f * static_cast<float>(pool_max_sq);
  const float shrink = static_cast<float>(shrink_d);
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, m, 128, [&](int64_t r0, int64_t r1) {
    std::vector<v8f> buf(nb);
    v8f* dist = buf.data();
    float* flat = reinterpret_cast<float*>(dist);
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = w_all + r * dim;
      float norm = 0.0f, near;
      for (int64_t q = 0; q < dim; ++q) norm += w[q] * w[q];
      const int64_t best = expanded_any(w, dim, cols, nb, dist, &near);
      idx[r] = static_cast<int32_t>(best);
      // floor: the nearest expanded distance plus a bound on any one's rounding error
      const float floor = near + err_scale * (norm + pool_sq3);
      if (std::isnan(floor)) {  // a NaN row: radius 0, no planes (its movement is NaN too)
        rad[r] = bey[r] = c10::Half(0.0f);
        for (int64_t q = 0; q < k; ++q) pl[r * k + q] = static_cast<int16_t>(best);
        continue;
      }
      flat[best] = inf;
      const v8f* gb = reinterpret_cast<const v8f*>(g + best * n);
      for (int64_t b = 0; b < nb; ++b) dist[b] = (dist[b] - floor) * gb[b];  // bisectors
      for (int64_t q = 0; q < k; ++q) {
        float gap;
        const int64_t plane = first_min(dist, nb, &gap);
        if (q == 0) rad[r] = down16(std::max(gap, 0.0f) * shrink);
        pl[r * k + q] = static_cast<int16_t>(std::isinf(gap) ? best : plane);
        flat[plane] = inf;
      }
      float rest;
      first_min(dist, nb, &rest);
      bey[r] = down16(std::max(rest, 0.0f) * shrink);
    }
  });
  return {index, radius, planes, beyond};
}

// nws.search.ScalarLookup.update and kernels, one pass: each value's bin, the bin's lower
// cell and threshold (packed in 64 bits), its rank among the pool's distinct values (binary
// search among the float64 midpoints for bins holding several), and the selected value.
std::vector<torch::Tensor> scalar_lookup(torch::Tensor x, torch::Tensor table,
                                         torch::Tensor uniq, torch::Tensor mids,
                                         torch::Tensor canon, double low, double scale) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && table.is_contiguous() &&
              table.scalar_type() == at::kLong && uniq.is_contiguous() &&
              uniq.scalar_type() == at::kFloat && mids.is_contiguous() &&
              mids.scalar_type() == at::kDouble && canon.is_contiguous() &&
              canon.scalar_type() == at::kLong, "scalar_lookup: unexpected tensors");
  const int64_t m = x.numel(), bins = table.numel(), nm = mids.numel();
  auto rank = torch::empty({m}, torch::kInt);
  auto value = torch::empty({m}, torch::kFloat);
  const float* xs = x.data_ptr<float>();
  const int64_t* tab = table.data_ptr<int64_t>();
  const float* u = uniq.data_ptr<float>();
  const double* md = mids.data_ptr<double>();
  const int64_t* cn = canon.data_ptr<int64_t>();
  int32_t* rk = rank.data_ptr<int32_t>();
  float* out = value.data_ptr<float>();
  const float lowf = static_cast<float>(low), scalef = static_cast<float>(scale);
  const float top = static_cast<float>(bins - 1);
  at::parallel_for(0, m, 32768, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float v = xs[r];
      float f = (v - lowf) * scalef;  // as the eager code: float32, NaN to bin 0, clamped
      f = std::isnan(f) ? 0.0f : std::min(std::max(f, 0.0f), top);
      const uint64_t e = static_cast<uint64_t>(tab[static_cast<int64_t>(f)]);
      int32_t cell = static_cast<int32_t>(static_cast<uint32_t>(e & 0xffffffffu));
      const uint32_t bits = static_cast<uint32_t>(e >> 32);
      float threshold;
      std::memcpy(&threshold, &bits, sizeof threshold);
      if (cell >= 0) {
        cell += v >= threshold ? 1 : 0;
      } else {  // several midpoints in this bin: exact rank (nws.search._nearest_rank)
        const double xd = static_cast<double>(v);
        const int64_t below = std::lower_bound(md, md + nm, xd) - md;
        const int64_t upto = std::upper_bound(md, md + nm, xd) - md;
        cell = static_cast<int32_t>(cn[upto] < cn[below] ? upto : below);
      }
      rk[r] = cell;
      out[r] = u[cell];
    }
  });
  return {rank, value};
}
"""

_loaded: dict[str, ModuleType | None] = {}


def kernels_for(x: torch.Tensor, enabled: bool = True) -> ModuleType | None:
    """The compiled kernels where they apply to ``x`` (float32 on CPU, ``enabled``), else
    None: disabled by ``NWS_CPU_KERNELS=0``, not buildable, or another device or dtype."""
    if not (enabled and x.device.type == "cpu" and x.dtype == torch.float32):
        return None
    return compiled()


def compiled() -> ModuleType | None:
    """The compiled kernels, or None (disabled by ``NWS_CPU_KERNELS=0``, or not buildable)."""
    if "module" not in _loaded:
        _loaded["module"] = _build()
    return _loaded["module"]


# Instruction sets torch itself found on this CPU -> extra compiler flags. The build is named
# by its set, so a cache shared by machines with different CPUs (a cluster's home directory)
# never hands an AVX2 build to a CPU without AVX2. GCC's target_clones would keep one build,
# but its vector code was much slower (the helpers were not inlined into the clones;
# measured: docs/performance.md, NWS search internals).
_ISA_FLAGS = {"AVX2": ("avx2", ["-mavx2", "-mfma"]), "AVX512": ("avx2", ["-mavx2", "-mfma"])}


class BuildWaitTimeout(RuntimeError):
    """Another build held the cache past the bounded wait, or torch's lock file is stale."""


def build_directory(name: str) -> Path:
    """Where extension ``name`` is built and cached (see the module docs)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser() / name
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except (ImportError, TypeError):  # a torch without it: its documented default
        root = os.environ.get("TORCH_EXTENSIONS_DIR",
                              Path.home() / ".cache" / "torch_extensions")
        return Path(root) / name


def _torch_lock_file_blocks() -> bool:
    """Whether this torch waits while its build folder's ``lock`` file merely exists (its old
    ``FileBaton``), rather than holding an OS lock the kernel releases when a build dies."""
    from torch.utils import cpp_extension

    return not hasattr(cpp_extension, "FileLock")


def _wait_for_build(folder: Path, wait_s: float) -> int:
    """Hold the nws build lock of ``folder`` (returns its fd) within ``wait_s`` seconds, and
    make sure torch's own lock will not block; raises :class:`BuildWaitTimeout`."""
    deadline = time.monotonic() + wait_s
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "nws.build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BuildWaitTimeout(
                    f"another process has been building in {folder} for over {wait_s:.0f} s "
                    f"({WAIT_ENV} sets the wait; {DIR_ENV} gives a job its own folder)"
                ) from None
            time.sleep(0.1)
    stale = folder / "lock"
    while _torch_lock_file_blocks() and stale.exists():
        if time.monotonic() >= deadline:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise BuildWaitTimeout(
                f"torch's build lock {stale} has existed for over {wait_s:.0f} s: left by a "
                f"killed build (this torch waits forever on it); delete it if no build runs")
        time.sleep(0.1)
    return fd


def _build() -> ModuleType | None:
    if os.environ.get(ENV, "1") == "0":
        return None
    fd = None
    try:
        from torch.utils.cpp_extension import load_inline

        isa, flags = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ("base", []))
        name = f"nws_cpu_kernels_{isa}"
        folder = build_directory(name)
        fd = _wait_for_build(folder, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
        return load_inline(name, cpp_sources=[_SOURCE],
                           functions=["recertify", "scalar_lookup", "nearest_entry",
                                      "cell_search"],
                           extra_cflags=["-O3", "-fopenmp", *flags],
                           extra_ldflags=["-fopenmp"], build_directory=str(folder))
    except Exception as err:  # no compiler, no ninja, no OpenMP: the eager code still works
        warnings.warn(f"NWS: compiled CPU kernels unavailable ({type(err).__name__}: "
                      f"{str(err)[:300]}); the eager search runs instead (same results, "
                      f"slower). Set {ENV}=0 to skip the build.", stacklevel=2)
        return None
    finally:
        if fd is not None:
            os.close(fd)  # releases the build lock
