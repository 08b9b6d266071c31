// libtorch-host: LibTorch encoders trained end to end through libimml.
//
//   pix (240 = 16 x 15 image) --[CNN]--> h_0 (64) --+
//                                                   +--> head --> logits
//   fou (76 Fourier coeffs.)  --[MLP]--> h_1 (64) --+
//
// Two heads behind the same encoders, on the same splits and seeds:
//
//  - late fusion, in LibTorch: per modality Linear(64, H) ReLU Linear(H, k),
//    concatenated, Linear(2k, C), cross-entropy; one AdamW over encoders
//    and head;
//  - IMML, in libimml (MDKEN + front-door adjustment + built-in F&T, same
//    H and k), wrapped as a torch::autograd::Function (imml_torch.h): its
//    forward runs imml_forward(TRAIN), its backward imml_backward(), which
//    hands dL/dh_m back to autograd and so to the encoders.  Each step is
//    forward, loss.backward(), imml_commit() (the step's end), then the
//    updates: imml_optim_step() for libimml's parameters (AdamW, same
//    hyper-parameters) and LibTorch's AdamW for the encoders' (README.md
//    says why libimml keeps its own optimiser).
//
// It prints the comparison in the form of `imml-train --compare`: test
// accuracy, macro-F1 and accuracy with the auxiliary modality's test rows
// shuffled across samples, mean +- sample std over seeds.
//
// Self-checks (exit status 1, with the reason on stderr):
//  - imml_torch.h refuses each misuse with its reason: float64 or misshapen
//    features, a batch above max_batch, float or out-of-range labels, a
//    scaled loss, the backward of a forward that is no longer pending;
//  - gradients across the boundary, on a copy of the model (a checkpoint in
//    memory) and a batch of 16, before training (warm-up) and after it
//    (front-door adjustment on, dictionary full): for each modality the
//    derivative of the loss along a direction v of h_m, by central
//    differences of evaluation forwards (which change nothing), against
//    <dL/dh_m, v> from the Function's backward; and the same along a
//    direction of all of an encoder's parameters against the gradients
//    autograd put into them;
//  - every run must learn: the mean training loss of its last epoch below
//    that of its first, and each method's mean test accuracy at least
//    --min-test-acc (default 0.90; chance is 0.10).
//
// Usage: libtorch-host DATA_DIR [--seeds N] [--epochs N] [--threads N]
//                      [--min-test-acc A] [--inject-swapped-gradients]
// DATA_DIR holds mfeat-pix.csv and mfeat-fou.csv (examples/data/mfeat).
// --inject-swapped-gradients runs the gradient check through a Function
// whose backward swaps the two modalities' dL/dh: the check must fail
// (the test 'libtorch-host-check-fails' makes sure it does).
#define IMML_EXPERIMENTAL // imml_threads_set, imml_warmup_get
#include "imml_torch.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kClasses = 10;
constexpr int kRows = 16, kCols = 15; // a pix image, row-major
constexpr int kEnc = 64;              // width of h_m
constexpr int kHidden = 128;          // H
constexpr int kKnowledge = 64;        // k
constexpr int kDict = 256;            // J
constexpr int kBatch = 64;
constexpr int kWarmup = 48; // libimml warm-up steps (3 epochs of 16)
constexpr float kLr = 1e-3f, kWeightDecay = 0.01f;
constexpr double kTestFraction = 0.5;
// Gradient check: batch, steps along a unit direction, tolerance on the
// relative difference of the closest.  libimml computes in float32: the
// central differences of its loss agree with the analytic derivatives to
// 1e-5..3e-3 here; a wrong chain rule (a swapped modality, a lost factor)
// is off by O(1).
constexpr int kFdBatch = 16;
constexpr double kFdSteps[] = {1e-2, 3e-3, 1e-3};
constexpr double kFdTol = 1e-2;

const char *const kViewNames[2] = {"pix", "fou"};

double now_seconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

[[noreturn]] void fail(const std::string &why) {
  std::fprintf(stderr, "libtorch-host: FAIL: %s\n", why.c_str());
  std::exit(1);
}

// ------------------------------------------------------------------
// Data
// ------------------------------------------------------------------

struct View {
  int dim = 0;
  std::vector<float> x; // n x dim
};

// DIR/mfeat-NAME.csv: a header row, then one sample per row, the label in
// the last column.
View load_view(const std::string &dir, const char *name,
               std::vector<int64_t> *labels) {
  const std::string path = dir + "/mfeat-" + name + ".csv";
  std::ifstream in(path);
  if (!in)
    fail("cannot open " + path);
  std::string line;
  if (!std::getline(in, line))
    fail(path + ": no header row");
  View v;
  v.dim = static_cast<int>(std::count(line.begin(), line.end(), ',')); // +1-1
  std::vector<int64_t> y;
  int row = 1;
  while (std::getline(in, line)) {
    row++;
    const char *p = line.c_str();
    for (int j = 0; j <= v.dim; j++) {
      char *end = nullptr;
      const double val = std::strtod(p, &end);
      if (end == p)
        fail(path + ":" + std::to_string(row) + ": column " +
             std::to_string(j + 1) + " is not a number");
      p = *end == ',' ? end + 1 : end;
      if (j < v.dim)
        v.x.push_back(static_cast<float>(val));
      else if (val < 0 || val >= kClasses || val != std::floor(val))
        fail(path + ":" + std::to_string(row) + ": bad label");
      else
        y.push_back(static_cast<int64_t>(val));
    }
  }
  if (labels->empty())
    *labels = y;
  else if (*labels != y)
    fail(path + ": labels differ from the first view's");
  return v;
}

struct Split {
  std::vector<int64_t> train, test;
};

// Stratified: a fraction kTestFraction of each class, chosen by the seed.
Split split_stratified(const std::vector<int64_t> &y, uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 1);
  Split s;
  for (int c = 0; c < kClasses; c++) {
    std::vector<int64_t> idx;
    for (size_t i = 0; i < y.size(); i++)
      if (y[i] == c)
        idx.push_back(static_cast<int64_t>(i));
    std::shuffle(idx.begin(), idx.end(), rng);
    const size_t nt = static_cast<size_t>(
        std::floor(static_cast<double>(idx.size()) * kTestFraction + 0.5));
    s.test.insert(s.test.end(), idx.begin(),
                  idx.begin() + static_cast<std::ptrdiff_t>(nt));
    s.train.insert(s.train.end(), idx.begin() + static_cast<std::ptrdiff_t>(nt),
                   idx.end());
  }
  std::sort(s.train.begin(), s.train.end());
  std::sort(s.test.begin(), s.test.end());
  return s;
}

// The views as tensors, standardised with the training rows' statistics:
// the image as a whole (one mean and std over its pixels, keeping its
// structure for the CNN), the Fourier coefficients per column.
struct Tensors {
  torch::Tensor x[2]; // n x 240, n x 76
  torch::Tensor y;    // n, int64
};

Tensors make_tensors(const View *views, const std::vector<int64_t> &y,
                     const Split &s) {
  Tensors t;
  const int64_t n = static_cast<int64_t>(y.size());
  const torch::Tensor tr = torch::tensor(s.train);
  for (int m = 0; m < 2; m++) {
    torch::Tensor x = torch::from_blob(const_cast<float *>(views[m].x.data()),
                                       {n, views[m].dim})
                          .clone();
    const torch::Tensor xt = x.index_select(0, tr);
    if (m == 0) {
      x = (x - xt.mean()) / xt.std(/*unbiased=*/false);
    } else {
      torch::Tensor sd = xt.std(0, /*unbiased=*/false);
      sd = torch::where(sd > 1e-6, sd, torch::ones_like(sd));
      x = (x - xt.mean(0)) / sd;
    }
    t.x[m] = x.contiguous();
  }
  t.y = torch::tensor(y);
  return t;
}

// ------------------------------------------------------------------
// The host model: encoders and the LibTorch late-fusion head
// ------------------------------------------------------------------

// The image: two 3x3 convolutions with 2x2 max pooling, then a linear
// layer to h (16 x 15 -> 16 x 8 x 7 -> 32 x 4 x 3 -> 64).
struct CnnImpl : torch::nn::Module {
  CnnImpl()
      : c1(register_module(
            "c1",
            torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)))),
        c2(register_module(
            "c2",
            torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)))),
        fc(register_module("fc", torch::nn::Linear(32 * 4 * 3, kEnc))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x.view({-1, 1, kRows, kCols});
    x = torch::max_pool2d(torch::relu(c1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(c2->forward(x)), 2);
    return torch::relu(fc->forward(x.flatten(1)));
  }
  torch::nn::Conv2d c1, c2;
  torch::nn::Linear fc;
};
TORCH_MODULE(Cnn);

// The Fourier coefficients: a two-layer MLP to h.
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int in)
      : l1(register_module("l1", torch::nn::Linear(in, kEnc))),
        l2(register_module("l2", torch::nn::Linear(kEnc, kEnc))) {}
  torch::Tensor forward(const torch::Tensor &x) {
    return torch::relu(l2->forward(torch::relu(l1->forward(x))));
  }
  torch::nn::Linear l1, l2;
};
TORCH_MODULE(Mlp);

// Late fusion with IMML's widths: the branch of doc/METHOD.md section 1
// per modality (no unimodal heads), concatenation, one linear layer.
struct LateFusionImpl : torch::nn::Module {
  LateFusionImpl() {
    for (int m = 0; m < 2; m++) {
      b1[m] = register_module("b1_" + std::to_string(m),
                              torch::nn::Linear(kEnc, kHidden));
      b2[m] = register_module("b2_" + std::to_string(m),
                              torch::nn::Linear(kHidden, kKnowledge));
    }
    out = register_module("out", torch::nn::Linear(2 * kKnowledge, kClasses));
  }
  torch::Tensor forward(const torch::Tensor &h0, const torch::Tensor &h1) {
    const torch::Tensor z0 = b2[0]->forward(torch::relu(b1[0]->forward(h0)));
    const torch::Tensor z1 = b2[1]->forward(torch::relu(b1[1]->forward(h1)));
    return out->forward(torch::cat({z0, z1}, 1));
  }
  torch::nn::Linear b1[2] = {nullptr, nullptr}, b2[2] = {nullptr, nullptr};
  torch::nn::Linear out{nullptr};
};
TORCH_MODULE(LateFusion);

struct Encoders {
  Cnn cnn;
  Mlp mlp;
  Encoders(int fou_dim) : mlp(fou_dim) {}
  std::vector<torch::Tensor> operator()(const torch::Tensor &x0,
                                        const torch::Tensor &x1) {
    return {cnn->forward(x0), mlp->forward(x1)};
  }
  std::vector<torch::Tensor> parameters() {
    std::vector<torch::Tensor> p = cnn->parameters();
    for (const torch::Tensor &t : mlp->parameters())
      p.push_back(t);
    return p;
  }
};

torch::optim::AdamW make_adamw(const std::vector<torch::Tensor> &params) {
  return torch::optim::AdamW(
      params, torch::optim::AdamWOptions(kLr).weight_decay(kWeightDecay));
}

// ------------------------------------------------------------------
// libimml
// ------------------------------------------------------------------

imml_config make_config(const int *dims, int slot_mode, uint64_t seed) {
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = 2;
  cfg.dims = dims;
  cfg.hidden_dim = kHidden;
  cfg.knowledge_dim = kKnowledge;
  cfg.n_classes = kClasses;
  cfg.max_batch = kBatch;
  cfg.dict_size = kDict;
  cfg.warmup_steps = kWarmup;
  cfg.slot_mode = slot_mode;
  cfg.seed = seed;
  return cfg;
}

// ------------------------------------------------------------------
// Gradient check across the boundary
// ------------------------------------------------------------------

double dot64(const torch::Tensor &a, const torch::Tensor &b) {
  return (a.to(torch::kDouble) * b.to(torch::kDouble)).sum().item<double>();
}

// A unit direction: half along g (so that the derivative is well above the
// rounding of the loss), half random.
torch::Tensor direction(const torch::Tensor &g) {
  const torch::Tensor r = torch::randn_like(g);
  const double gn = g.norm().item<double>();
  torch::Tensor v = r / r.norm();
  if (gn > 0.0)
    v = v + g / gn;
  return v / v.norm();
}

// Compares central differences of `loss` (a function of the step t along
// a unit direction) with the analytic derivative, at each step of kFdSteps;
// prints the closest and fails unless it is within kFdTol.  Several steps
// because no single one suits every direction: a long step crosses ReLU
// and max-pool kinks, a short one magnifies the float32 rounding of the
// loss; a wrong gradient is off at every step.
template <class LossFn>
void fd_compare(const std::string &what, const std::string &when,
                double analytic, LossFn loss) {
  double best_rel = INFINITY, best_fd = NAN, best_step = 0.0;
  for (double step : kFdSteps) {
    const double fd = (loss(step) - loss(-step)) / (2.0 * step);
    const double rel =
        std::fabs(fd - analytic) / std::max(std::fabs(analytic), 1e-12);
    if (!(rel >= best_rel)) {
      best_rel = rel;
      best_fd = fd;
      best_step = step;
    }
  }
  std::printf("gradient check, %-41s %-27s analytic %+.6e  central "
              "difference %+.6e (step %.0e)  relative error %.1e\n",
              (when + ",").c_str(), (what + ":").c_str(), analytic, best_fd,
              best_step, best_rel);
  if (!(best_rel < kFdTol))
    fail("the gradient across the boundary disagrees with finite "
         "differences (" +
         when + ", " + what + ": analytic " + std::to_string(analytic) +
         ", closest central difference " + std::to_string(best_fd) +
         ", relative error " + std::to_string(best_rel) + ", tolerance " +
         std::to_string(kFdTol) + ")");
}

// The negative control of the check (--inject-swapped-gradients): the
// Function with a wrong backward that hands modality 0's dL/dh to modality
// 1 and back, as a host that mixed up the modality order would.
struct SwappedFunction : torch::autograd::Function<SwappedFunction> {
  static torch::autograd::variable_list
  forward(torch::autograd::AutogradContext *ctx, imml_torch::Model *model,
          const torch::Tensor &labels, torch::TensorList h) {
    return imml_torch::ImmlFunction::forward(ctx, model, labels, h);
  }
  static torch::autograd::variable_list
  backward(torch::autograd::AutogradContext *ctx,
           torch::autograd::variable_list grad) {
    torch::autograd::variable_list d =
        imml_torch::ImmlFunction::backward(ctx, std::move(grad));
    std::swap(d[2], d[3]);
    return d;
  }
};
bool g_inject_swapped = false;

// On a copy of `model` (so that training is not disturbed), one training
// forward and backward on a batch of kFdBatch; then directional
// derivatives by evaluation forwards.
void grad_check(const imml_torch::Model &model, Encoders &enc, const Tensors &t,
                const std::vector<int64_t> &rows, const std::string &when) {
  const std::unique_ptr<imml_torch::Model> copy = model.clone();
  const torch::Tensor idx = torch::tensor(
      std::vector<int64_t>(rows.begin(), rows.begin() + kFdBatch));
  const torch::Tensor x0 = t.x[0].index_select(0, idx);
  const torch::Tensor x1 = t.x[1].index_select(0, idx);
  const torch::Tensor y = t.y.index_select(0, idx);
  std::vector<torch::Tensor> params[2] = {enc.cnn->parameters(),
                                          enc.mlp->parameters()};
  for (auto &ps : params)
    for (torch::Tensor &p : ps)
      p.mutable_grad() = torch::Tensor();

  std::vector<torch::Tensor> h = enc(x0, x1);
  for (torch::Tensor &hm : h)
    hm.retain_grad();
  const torch::Tensor loss =
      g_inject_swapped
          ? SwappedFunction::apply(copy.get(), y, torch::TensorList(h))[0]
          : imml_torch::train_forward(*copy, y, h).loss;
  loss.backward();

  std::vector<torch::Tensor> hd = {h[0].detach(), h[1].detach()};
  for (int m = 0; m < 2; m++) {
    // 1. the boundary itself: d/dt L(h_m + t v) at 0 against <dL/dh_m, v>
    const torch::Tensor g = h[static_cast<size_t>(m)].grad();
    if (!g.defined())
      fail("no gradient reached h_" + std::to_string(m));
    const torch::Tensor v = direction(g);
    fd_compare(
        std::string("dL/dh_") + std::to_string(m) + " (" + kViewNames[m] + ")",
        when, dot64(g, v), [&](double s) {
          std::vector<torch::Tensor> hs = hd;
          hs[static_cast<size_t>(m)] = hd[static_cast<size_t>(m)] + s * v;
          double l = 0.0;
          imml_torch::eval_forward(*copy, hs, y, &l);
          return l;
        });
    // 2. on through autograd: along a direction u of every parameter of
    //    encoder m, against sum_p <dL/dp, u_p>
    std::vector<torch::Tensor> &ps = params[m];
    std::vector<torch::Tensor> u, saved;
    double analytic = 0.0, un = 0.0;
    for (torch::Tensor &p : ps) {
      if (!p.grad().defined())
        fail(std::string("no gradient reached the ") + kViewNames[m] +
             " encoder's parameters");
      u.push_back(direction(p.grad()));
      un += u.back().square().sum().item<double>();
      saved.push_back(p.detach().clone());
    }
    for (size_t i = 0; i < ps.size(); i++) {
      u[i] /= std::sqrt(un);
      analytic += dot64(ps[i].grad(), u[i]);
    }
    fd_compare(std::string(kViewNames[m]) + " encoder's parameters", when,
               analytic, [&](double s) {
                 torch::NoGradGuard no_grad;
                 for (size_t i = 0; i < ps.size(); i++)
                   ps[i].copy_(saved[i] + s * u[i]);
                 std::vector<torch::Tensor> hs = enc(x0, x1);
                 for (size_t i = 0; i < ps.size(); i++)
                   ps[i].copy_(saved[i]);
                 double l = 0.0;
                 imml_torch::eval_forward(*copy, hs, y, &l);
                 return l;
               });
  }
  for (auto &ps : params)
    for (torch::Tensor &p : ps)
      p.mutable_grad() = torch::Tensor();
}

// ------------------------------------------------------------------
// The Function's refusals
// ------------------------------------------------------------------

// Each misuse must throw, naming the problem; then a correct step must
// still go through.
void check_refusals() {
  const int dims[2] = {kEnc, kEnc};
  imml_config cfg = make_config(dims, IMML_SLOT_CONDITIONAL, 0);
  cfg.max_batch = 8;
  imml_torch::Model model(cfg);
  const auto f32 = torch::TensorOptions().requires_grad(true);
  const torch::Tensor h0 = torch::randn({4, kEnc}, f32),
                      h1 = torch::randn({4, kEnc}, f32);
  const torch::Tensor y = torch::arange(4) % kClasses;
  auto step = [&](const torch::Tensor &a, const torch::Tensor &b,
                  const torch::Tensor &labels) {
    return imml_torch::train_forward(model, labels, {a, b});
  };
  int n = 0;
  auto expect = [&](const char *misuse, const char *text, auto f) {
    try {
      f();
    } catch (const std::exception &e) {
      if (!std::strstr(e.what(), text))
        fail(std::string("imml_torch.h: ") + misuse + " was refused with '" +
             e.what() + "', which does not say '" + text + "'");
      n++;
      return;
    }
    fail(std::string("imml_torch.h: ") + misuse + " was not refused");
  };
  expect("float64 features", "libimml takes float32",
         [&] { step(h0.to(torch::kDouble), h1, y); });
  expect("features of the wrong width", "expected B x 64",
         [&] { step(h0.narrow(1, 0, 32), h1, y); });
  expect("a batch above max_batch", "the model takes 1..8", [&] {
    step(torch::randn({9, kEnc}), torch::randn({9, kEnc}),
         torch::arange(9) % kClasses);
  });
  expect("float labels", "labels must be",
         [&] { step(h0, h1, y.to(torch::kFloat)); });
  expect("a label outside 0..C-1", "label",
         [&] { step(h0, h1, torch::full({4}, kClasses, torch::kLong)); });
  expect("a scaled loss", "not 1",
         [&] { (0.5 * step(h0, h1, y).loss).backward(); });
  expect("the backward of an older forward", "no longer pending", [&] {
    const imml_torch::TrainOutput a = step(h0, h1, y);
    step(h0, h1, y);
    a.loss.backward();
  });
  expect("a second backward", "no longer pending", [&] {
    const imml_torch::TrainOutput a = step(h0, h1, y);
    a.loss.backward({}, /*retain_graph=*/true);
    a.loss.backward();
  });
  // The second backward's first run completed: the step can end.
  model.commit();
  std::printf("imml_torch.h refused %d misuses, each naming the problem\n", n);
}

// ------------------------------------------------------------------
// Training and evaluation
// ------------------------------------------------------------------

enum Method { kLateFusion, kImmlConditional, kImmlStrict, kMethods };
const char *const kMethodName[kMethods] = {"encoders + late fusion",
                                           "encoders + IMML conditional",
                                           "encoders + IMML strict"};

struct RunResult {
  double acc = 0, f1 = 0, acc_shuffled = 0;
  double seconds = 0; // training, the epochs alone
  double first_loss = 0, last_loss = 0;
  int p = -1; // IMML: the predominant modality
};

double macro_f1(const std::vector<int64_t> &y, const std::vector<int64_t> &pr) {
  double sum = 0.0;
  for (int c = 0; c < kClasses; c++) {
    double tp = 0, fp = 0, fn = 0;
    for (size_t i = 0; i < y.size(); i++) {
      tp += y[i] == c && pr[i] == c;
      fp += y[i] != c && pr[i] == c;
      fn += y[i] == c && pr[i] != c;
    }
    sum += tp > 0 ? 2 * tp / (2 * tp + fp + fn) : 0.0;
  }
  return sum / kClasses;
}

double accuracy(const std::vector<int64_t> &y, const std::vector<int64_t> &pr) {
  size_t ok = 0;
  for (size_t i = 0; i < y.size(); i++)
    ok += y[i] == pr[i];
  return static_cast<double>(ok) / static_cast<double>(y.size());
}

// Predicted classes of `rows`, batch by batch; `aux_perm` (or empty)
// replaces modality `aux`'s rows by those of the permuted rows.
template <class Logits>
std::vector<int64_t>
predict(Encoders &enc, const Tensors &t, const std::vector<int64_t> &rows,
        int aux, const std::vector<int64_t> &aux_perm, Logits logits) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> out;
  for (size_t s = 0; s < rows.size(); s += kBatch) {
    const size_t e = std::min(rows.size(), s + kBatch);
    const auto b = static_cast<std::ptrdiff_t>(s),
               f = static_cast<std::ptrdiff_t>(e);
    const torch::Tensor idx =
        torch::tensor(std::vector<int64_t>(rows.begin() + b, rows.begin() + f));
    torch::Tensor x[2] = {t.x[0].index_select(0, idx),
                          t.x[1].index_select(0, idx)};
    if (!aux_perm.empty())
      x[aux] = t.x[aux].index_select(
          0, torch::tensor(std::vector<int64_t>(aux_perm.begin() + b,
                                                aux_perm.begin() + f)));
    const torch::Tensor pr = logits(enc(x[0], x[1])).argmax(1);
    for (int64_t i = 0; i < pr.size(0); i++)
      out.push_back(pr[i].item<int64_t>());
  }
  return out;
}

struct Context {
  const Tensors *t;
  const Split *split;
  uint64_t seed;
  int epochs;
  int fou_dim;
  int p; // predominant modality for the shuffled test (-1: not known yet)
  bool check_gradients;
};

// Trains one method; `shuffle` is the seeded order of the test rows whose
// auxiliary modality replaces the true one in the shuffled test.
RunResult run(Method method, const Context &cx,
              const std::vector<int64_t> &shuffle) {
  const Tensors &t = *cx.t;
  torch::manual_seed(cx.seed); // the same encoders for every method
  Encoders enc(cx.fou_dim);
  LateFusion head{nullptr};
  std::unique_ptr<imml_torch::Model> model;
  std::vector<torch::Tensor> params = enc.parameters();
  if (method == kLateFusion) {
    head = LateFusion();
    for (const torch::Tensor &p : head->parameters())
      params.push_back(p);
  } else {
    const int dims[2] = {kEnc, kEnc};
    const imml_config cfg = make_config(
        dims, method == kImmlStrict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL,
        cx.seed);
    model.reset(new imml_torch::Model(cfg));
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
    oc.lr = kLr;
    oc.weight_decay = kWeightDecay;
    model->optim_setup(oc);
  }
  torch::optim::AdamW opt = make_adamw(params);

  RunResult r;
  std::vector<int64_t> order = cx.split->train;
  std::mt19937_64 rng(cx.seed * 0xD1B54A32D192ED03ull + 7);
  if (cx.check_gradients && model)
    grad_check(*model, enc, t, order, "before training, warm-up");
  const double t0 = now_seconds();
  for (int epoch = 0; epoch < cx.epochs; epoch++) {
    std::shuffle(order.begin(), order.end(), rng);
    double lsum = 0.0;
    for (size_t s = 0; s < order.size(); s += kBatch) {
      const size_t e = std::min(order.size(), s + kBatch);
      const torch::Tensor idx = torch::tensor(
          std::vector<int64_t>(order.begin() + static_cast<std::ptrdiff_t>(s),
                               order.begin() + static_cast<std::ptrdiff_t>(e)));
      const torch::Tensor y = t.y.index_select(0, idx);
      opt.zero_grad();
      const std::vector<torch::Tensor> h =
          enc(t.x[0].index_select(0, idx), t.x[1].index_select(0, idx));
      torch::Tensor loss;
      if (head) {
        loss =
            torch::nn::functional::cross_entropy(head->forward(h[0], h[1]), y);
        loss.backward();
      } else {
        loss = imml_torch::train_forward(*model, y, h).loss;
        loss.backward(); // imml_backward; dL/dh_m into the encoders
        model->commit(); // the step ends: dictionary push, warm-up
        model->optim_step();
      }
      opt.step();
      lsum += loss.item<double>() * static_cast<double>(e - s);
    }
    const double mean = lsum / static_cast<double>(order.size());
    if (epoch == 0)
      r.first_loss = mean;
    r.last_loss = mean;
  }
  r.seconds = now_seconds() - t0; // training alone
  int p = cx.p;
  if (model) {
    int fixed = 0;
    model->check(imml_predominant_get(model->get(), &r.p, &fixed),
                 "imml_predominant_get");
    if (!fixed) { // warm-up outlasted training: the EMAs' favourite
      float ema[2];
      model->check(imml_warmup_get(model->get(), nullptr, ema),
                   "imml_warmup_get");
      r.p = ema[1] > ema[0] ? 1 : 0;
    }
    if (p < 0)
      p = r.p;
    if (cx.check_gradients)
      grad_check(*model, enc, t, order,
                 std::string("after training, ") +
                     (fixed ? "front-door on" : "warm-up") + ", dict. " +
                     std::to_string(imml_fdc_dict_fill(model->get())));
  }
  auto logits = [&](const std::vector<torch::Tensor> &h) {
    return head ? head->forward(h[0], h[1])
                : imml_torch::eval_forward(*model, h);
  };
  std::vector<int64_t> y_test;
  for (int64_t i : cx.split->test)
    y_test.push_back(t.y[i].item<int64_t>());
  const std::vector<int64_t> pr =
      predict(enc, t, cx.split->test, 0, {}, logits);
  r.acc = accuracy(y_test, pr);
  r.f1 = macro_f1(y_test, pr);
  r.acc_shuffled =
      accuracy(y_test, predict(enc, t, cx.split->test, 1 - p, shuffle, logits));
  return r;
}

struct Stat {
  double sum = 0, sum2 = 0;
  int n = 0;
  void add(double v) {
    sum += v;
    sum2 += v * v;
    n++;
  }
  double mean() const { return n ? sum / n : NAN; }
  double sd() const {
    if (n < 2)
      return 0.0;
    const double m = sum / n, v = (sum2 - n * m * m) / (n - 1);
    return v > 0 ? std::sqrt(v) : 0.0;
  }
  std::string pm(double scale) const {
    char b[64];
    std::snprintf(b, sizeof b, "%.2f +- %.2f", scale * mean(), scale * sd());
    return b;
  }
};

int parse_int(const char *flag, const char *v, int lo) {
  char *end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end || x < lo || x > 1000000) {
    std::fprintf(stderr, "libtorch-host: %s: expected an integer >= %d\n", flag,
                 lo);
    std::exit(2);
  }
  return static_cast<int>(x);
}

} // namespace

int main(int argc, char **argv) {
  std::string dir;
  int seeds = 3, epochs = 12, threads = 0;
  double min_acc = 0.90;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--seeds" && i + 1 < argc)
      seeds = parse_int("--seeds", argv[++i], 1);
    else if (a == "--epochs" && i + 1 < argc)
      epochs = parse_int("--epochs", argv[++i], 2); // learning: first vs last
    else if (a == "--threads" && i + 1 < argc)
      threads = parse_int("--threads", argv[++i], 0);
    else if (a == "--inject-swapped-gradients")
      g_inject_swapped = true;
    else if (a == "--min-test-acc" && i + 1 < argc)
      min_acc = std::atof(argv[++i]);
    else if (a[0] != '-' && dir.empty())
      dir = a;
    else {
      std::fprintf(stderr,
                   "usage: libtorch-host DATA_DIR [--seeds N] [--epochs N] "
                   "[--threads N] [--min-test-acc A]\n");
      return 2;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: libtorch-host DATA_DIR [options]\n");
    return 2;
  }
  if (imml_version_number() != IMML_VERSION_NUMBER)
    fail("imml.h and the linked libimml differ in version");
  if (threads > 0) {
    torch::set_num_threads(threads);
    imml_threads_set(threads);
  }
  const double t_start = now_seconds();
  std::vector<int64_t> labels;
  const View views[2] = {load_view(dir, kViewNames[0], &labels),
                         load_view(dir, kViewNames[1], &labels)};
  if (views[0].dim != kRows * kCols)
    fail("mfeat-pix.csv has " + std::to_string(views[0].dim) +
         " features, expected 16 x 15 = 240");
  std::printf("libtorch-host: libimml %s, LibTorch %d.%d.%d, %d samples\n",
              imml_version_string(), TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
              TORCH_VERSION_PATCH, static_cast<int>(labels.size()));
  check_refusals();

  Stat acc[kMethods], f1[kMethods], shuf[kMethods], secs[kMethods];
  int chosen[2][2] = {{0, 0}, {0, 0}}; // [conditional/strict][p]
  std::vector<int> p_seed;
  for (int si = 0; si < seeds; si++) {
    const uint64_t seed = static_cast<uint64_t>(si);
    const Split split = split_stratified(labels, seed);
    const Tensors t = make_tensors(views, labels, split);
    std::vector<int64_t> shuffle = split.test;
    std::mt19937_64 srng(seed * 0xA0761D6478BD642Full + 3);
    std::shuffle(shuffle.begin(), shuffle.end(), srng);
    Context cx{&t, &split, seed, epochs, views[1].dim, -1, si == 0};
    // IMML first: its choice of p names the auxiliary modality of the
    // shuffled test for every method of this seed.
    const Method order[kMethods] = {kImmlConditional, kImmlStrict, kLateFusion};
    for (Method meth : order) {
      RunResult r = run(meth, cx, shuffle);
      cx.check_gradients = false;
      if (meth == kImmlConditional) {
        cx.p = r.p;
        p_seed.push_back(r.p);
      }
      if (meth != kLateFusion)
        chosen[meth == kImmlStrict][r.p]++;
      std::fprintf(stderr,
                   "[seed %d/%d] %-28s test %6.2f%%  macro-F1 %6.2f%%  aux "
                   "shuffled %6.2f%%  train loss %.3f -> %.3f  (%.1fs)\n",
                   si + 1, seeds, kMethodName[meth], 100 * r.acc, 100 * r.f1,
                   100 * r.acc_shuffled, r.first_loss, r.last_loss, r.seconds);
      if (!(r.last_loss < r.first_loss))
        fail(std::string(kMethodName[meth]) + ", seed " + std::to_string(si) +
             ": training does not learn (mean loss of the first epoch " +
             std::to_string(r.first_loss) + ", of the last " +
             std::to_string(r.last_loss) + ")");
      acc[meth].add(r.acc);
      f1[meth].add(r.f1);
      shuf[meth].add(r.acc_shuffled);
      secs[meth].add(r.seconds);
    }
  }

  std::printf("libtorch-host --compare: %d seed%s (0..%d), %d epochs, batch "
              "%d, H=%d, k=%d, J=%d, AdamW lr %g, test fraction %.2f\n",
              seeds, seeds == 1 ? "" : "s", seeds - 1, epochs, kBatch, kHidden,
              kKnowledge, kDict, static_cast<double>(kLr), kTestFraction);
  std::printf("modalities: 0=%s (%d features, CNN -> %d), 1=%s (%d "
              "features, MLP -> %d)\n",
              kViewNames[0], views[0].dim, kEnc, kViewNames[1], views[1].dim,
              kEnc);
  std::printf("predominant modality: chosen by IMML after %d warm-up steps; "
              "conditional runs chose",
              kWarmup);
  for (int m = 0; m < 2; m++)
    if (chosen[0][m])
      std::printf(" %s in %d/%d", kViewNames[m], chosen[0][m], seeds);
  std::printf(" seeds, strict runs chose");
  for (int m = 0; m < 2; m++)
    if (chosen[1][m])
      std::printf(" %s in %d/%d", kViewNames[m], chosen[1][m], seeds);
  std::printf(" seeds\n\n");
  std::printf("%-28s %-16s %-16s %-22s %s\n", "method", "test acc (%)",
              "macro-F1 (%)", "acc, aux shuffled (%)", "s/run");
  for (int m = 0; m < kMethods; m++)
    std::printf("%-28s %-16s %-16s %-22s %.1f\n", kMethodName[m],
                acc[m].pm(100).c_str(), f1[m].pm(100).c_str(),
                shuf[m].pm(100).c_str(), secs[m].mean());
  std::printf("(mean +- sample std over seeds; aux = the modality IMML "
              "conditional did not choose; total %.1fs)\n",
              now_seconds() - t_start);
  std::fflush(stdout);
  for (int m = 0; m < kMethods; m++)
    if (!(acc[m].mean() >= min_acc))
      fail(std::string(kMethodName[m]) + ": mean test accuracy " +
           std::to_string(acc[m].mean()) + " is below " +
           std::to_string(min_acc) + " (chance: 0.10)");
  return 0;
}
