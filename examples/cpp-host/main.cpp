// cpp-host: a C++17 host that gives libimml its own fusion and target
// (F&T) through imml_ft_ops callbacks.
//
// libimml computes the modality knowledge z_m (MDKEN) and the front-door
// adjusted slots (FDC); the host maps the M slots (B x k each) to logits
// (B x C) with its own, non-linear module and back-propagates dL/dlogits
// into dL/dslot_m and into its own parameter gradients.  Two host heads:
//
//  1. GatedMlpHead: gated fusion followed by an MLP target,
//        S     = [s_1; ...; s_M]                       (B x Mk)
//        g     = sigmoid(S Wg + bg)                    (B x Mk)
//        fused = sum_m g_m (.) s_m                     (B x k)
//        logits = relu(fused W1 + b1) W2 + b2          (B x C)
//
//  2. QmfHead: confidence-weighted late fusion in the spirit of QMF
//     (Zhang et al. 2023, "Provable Dynamic Fusion for Low-Quality
//     Multimodal Data"): per-modality linear logits l_m = s_m W_m + b_m,
//     energy E_m = -logsumexp(l_m), weights w = softmax_m(-E_m) per sample,
//     logits = sum_m w_m l_m.  The weights are detached (constants in the
//     backward), as in QMF, whose code weights l_m by -E_m / 10 directly;
//     this host normalises the confidences over the modalities instead,
//     so the fused logits stay on the scale of one head.  This is the IMML
//     paper's "host method + IMML" setting: a published fusion with libimml's
//     knowledge exploration and front-door adjustment in front of it.
//
// Each head trains on two mfeat views (pix + fou, standardised, a fixed
// stratified split): each step is imml_forward(TRAIN), imml_backward() and
// imml_commit(); then the host updates its parameters with its own Adam,
// libimml's with imml_optim_step().  Before training, each head's backward is
// verified by central finite differences on a few parameters and slot
// entries, calling the callbacks directly.  The program exits non-zero,
// saying why, if a check fails, the loss does not decrease, or the test
// accuracy is not clearly above chance.
//
// Build against the installed library:
//   g++ -std=c++17 main.cpp $(pkg-config --cflags --libs imml) -o cpp-host
// Usage: cpp-host DATA_DIR   (DATA_DIR holds mfeat-pix.csv, mfeat-fou.csv)
#include <imml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int kSamples = 2000;
constexpr int kClasses = 10;
constexpr int kModalities = 2;
constexpr int kBatch = 64;
constexpr int kKnowledge = 64; // k
constexpr int kEpochs = 10;
constexpr int kWarmup = 48;          // libimml warm-up steps (two epochs)
constexpr double kMinTestAcc = 0.85; // chance: 0.10
// Norm-wise relative error allowed between the analytic host gradients
// and central differences (step 1e-3) of the float32 callbacks.
constexpr double kFdTol = 1e-2;

const char *const kViewNames[kModalities] = {"pix", "fou"};

// ------------------------------------------------------------------
// Utilities
// ------------------------------------------------------------------

// The host's generator (splitmix64): initialisation, shuffling, checks.
class Rng {
public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  float sym(double a) {
    return static_cast<float>((2.0 * uniform() - 1.0) * a);
  }
  int below(int n) {
    return static_cast<int>(next() % static_cast<uint64_t>(n));
  }

private:
  uint64_t s_;
};

// One parameter tensor of the host, with its gradient and Adam moments.
struct Param {
  std::string name;
  int rows = 0, cols = 0;
  std::vector<float> w, g, m, v;
  Param(std::string n, int r, int c, int fan_in, Rng &rng)
      : name(std::move(n)), rows(r), cols(c),
        w(static_cast<size_t>(r) * static_cast<size_t>(c)), g(w.size()),
        m(w.size()), v(w.size()) {
    const double a = 1.0 / std::sqrt(static_cast<double>(fan_in));
    for (float &x : w)
      x = rng.sym(a);
  }
  float &at(int i, int j) {
    return w[static_cast<size_t>(i) * static_cast<size_t>(cols) +
             static_cast<size_t>(j)];
  }
};

// The host's own optimiser: Adam, bias-corrected; zeroes the gradients.
class Adam {
public:
  explicit Adam(float lr) : lr_(lr) {}
  void step(const std::vector<Param *> &params) {
    t_++;
    const float c1 = 1.0f - std::pow(b1_, static_cast<float>(t_));
    const float c2 = 1.0f - std::pow(b2_, static_cast<float>(t_));
    for (Param *p : params)
      for (size_t i = 0; i < p->w.size(); i++) {
        const float g = p->g[i];
        p->m[i] = b1_ * p->m[i] + (1.0f - b1_) * g;
        p->v[i] = b2_ * p->v[i] + (1.0f - b2_) * g * g;
        p->w[i] -= lr_ * (p->m[i] / c1) / (std::sqrt(p->v[i] / c2) + eps_);
        p->g[i] = 0.0f;
      }
  }

private:
  float lr_, b1_ = 0.9f, b2_ = 0.999f, eps_ = 1e-8f;
  long t_ = 0;
};

// y (n x out) = x (n x in) W (in x out) + b
void linear_forward(int n, int in, int out, const float *x, const Param &W,
                    const Param &b, float *y) {
  for (int i = 0; i < n; i++) {
    float *yr = y + static_cast<size_t>(i) * out;
    for (int o = 0; o < out; o++)
      yr[o] = b.w[static_cast<size_t>(o)];
    for (int j = 0; j < in; j++) {
      const float xv = x[static_cast<size_t>(i) * in + j];
      const float *wr = W.w.data() + static_cast<size_t>(j) * out;
      for (int o = 0; o < out; o++)
        yr[o] += xv * wr[o];
    }
  }
}

// dW += xᵀ dy, db += sum dy, and (dx != nullptr) dx = dy Wᵀ.
void linear_backward(int n, int in, int out, const float *x, Param &W, Param &b,
                     const float *dy, float *dx) {
  for (int i = 0; i < n; i++) {
    const float *dyr = dy + static_cast<size_t>(i) * out;
    for (int o = 0; o < out; o++)
      b.g[static_cast<size_t>(o)] += dyr[o];
    for (int j = 0; j < in; j++) {
      const float xv = x[static_cast<size_t>(i) * in + j];
      float *gr = W.g.data() + static_cast<size_t>(j) * out;
      const float *wr = W.w.data() + static_cast<size_t>(j) * out;
      float acc = 0.0f;
      for (int o = 0; o < out; o++) {
        gr[o] += xv * dyr[o];
        acc += dyr[o] * wr[o];
      }
      if (dx)
        dx[static_cast<size_t>(i) * in + j] = acc;
    }
  }
}

// ------------------------------------------------------------------
// Host F&T heads
// ------------------------------------------------------------------

// The interface the C callbacks dispatch to.  Every buffer is allocated
// in the constructor, so forward and backward allocate nothing.
class HostHead {
public:
  HostHead(int n_mod, int k, int n_classes, int max_batch)
      : M_(n_mod), k_(k), C_(n_classes), maxB_(max_batch) {}
  virtual ~HostHead() = default;
  HostHead(const HostHead &) = delete;
  HostHead &operator=(const HostHead &) = delete;

  virtual const char *name() const = 0;
  virtual int forward(bool training, int B, const float *const *slots,
                      float *logits) = 0;
  virtual int backward(int B, const float *const *slots, const float *dlogits,
                       float *const *dslots) = 0;
  // Finite-difference mode: QmfHead keeps its detached weights fixed at
  // those of the last training forward (they are constants in its
  // backward).  Other heads need nothing.
  virtual void set_fd_mode(bool) {}

  std::vector<Param *> &params() { return params_; }
  bool shape_ok(int B, int M, int k, int C) const {
    return B >= 1 && B <= maxB_ && M == M_ && k == k_ && C == C_;
  }

protected:
  int M_, k_, C_, maxB_;
  std::vector<Param *> params_;
};

// Gated fusion + MLP target (see the top of the file).
class GatedMlpHead final : public HostHead {
public:
  GatedMlpHead(int n_mod, int k, int n_classes, int hidden, int max_batch,
               Rng &rng)
      : HostHead(n_mod, k, n_classes, max_batch), H_(hidden),
        wg_("gate.w", n_mod * k, n_mod * k, n_mod * k, rng),
        bg_("gate.b", 1, n_mod * k, n_mod * k, rng),
        w1_("mlp.w1", k, hidden, k, rng), b1_("mlp.b1", 1, hidden, k, rng),
        w2_("mlp.w2", hidden, n_classes, hidden, rng),
        b2_("mlp.b2", 1, n_classes, hidden, rng), train_(*this), eval_(*this),
        da_(rows(hidden)), dpre_(rows(hidden)), dfused_(rows(k)),
        dgpre_(rows(n_mod * k)), ds_(rows(n_mod * k)) {
    params_ = {&wg_, &bg_, &w1_, &b1_, &w2_, &b2_};
  }
  const char *name() const override { return "gated fusion + MLP"; }

  int forward(bool training, int B, const float *const *slots,
              float *logits) override {
    // A training forward caches its activations for the backward; an
    // evaluation forward (which libimml may run between a training
    // forward and its backward) uses separate scratch.
    Acts &a = training ? train_ : eval_;
    const int Mk = M_ * k_;
    a.batch = B;
    for (int i = 0; i < B; i++)
      for (int m = 0; m < M_; m++)
        std::copy_n(slots[m] + static_cast<size_t>(i) * k_, k_,
                    a.S.data() + static_cast<size_t>(i) * Mk +
                        static_cast<size_t>(m) * k_);
    linear_forward(B, Mk, Mk, a.S.data(), wg_, bg_, a.g.data());
    for (int i = 0; i < B * Mk; i++)
      a.g[sz(i)] = 1.0f / (1.0f + std::exp(-a.g[sz(i)]));
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k_; t++) {
        float f = 0.0f;
        for (int m = 0; m < M_; m++) {
          const size_t c = static_cast<size_t>(i) * Mk + sz(m * k_ + t);
          f += a.g[c] * a.S[c];
        }
        a.fused[static_cast<size_t>(i) * k_ + sz(t)] = f;
      }
    linear_forward(B, k_, H_, a.fused.data(), w1_, b1_, a.pre.data());
    for (int i = 0; i < B * H_; i++)
      a.act[sz(i)] = a.pre[sz(i)] > 0.0f ? a.pre[sz(i)] : 0.0f;
    linear_forward(B, H_, C_, a.act.data(), w2_, b2_, logits);
    return 0;
  }

  int backward(int B, const float *const *slots, const float *dlogits,
               float *const *dslots) override {
    (void)slots; // the training cache holds the same values
    Acts &a = train_;
    if (a.batch != B)
      return 2; // no training forward of this batch
    const int Mk = M_ * k_;
    linear_backward(B, H_, C_, a.act.data(), w2_, b2_, dlogits, da_.data());
    for (int i = 0; i < B * H_; i++)
      dpre_[sz(i)] = a.pre[sz(i)] > 0.0f ? da_[sz(i)] : 0.0f;
    linear_backward(B, k_, H_, a.fused.data(), w1_, b1_, dpre_.data(),
                    dfused_.data());
    // fused = sum_m g_m (.) s_m: ds_m = dfused (.) g_m, dg_m = dfused (.) s_m
    for (int i = 0; i < B; i++)
      for (int m = 0; m < M_; m++)
        for (int t = 0; t < k_; t++) {
          const size_t c = static_cast<size_t>(i) * Mk + sz(m * k_ + t);
          const float df = dfused_[static_cast<size_t>(i) * k_ + sz(t)];
          dslots[m][static_cast<size_t>(i) * k_ + sz(t)] = df * a.g[c];
          dgpre_[c] = df * a.S[c] * a.g[c] * (1.0f - a.g[c]);
        }
    // g = sigmoid(S Wg + bg): the gate's input is the slots too.
    linear_backward(B, Mk, Mk, a.S.data(), wg_, bg_, dgpre_.data(), ds_.data());
    for (int i = 0; i < B; i++)
      for (int m = 0; m < M_; m++)
        for (int t = 0; t < k_; t++)
          dslots[m][static_cast<size_t>(i) * k_ + sz(t)] +=
              ds_[static_cast<size_t>(i) * Mk + sz(m * k_ + t)];
    return 0;
  }

private:
  static size_t sz(int n) { return static_cast<size_t>(n); }
  size_t rows(int w) const { return static_cast<size_t>(maxB_) * sz(w); }
  struct Acts {
    explicit Acts(const GatedMlpHead &h)
        : S(h.rows(h.M_ * h.k_)), g(S.size()), fused(h.rows(h.k_)),
          pre(h.rows(h.H_)), act(pre.size()) {}
    int batch = 0;
    std::vector<float> S, g, fused, pre, act;
  };
  int H_;
  Param wg_, bg_, w1_, b1_, w2_, b2_;
  Acts train_, eval_;
  std::vector<float> da_, dpre_, dfused_, dgpre_, ds_; // backward scratch
};

// QMF-style confidence-weighted late fusion (see the top of the file).
class QmfHead final : public HostHead {
public:
  QmfHead(int n_mod, int k, int n_classes, int max_batch, Rng &rng)
      : HostHead(n_mod, k, n_classes, max_batch),
        ml_(static_cast<size_t>(n_mod) * static_cast<size_t>(max_batch) *
            static_cast<size_t>(n_classes)),
        wtrain_(static_cast<size_t>(max_batch) * static_cast<size_t>(n_mod)),
        weval_(wtrain_.size()),
        dml_(static_cast<size_t>(max_batch) * static_cast<size_t>(n_classes)) {
    for (int m = 0; m < n_mod; m++) {
      const std::string p = "qmf.m" + std::to_string(m);
      heads_.push_back(std::make_unique<Param>(p + ".w", k, n_classes, k, rng));
      heads_.push_back(std::make_unique<Param>(p + ".b", 1, n_classes, k, rng));
    }
    for (auto &h : heads_)
      params_.push_back(h.get());
  }
  const char *name() const override { return "QMF confidence-weighted"; }
  void set_fd_mode(bool on) override { fd_mode_ = on; }

  int forward(bool training, int B, const float *const *slots,
              float *logits) override {
    std::vector<float> &w = (training && !fd_mode_) ? wtrain_ : weval_;
    const size_t bc = static_cast<size_t>(B) * static_cast<size_t>(C_);
    for (int m = 0; m < M_; m++)
      linear_forward(B, k_, C_, slots[m], *heads_[2 * m], *heads_[2 * m + 1],
                     ml_.data() + static_cast<size_t>(m) * bc);
    // Confidence per sample and modality: -Energy = logsumexp(l_m); the
    // fusion weights are its softmax over the modalities.  In FD mode the
    // weights of the last training forward are reused: they are detached.
    for (int i = 0; i < B; i++) {
      float *wi = w.data() + static_cast<size_t>(i) * M_;
      if (fd_mode_) {
        std::copy_n(wtrain_.data() + static_cast<size_t>(i) * M_, M_, wi);
      } else {
        float top = -INFINITY;
        for (int m = 0; m < M_; m++) {
          const float *l = ml_.data() + static_cast<size_t>(m) * bc +
                           static_cast<size_t>(i) * C_;
          const float mx = *std::max_element(l, l + C_);
          double s = 0.0;
          for (int c = 0; c < C_; c++)
            s += std::exp(static_cast<double>(l[c] - mx));
          wi[m] = mx + static_cast<float>(std::log(s)); // -Energy_m
          top = std::max(top, wi[m]);
        }
        float z = 0.0f;
        for (int m = 0; m < M_; m++)
          z += (wi[m] = std::exp(wi[m] - top));
        for (int m = 0; m < M_; m++)
          wi[m] /= z;
      }
      for (int c = 0; c < C_; c++) {
        float s = 0.0f;
        for (int m = 0; m < M_; m++)
          s +=
              wi[m] * ml_[static_cast<size_t>(m) * bc +
                          static_cast<size_t>(i) * C_ + static_cast<size_t>(c)];
        logits[static_cast<size_t>(i) * C_ + static_cast<size_t>(c)] = s;
      }
    }
    if (training && !fd_mode_)
      train_batch_ = B;
    return 0;
  }

  int backward(int B, const float *const *slots, const float *dlogits,
               float *const *dslots) override {
    if (train_batch_ != B)
      return 2; // no training forward of this batch
    for (int m = 0; m < M_; m++) {
      // dl_m = w_m dlogits (w detached)
      for (int i = 0; i < B; i++)
        for (int c = 0; c < C_; c++) {
          const size_t e = static_cast<size_t>(i) * C_ + static_cast<size_t>(c);
          dml_[e] =
              wtrain_[static_cast<size_t>(i) * M_ + static_cast<size_t>(m)] *
              dlogits[e];
        }
      linear_backward(B, k_, C_, slots[m], *heads_[2 * m], *heads_[2 * m + 1],
                      dml_.data(), dslots[m]);
    }
    return 0;
  }

private:
  std::vector<std::unique_ptr<Param>> heads_; // m0.w m0.b m1.w m1.b ...
  std::vector<float> ml_;                     // M x (B x C) per-modality logits
  std::vector<float> wtrain_, weval_;         // B x M fusion weights
  std::vector<float> dml_;                    // B x C
  int train_batch_ = 0;
  bool fd_mode_ = false;
};

// The C callbacks: user_data is the HostHead.  No exception may cross
// into C: every one is caught and reported as a non-zero return, which
// libimml turns into IMML_ERR_CALLBACK.
extern "C" int host_ft_forward(void *user_data, int training, int batch,
                               int n_modalities, int knowledge_dim,
                               const float *const *slots, int n_classes,
                               float *logits) {
  try {
    auto *h = static_cast<HostHead *>(user_data);
    if (!h || !h->shape_ok(batch, n_modalities, knowledge_dim, n_classes))
      return 1;
    return h->forward(training != 0, batch, slots, logits);
  } catch (...) {
    return 3;
  }
}

extern "C" int host_ft_backward(void *user_data, int batch, int n_modalities,
                                int knowledge_dim, const float *const *slots,
                                const float *dlogits, int n_classes,
                                float *const *dslots) {
  try {
    auto *h = static_cast<HostHead *>(user_data);
    if (!h || !h->shape_ok(batch, n_modalities, knowledge_dim, n_classes))
      return 1;
    return h->backward(batch, slots, dlogits, dslots);
  } catch (...) {
    return 3;
  }
}

imml_ft_ops make_ops(HostHead &head) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = host_ft_forward;
  ops.backward = host_ft_backward;
  ops.user_data = &head;
  return ops;
}

// ------------------------------------------------------------------
// Finite-difference check of a head's backward, through the callbacks
// ------------------------------------------------------------------

// L = sum_ij R_ij logits_ij for a fixed random R: dL/dlogits = R.
double probe_loss(const imml_ft_ops &ops, int B, int M, int k, int C,
                  const std::vector<std::vector<float>> &slots,
                  const std::vector<float> &R, std::vector<float> &logits,
                  bool *ok) {
  std::vector<const float *> sp;
  for (const auto &s : slots)
    sp.push_back(s.data());
  if (ops.forward(ops.user_data, 0, B, M, k, sp.data(), C, logits.data()))
    *ok = false;
  double L = 0.0;
  for (size_t i = 0; i < R.size(); i++)
    L += static_cast<double>(R[i]) * static_cast<double>(logits[i]);
  return L;
}

// Central difference of probe_loss with respect to *x.
double central_diff(const imml_ft_ops &ops, int B, int M, int k, int C,
                    const std::vector<std::vector<float>> &slots,
                    const std::vector<float> &R, std::vector<float> &logits,
                    float *x, bool *ok) {
  const float x0 = *x, eps = 1e-3f;
  const float xp = x0 + eps, xm = x0 - eps;
  *x = xp;
  const double lp = probe_loss(ops, B, M, k, C, slots, R, logits, ok);
  *x = xm;
  const double lm = probe_loss(ops, B, M, k, C, slots, R, logits, ok);
  *x = x0;
  return (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
}

struct NormErr {
  double num = 0.0, den = 0.0;
  void add(double analytic, double fd) {
    num += (analytic - fd) * (analytic - fd);
    den += analytic * analytic;
  }
  double rel() const {
    return std::sqrt(num) / std::max(std::sqrt(den), 1e-12);
  }
};

// Verifies the head's backward against central differences of its own
// forward, calling the imml_ft_ops callbacks directly: for every host
// tensor its largest-gradient entry and two random ones, and for every
// slot its largest-gradient entry and three random ones.
bool check_head_gradients(HostHead &head, int M, int k, int C, Rng &rng) {
  const imml_ft_ops ops = make_ops(head);
  const int B = 8;
  std::vector<std::vector<float>> slots(static_cast<size_t>(M)),
      dslots(static_cast<size_t>(M));
  for (int m = 0; m < M; m++) {
    slots[static_cast<size_t>(m)].resize(static_cast<size_t>(B * k));
    dslots[static_cast<size_t>(m)].resize(static_cast<size_t>(B * k));
    for (float &x : slots[static_cast<size_t>(m)])
      x = rng.sym(1.0);
  }
  std::vector<float> R(static_cast<size_t>(B * C)), logits(R.size());
  for (float &x : R)
    x = rng.sym(1.0);

  for (Param *p : head.params())
    std::fill(p->g.begin(), p->g.end(), 0.0f);
  std::vector<const float *> sp;
  std::vector<float *> dp;
  for (int m = 0; m < M; m++) {
    sp.push_back(slots[static_cast<size_t>(m)].data());
    dp.push_back(dslots[static_cast<size_t>(m)].data());
  }
  if (ops.forward(ops.user_data, 1, B, M, k, sp.data(), C, logits.data()) ||
      ops.backward(ops.user_data, B, M, k, sp.data(), R.data(), C, dp.data())) {
    std::fprintf(stderr, "cpp-host: FAIL: %s callbacks refused the check\n",
                 head.name());
    return false;
  }

  bool ok = true, cb_ok = true;
  head.set_fd_mode(true);
  auto pick = [&rng](const std::vector<float> &g, int n_random) {
    std::vector<size_t> idx;
    idx.push_back(static_cast<size_t>(std::max_element(g.begin(), g.end(),
                                                       [](float a, float b) {
                                                         return std::fabs(a) <
                                                                std::fabs(b);
                                                       }) -
                                      g.begin()));
    for (int r = 0; r < n_random; r++)
      idx.push_back(static_cast<size_t>(rng.below(static_cast<int>(g.size()))));
    return idx;
  };
  NormErr all;
  for (Param *p : head.params()) {
    NormErr e;
    const std::vector<float> g = p->g; // analytic (FD forwards keep grads)
    for (size_t i : pick(g, 2)) {
      const double fd =
          central_diff(ops, B, M, k, C, slots, R, logits, &p->w[i], &cb_ok);
      e.add(g[i], fd);
      all.add(g[i], fd);
    }
    if (!(e.rel() < kFdTol)) {
      std::fprintf(stderr,
                   "cpp-host: FAIL: %s: gradient of %s is off: relative "
                   "error %.3e (tolerance %.0e)\n",
                   head.name(), p->name.c_str(), e.rel(), kFdTol);
      ok = false;
    }
  }
  NormErr slot_err;
  for (int m = 0; m < M; m++) {
    for (size_t i : pick(dslots[static_cast<size_t>(m)], 3)) {
      const double fd = central_diff(ops, B, M, k, C, slots, R, logits,
                                     &slots[static_cast<size_t>(m)][i], &cb_ok);
      slot_err.add(dslots[static_cast<size_t>(m)][i], fd);
    }
  }
  head.set_fd_mode(false);
  if (!(slot_err.rel() < kFdTol)) {
    std::fprintf(stderr,
                 "cpp-host: FAIL: %s: dL/dslot is off: relative error %.3e "
                 "(tolerance %.0e)\n",
                 head.name(), slot_err.rel(), kFdTol);
    ok = false;
  }
  if (!cb_ok) {
    std::fprintf(stderr, "cpp-host: FAIL: %s forward refused a check call\n",
                 head.name());
    ok = false;
  }
  std::printf("  host backward vs finite differences: parameters %.2e, "
              "slots %.2e (norm-wise relative error, tolerance %.0e)\n",
              all.rel(), slot_err.rel(), kFdTol);
  for (Param *p : head.params())
    std::fill(p->g.begin(), p->g.end(), 0.0f);
  return ok;
}

// ------------------------------------------------------------------
// Data
// ------------------------------------------------------------------

struct View {
  int dim = 0;
  std::vector<float> x; // kSamples x dim
};

bool load_view(const std::string &dir, const char *name, View &v,
               std::vector<int> &labels) {
  const std::string path = dir + "/mfeat-" + name + ".csv";
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) {
    std::fprintf(stderr, "cpp-host: cannot read %s\n", path.c_str());
    return false;
  }
  const int cols =
      static_cast<int>(std::count(line.begin(), line.end(), ',')) + 1;
  v.dim = cols - 1;
  v.x.assign(static_cast<size_t>(kSamples) * static_cast<size_t>(v.dim), 0.0f);
  int row = 0;
  while (row < kSamples && std::getline(in, line)) {
    const char *p = line.c_str();
    for (int j = 0; j < cols; j++) {
      char *end = nullptr;
      const double val = std::strtod(p, &end);
      if (end == p) {
        std::fprintf(stderr, "cpp-host: %s: row %d column %d is not a number\n",
                     path.c_str(), row + 2, j + 1);
        return false;
      }
      p = *end == ',' ? end + 1 : end;
      if (j < v.dim) {
        v.x[static_cast<size_t>(row) * static_cast<size_t>(v.dim) +
            static_cast<size_t>(j)] = static_cast<float>(val);
      } else {
        const int y = static_cast<int>(val);
        int &lab = labels[static_cast<size_t>(row)];
        if (y < 0 || y >= kClasses || (lab >= 0 && lab != y)) {
          std::fprintf(stderr, "cpp-host: %s: row %d has a bad label\n",
                       path.c_str(), row + 2);
          return false;
        }
        lab = y;
      }
    }
    row++;
  }
  if (row != kSamples) {
    std::fprintf(stderr, "cpp-host: %s: %d rows, expected %d\n", path.c_str(),
                 row, kSamples);
    return false;
  }
  return true;
}

void standardise(View &v, const std::vector<int> &train) {
  const size_t d = static_cast<size_t>(v.dim);
  for (size_t j = 0; j < d; j++) {
    double s = 0.0, s2 = 0.0;
    for (int i : train) {
      const double x = v.x[static_cast<size_t>(i) * d + j];
      s += x;
      s2 += x * x;
    }
    const double n = static_cast<double>(train.size());
    const double mean = s / n, var = s2 / n - mean * mean;
    const double sd = var > 1e-12 ? std::sqrt(var) : 1.0;
    for (size_t i = 0; i < static_cast<size_t>(kSamples); i++)
      v.x[i * d + j] = static_cast<float>((v.x[i * d + j] - mean) / sd);
  }
}

struct Data {
  View views[kModalities];
  std::vector<int> labels = std::vector<int>(kSamples, -1);
  std::vector<int> train, test;
};

// ------------------------------------------------------------------
// Training one head with libimml
// ------------------------------------------------------------------

struct ModelFree {
  void operator()(imml_model *m) const { imml_model_free(m); }
};
using ModelPtr = std::unique_ptr<imml_model, ModelFree>;

// Gathers the rows idx[0..n-1] of every view into per-modality buffers.
class Batcher {
public:
  explicit Batcher(const Data &d) : d_(d) {
    for (int m = 0; m < kModalities; m++)
      buf_[m].resize(static_cast<size_t>(kBatch) *
                     static_cast<size_t>(d.views[m].dim));
  }
  const float *const *gather(const int *idx, int n, int *labels) {
    for (int m = 0; m < kModalities; m++) {
      const size_t dim = static_cast<size_t>(d_.views[m].dim);
      for (int i = 0; i < n; i++)
        std::copy_n(d_.views[m].x.data() + static_cast<size_t>(idx[i]) * dim,
                    dim, buf_[m].data() + static_cast<size_t>(i) * dim);
      ptr_[m] = buf_[m].data();
    }
    for (int i = 0; i < n; i++)
      labels[i] = d_.labels[static_cast<size_t>(idx[i])];
    return ptr_;
  }

private:
  const Data &d_;
  std::vector<float> buf_[kModalities];
  const float *ptr_[kModalities] = {};
};

bool ok_or_report(imml_model *model, imml_status st, const char *what) {
  if (st == IMML_OK)
    return true;
  std::fprintf(stderr, "cpp-host: %s failed: %s (%s)\n", what,
               imml_status_string(st), imml_model_errmsg(model));
  return false;
}

// Test accuracy with imml_predict (an evaluation forward that only reads
// the model; the host callback sees training = 0).  This program predicts
// on the thread that trains, so it calls imml_predict on the model itself;
// a server thread would take a share of it (imml_model_share).
bool test_accuracy(imml_model *model, const Data &d, double *acc) {
  Batcher batcher(d);
  int labels[kBatch], classes[kBatch];
  int correct = 0;
  const int n = static_cast<int>(d.test.size());
  for (int s = 0; s < n; s += kBatch) {
    const int b = std::min(kBatch, n - s);
    const float *const *x = batcher.gather(d.test.data() + s, b, labels);
    if (!ok_or_report(model,
                      imml_predict(model, b, x, nullptr, nullptr, classes),
                      "imml_predict"))
      return false;
    for (int i = 0; i < b; i++)
      correct += classes[i] == labels[i];
  }
  *acc = static_cast<double>(correct) / n;
  return true;
}

bool run_head(HostHead &head, Data &d, Rng &rng) {
  std::printf("\n== head: %s (views %s + %s) ==\n", head.name(), kViewNames[0],
              kViewNames[1]);
  if (!check_head_gradients(head, kModalities, kKnowledge, kClasses, rng))
    return false;

  const int dims[kModalities] = {d.views[0].dim, d.views[1].dim};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = kModalities;
  cfg.dims = dims;
  cfg.hidden_dim = 128;
  cfg.knowledge_dim = kKnowledge;
  cfg.n_classes = kClasses;
  cfg.max_batch = kBatch;
  cfg.dict_size = 256;
  cfg.warmup_steps = kWarmup;
  cfg.seed = 11;
  const imml_ft_ops ops = make_ops(head);
  imml_model *raw = nullptr;
  const imml_status st = imml_model_create(&cfg, &ops, &raw);
  // A failed create still returns a handle (holding only the message) that
  // must be freed; ModelPtr frees it.
  ModelPtr model(raw);
  if (st != IMML_OK) {
    std::fprintf(stderr, "cpp-host: imml_model_create: %s (%s)\n",
                 imml_status_string(st), imml_model_errmsg(model.get()));
    return false;
  }
  imml_optim_config ocfg;
  imml_optim_config_init(&ocfg, IMML_OPTIM_ADAMW);
  ocfg.lr = 1e-3f;
  if (!ok_or_report(model.get(), imml_optim_setup(model.get(), &ocfg),
                    "imml_optim_setup"))
    return false;
  Adam host_opt(1e-3f);

  Batcher batcher(d);
  int labels[kBatch];
  double first = 0.0, last = 0.0, acc = 0.0;
  const int n = static_cast<int>(d.train.size());
  for (int epoch = 0; epoch < kEpochs; epoch++) {
    for (int i = n - 1; i > 0; i--)
      std::swap(d.train[static_cast<size_t>(i)],
                d.train[static_cast<size_t>(rng.below(i + 1))]);
    double lsum = 0.0;
    for (int s = 0; s < n; s += kBatch) {
      const int b = std::min(kBatch, n - s);
      const float *const *x = batcher.gather(d.train.data() + s, b, labels);
      imml_losses L;
      if (!ok_or_report(model.get(),
                        imml_forward(model.get(), IMML_MODE_TRAIN, b, x, labels,
                                     nullptr, &L),
                        "imml_forward (TRAIN)") ||
          !ok_or_report(model.get(), imml_backward(model.get(), nullptr),
                        "imml_backward") ||
          !ok_or_report(model.get(), imml_commit(model.get()), "imml_commit"))
        return false;
      lsum += L.total * b;
      host_opt.step(head.params()); // the host's parameters, its optimiser
      if (!ok_or_report(model.get(), imml_optim_step(model.get()),
                        "imml_optim_step"))
        return false; // libimml's parameters, libimml's optimiser
    }
    const double mean = lsum / n;
    if (epoch == 0)
      first = mean;
    last = mean;
    if (!test_accuracy(model.get(), d, &acc))
      return false;
    int p = -1;
    imml_predominant_get(model.get(), &p, nullptr);
    std::printf("  epoch %2d  train loss %.4f  test acc %.4f  predominant %s\n",
                epoch + 1, mean, acc, p < 0 ? "(warm-up)" : kViewNames[p]);
  }
  std::printf("  mean train loss: first epoch %.4f, last epoch %.4f; test "
              "accuracy %.4f (chance 0.10, required > %.2f)\n",
              first, last, acc, kMinTestAcc);
  bool ok = true;
  if (!(last < first)) {
    std::fprintf(stderr,
                 "cpp-host: FAIL: %s: training loss did not decrease (first "
                 "epoch %.4f, last %.4f)\n",
                 head.name(), first, last);
    ok = false;
  }
  if (!(acc > kMinTestAcc)) {
    std::fprintf(stderr, "cpp-host: FAIL: %s: test accuracy %.4f <= %.2f\n",
                 head.name(), acc, kMinTestAcc);
    ok = false;
  }
  return ok;
}

int run(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DATA_DIR (the directory of mfeat-*.csv)\n",
                 argv[0]);
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::printf("cpp-host: libimml %s (header %s)\n", imml_version_string(),
              IMML_VERSION_STRING);
  if (imml_version_number() != IMML_VERSION_NUMBER) {
    std::fprintf(stderr, "cpp-host: header and library versions differ\n");
    return 1;
  }
  Data d;
  for (int m = 0; m < kModalities; m++)
    if (!load_view(argv[1], kViewNames[m], d.views[m], d.labels))
      return 1;
  // Fixed stratified split: samples are stored class by class; every 4th
  // is a test sample (1500 train / 500 test).
  for (int i = 0; i < kSamples; i++)
    (i % 4 == 3 ? d.test : d.train).push_back(i);
  for (auto &v : d.views)
    standardise(v, d.train);
  std::printf("data: %s (%d) + %s (%d), %zu train / %zu test samples\n",
              kViewNames[0], d.views[0].dim, kViewNames[1], d.views[1].dim,
              d.train.size(), d.test.size());

  Rng rng(20230601u);
  bool ok = true;
  {
    GatedMlpHead gated(kModalities, kKnowledge, kClasses, 64, kBatch, rng);
    ok = run_head(gated, d, rng) && ok;
  }
  {
    QmfHead qmf(kModalities, kKnowledge, kClasses, kBatch, rng);
    ok = run_head(qmf, d, rng) && ok;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("\ncpp-host: %s in %.2f s\n", ok ? "passed" : "FAILED", secs);
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char **argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception &e) {
    std::fprintf(stderr, "cpp-host: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "cpp-host: unknown exception\n");
  }
  return 1;
}
