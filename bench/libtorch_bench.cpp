// The cost of the LibTorch boundary: the time one training step takes when
// libimml runs inside a LibTorch graph (examples/libtorch-host/imml_torch.h)
// against the same step through the C API alone, on the shapes of
// doc/PERFORMANCE.md (tiny, small and paper by default; large-batch on
// request).
//
// Three steps on three models of the same configuration and inputs, timed
// in turn within each repetition (so that a burst of load on the shared
// machine hits all three), by the wall clock and by the calling thread's
// CPU clock (which, with --threads 1, holds the whole step and does not
// count time other processes hold the core); reported per clock: the C
// step's median and the median over the repetitions of each boundary
// step's excess over the C step of the same repetition:
//
//  C       imml_forward(TRAIN), imml_backward(dh), imml_commit,
//          imml_optim_step: what bench/imml-bench times;
//  torch   the same through the autograd Function: h_m are leaf tensors
//          that require a gradient, the Function's forward, loss.backward()
//          (which runs imml_backward and leaves dL/dh_m in h_m.grad), then
//          imml_commit and imml_optim_step;
//  torch+opt  as torch, but libimml's parameters are LibTorch tensors over
//          the library's memory (torch::from_blob on imml_param_get, the
//          gradients bound the same way) updated by torch::optim::AdamW
//          (same hyper-parameters) instead of imml_optim_step.
//
// The encoders, which are the host's own cost in either case, are left out:
// h_m are inputs.  After the timed steps the program checks that the three
// models hold the same parameters (all three ran the same AdamW steps on
// the same data; only rounding may differ) and that torch AdamW left the
// gradients bound to the library's memory.
//
// usage: imml-bench-libtorch [--shape NAME] [--reps N] [--threads N]
#define IMML_EXPERIMENTAL // imml_threads_set
#include "imml_torch.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

namespace {

struct Shape {
  const char *name;
  int B, d0, d1, H, k, C, J;
};

// bench/bench.c's shapes with M = 2, and a tiny one whose step is nearly
// all fixed costs: there the boundary's added time is its own overhead.
const Shape kShapes[] = {
    {"tiny", 8, 4, 4, 4, 4, 2, 8},
    {"small", 64, 216, 6, 256, 128, 10, 256},
    {"paper", 64, 768, 6144, 512, 256, 101, 256},
    {"large-batch", 512, 768, 2048, 512, 256, 101, 256},
};

double now() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU time of the calling thread: with one thread for OpenBLAS and
// LibTorch every step runs on it, and unlike wall time this does not count
// the time other processes of a shared machine hold the core.
double thread_cpu() {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) +
         1e-9 * static_cast<double>(ts.tv_nsec);
}

// Wall and thread CPU time of one call.
struct Times {
  double wall, cpu;
};
template <class F> Times timed(F f) {
  const double w = now(), c = thread_cpu();
  f();
  return {now() - w, thread_cpu() - c};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

imml_config make_config(const Shape &s, const int *dims) {
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = 2;
  cfg.dims = dims;
  cfg.hidden_dim = s.H;
  cfg.knowledge_dim = s.k;
  cfg.n_classes = s.C;
  cfg.max_batch = s.B;
  cfg.dict_size = s.J;
  cfg.predominant = 0; // no warm-up: every step runs the whole method
  return cfg;
}

// Largest |a - b| over every parameter of two models (param views).
double max_param_diff(imml_torch::Model &a, imml_torch::Model &b) {
  double d = 0.0;
  const int n = imml_param_count(a.get());
  for (int i = 0; i < n; i++) {
    imml_param_view va, vb;
    a.check(imml_param_get(a.get(), i, &va), "imml_param_get");
    b.check(imml_param_get(b.get(), i, &vb), "imml_param_get");
    for (size_t j = 0; j < static_cast<size_t>(va.rows) * va.cols; j++)
      d = std::max(d, std::fabs(static_cast<double>(va.data[j]) - vb.data[j]));
  }
  return d;
}

void run_shape(const Shape &s, int reps, int threads) {
  const int dims[2] = {s.d0, s.d1};
  const imml_config cfg = make_config(s, dims);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  imml_torch::Model mc(cfg), mt(cfg), mo(cfg);
  mc.optim_setup(oc);
  mt.optim_setup(oc);

  // torch+opt: libimml's parameters and gradients as tensors over its
  // memory, under LibTorch's AdamW.
  std::vector<torch::Tensor> params;
  for (int i = 0; i < imml_param_count(mo.get()); i++) {
    imml_param_view v;
    mo.check(imml_param_get(mo.get(), i, &v), "imml_param_get");
    torch::Tensor p = torch::from_blob(v.data, {v.rows, v.cols});
    p.requires_grad_(true);
    p.mutable_grad() = torch::from_blob(v.grad, {v.rows, v.cols});
    params.push_back(p);
  }
  torch::optim::AdamW topt(params, torch::optim::AdamWOptions(oc.lr)
                                       .betas({oc.beta1, oc.beta2})
                                       .eps(oc.eps)
                                       .weight_decay(oc.weight_decay));

  // The same inputs for all three.
  torch::manual_seed(1);
  const torch::Tensor x0 = torch::rand({s.B, s.d0}) * 2 - 1;
  const torch::Tensor x1 = torch::rand({s.B, s.d1}) * 2 - 1;
  const torch::Tensor y = torch::arange(s.B) % s.C;
  std::vector<int> yi(static_cast<size_t>(s.B));
  for (int i = 0; i < s.B; i++)
    yi[static_cast<size_t>(i)] = i % s.C;
  std::vector<float> dx0(static_cast<size_t>(s.B) * s.d0),
      dx1(static_cast<size_t>(s.B) * s.d1);
  const float *xc[2] = {x0.data_ptr<float>(), x1.data_ptr<float>()};
  float *dxc[2] = {dx0.data(), dx1.data()};
  std::vector<float> logits(static_cast<size_t>(s.B) * s.C);
  std::vector<torch::Tensor> h = {x0.clone().requires_grad_(true),
                                  x1.clone().requires_grad_(true)};

  auto c_step = [&] {
    mc.check(imml_forward(mc.get(), IMML_MODE_TRAIN, s.B, xc, yi.data(),
                          logits.data(), nullptr),
             "imml_forward");
    mc.check(imml_backward(mc.get(), dxc), "imml_backward");
    mc.commit();
    mc.optim_step();
  };
  auto torch_step = [&](imml_torch::Model &m, bool torch_opt) {
    for (torch::Tensor &t : h)
      t.mutable_grad() = torch::Tensor(); // as an encoder's would be: fresh
    imml_torch::TrainOutput out = imml_torch::train_forward(m, y, h);
    out.loss.backward();
    m.commit();
    if (torch_opt) {
      topt.step();
      topt.zero_grad();
    } else {
      m.optim_step();
    }
  };

  // The first steps fill the dictionary, so the timed ones attend over J.
  const int warm = s.J / s.B + 3;
  std::vector<Times> tc, tt, to;
  for (int r = -warm; r < reps; r++) {
    const Times a = timed(c_step);
    const Times b = timed([&] { torch_step(mt, false); });
    const Times c = timed([&] { torch_step(mo, true); });
    if (r >= 0) {
      tc.push_back(a);
      tt.push_back(b);
      to.push_back(c);
    }
  }
  // The three ran the same steps: same parameters up to rounding, and the
  // gradients are still the library's (zeroed in place by zero_grad).
  const double d_torch = max_param_diff(mc, mt);
  const double d_opt = max_param_diff(mc, mo);
  imml_param_view v0;
  mo.check(imml_param_get(mo.get(), 0, &v0), "imml_param_get");
  if (params[0].grad().data_ptr<float>() != v0.grad) {
    std::fprintf(stderr, "imml-bench-libtorch: torch AdamW replaced the "
                         "gradient tensor bound to libimml's memory\n");
    std::exit(1);
  }
  if (d_torch != 0.0 || !(d_opt < 1e-3)) {
    std::fprintf(stderr,
                 "imml-bench-libtorch: %s: the models diverged: max "
                 "|param difference| %.3g (torch), %.3g (torch AdamW)\n",
                 s.name, d_torch, d_opt);
    std::exit(1);
  }
  // Per clock: the C step's median, and the medians over the repetitions
  // of each boundary step minus the C step of the same repetition.
  for (int clock = 0; clock < 2; clock++) {
    std::vector<double> c, dt, dopt;
    for (size_t r = 0; r < tc.size(); r++) {
      const double base = clock ? tc[r].cpu : tc[r].wall;
      c.push_back(base);
      dt.push_back((clock ? tt[r].cpu : tt[r].wall) - base);
      dopt.push_back((clock ? to[r].cpu : to[r].wall) - base);
    }
    const double mc = median(c), mt_ = median(dt), mo_ = median(dopt);
    std::printf("%-12s %3d %-6s %9.3f %+9.3f %+7.1f%% %+9.3f %+7.1f%%  "
                "%.1e\n",
                s.name, threads, clock ? "cpu" : "wall", 1e3 * mc, 1e3 * mt_,
                100.0 * mt_ / mc, 1e3 * mo_, 100.0 * mo_ / mc, d_opt);
  }
  std::fflush(stdout);
}

} // namespace

int main(int argc, char **argv) {
  std::string only;
  int reps = 30, threads = 0;
  for (int i = 1; i < argc; i++) {
    if (!std::strcmp(argv[i], "--shape") && i + 1 < argc)
      only = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: imml-bench-libtorch [--shape NAME] "
                           "[--reps N] [--threads N]\n");
      return 2;
    }
  }
  if (threads > 0)
    torch::set_num_threads(threads);
  threads = imml_threads_set(threads);
  std::printf("# libimml %s, LibTorch %d.%d.%d; ms, medians of %d steps; "
              "added: median over the steps of (boundary step - C step)\n",
              imml_version_string(), TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
              TORCH_VERSION_PATCH, reps);
  std::printf("# shape     thr clock    C step  torch: added          "
              "torch+opt: added    param diff\n");
  bool ran = false;
  try {
    for (const Shape &s : kShapes) {
      if (only.empty() ? !std::strcmp(s.name, "large-batch") : only != s.name)
        continue;
      run_shape(s, reps, threads);
      ran = true;
    }
  } catch (const std::exception &e) {
    std::fprintf(stderr, "imml-bench-libtorch: %s\n", e.what());
    return 1;
  }
  if (!ran) {
    std::fprintf(stderr, "imml-bench-libtorch: unknown shape '%s'\n",
                 only.c_str());
    return 2;
  }
  return 0;
}
