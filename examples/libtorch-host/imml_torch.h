// imml_torch.h: libimml inside a LibTorch model, as a
// torch::autograd::Function (header only, public API only).
//
//   h_m = encoder_m(x_m)                       (the host's torch modules)
//   auto out = imml_torch::train_forward(model, labels, {h_0, ..., h_M-1});
//   out.loss.backward();   // imml_backward: libimml's parameter gradients
//                          // accumulate in the library, dL/dh_m flows on
//                          // into the encoders' gradients
//   model.commit();        // imml_commit: ends the training step
//   model.optim_step();    // imml_optim_step: updates libimml's parameters
//   encoder_optimizer.step();
//
// The forward runs imml_forward(IMML_MODE_TRAIN) and returns the training
// objective L = CE + gamma1 L_con + gamma2 L_dis as a 0-dim float tensor and
// the F&T logits (not differentiable).  Its backward runs imml_backward()
// and returns dL/dh_m for every h_m that requires a gradient.
//
// Rules the Function enforces (each violation throws with the reason):
// - libimml keeps one pending training forward per model: a graph's
//   backward must run before the next training forward on that model, and
//   only once;
// - imml_backward() has no loss scale: the gradient reaching the loss must
//   be exactly 1, so back-propagate the loss itself, or a sum that holds it
//   once (imml's loss + a host loss), not a multiple of it;
// - h_m are CPU float32 matrices B x d_m, 1 <= B <= max_batch; labels are
//   B integers (int64 or int32) in 0..C-1.
#ifndef IMML_TORCH_H
#define IMML_TORCH_H

#include <imml.h>

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace imml_torch {

// A failed libimml call: the status and the handle's message.
class Error : public std::runtime_error {
public:
  Error(imml_status status, const std::string &what)
      : std::runtime_error(what), status_(status) {}
  imml_status status() const { return status_; }

private:
  imml_status status_;
};

// Owns one libimml model (built-in F&T) and the host-side state of the
// autograd Function: which training forward is pending, and the labels
// converted to int.
class Model {
public:
  explicit Model(const imml_config &cfg) {
    imml_model *m = nullptr;
    const imml_status st = imml_model_create(&cfg, nullptr, &m);
    adopt(st, m, "imml_model_create");
  }

  // A deep copy (parameters, dictionary, warm-up and optimiser state)
  // through a checkpoint in memory: refused while a micro-batch is not
  // committed.
  std::unique_ptr<Model> clone() const {
    size_t size = 0;
    check(imml_model_save_mem(m_, nullptr, 0, &size), "imml_model_save_mem");
    std::vector<unsigned char> buf(size);
    check(imml_model_save_mem(m_, buf.data(), size, &size),
          "imml_model_save_mem");
    imml_model *m = nullptr;
    const imml_status st =
        imml_model_load_mem(buf.data(), size, nullptr, nullptr, &m);
    std::unique_ptr<Model> c(new Model());
    c->adopt(st, m, "imml_model_load_mem");
    return c;
  }
  ~Model() { imml_model_free(m_); }
  Model(const Model &) = delete;
  Model &operator=(const Model &) = delete;

  imml_model *get() const { return m_; }
  int n_modalities() const { return static_cast<int>(dims_.size()); }
  int dim(int m) const { return dims_[static_cast<size_t>(m)]; }
  int n_classes() const { return n_classes_; }
  int max_batch() const { return max_batch_; }

  // Throws Error(st, "CALL: status: message") unless st is IMML_OK.
  void check(imml_status st, const char *call) const {
    if (st != IMML_OK)
      throw Error(st, std::string(call) + ": " + imml_status_string(st) + ": " +
                          imml_model_errmsg(m_));
  }

  void optim_setup(const imml_optim_config &cfg) {
    check(imml_optim_setup(m_, &cfg), "imml_optim_setup");
  }
  void set_lr(float lr) {
    check(imml_optim_set_lr(m_, lr), "imml_optim_set_lr");
  }
  // Ends the training step (dictionary push, warm-up); then update.
  void commit() { check(imml_commit(m_), "imml_commit"); }
  void optim_step() { check(imml_optim_step(m_), "imml_optim_step"); }

  // The loss terms of the last training forward.
  const imml_losses &last_losses() const { return last_; }

  // --- used by the Function and the evaluation helpers -------------------

  // Checks h against the model (count, device, dtype, shape) and returns
  // contiguous float32 views with their row count.
  std::vector<torch::Tensor> features(torch::TensorList h, int *batch) const {
    if (static_cast<int>(h.size()) != n_modalities())
      throw std::invalid_argument("imml_torch: " + std::to_string(h.size()) +
                                  " feature tensors given, the model has " +
                                  std::to_string(n_modalities()) +
                                  " modalities");
    std::vector<torch::Tensor> out;
    out.reserve(h.size());
    for (int m = 0; m < n_modalities(); m++) {
      const torch::Tensor &t = h[static_cast<size_t>(m)];
      const std::string name = "imml_torch: h[" + std::to_string(m) + "]";
      if (!t.defined())
        throw std::invalid_argument(name + " is undefined");
      if (!t.device().is_cpu())
        throw std::invalid_argument(name + " is on " + t.device().str() +
                                    ": libimml runs on the CPU");
      if (t.scalar_type() != torch::kFloat)
        throw std::invalid_argument(name + " has dtype " +
                                    std::string(toString(t.scalar_type())) +
                                    ", libimml takes float32");
      if (t.dim() != 2 || t.size(1) != dim(m))
        throw std::invalid_argument(name + " has shape " + shape_string(t) +
                                    ", expected B x " + std::to_string(dim(m)));
      if (m > 0 && t.size(0) != out[0].size(0))
        throw std::invalid_argument(name + " has " + std::to_string(t.size(0)) +
                                    " rows, h[0] has " +
                                    std::to_string(out[0].size(0)));
      out.push_back(t.contiguous());
    }
    const int64_t b = out[0].size(0);
    if (b < 1 || b > max_batch_)
      throw std::invalid_argument("imml_torch: batch of " + std::to_string(b) +
                                  " rows, the model takes 1.." +
                                  std::to_string(max_batch_));
    *batch = static_cast<int>(b);
    return out;
  }

  // Copies B labels (int64 or int32, any shape of B elements) into the
  // model's int buffer; the library checks their range.
  const int *labels(const torch::Tensor &y, int batch) {
    if (!y.defined() || !y.device().is_cpu() ||
        (y.scalar_type() != torch::kLong && y.scalar_type() != torch::kInt) ||
        y.numel() != batch)
      throw std::invalid_argument(
          "imml_torch: labels must be " + std::to_string(batch) +
          " CPU int64 or int32 values (got " +
          (y.defined()
               ? shape_string(y) + " " + std::string(toString(y.scalar_type()))
               : std::string("undefined")) +
          ")");
    const torch::Tensor yi = y.to(torch::kInt).contiguous().view({-1});
    const int32_t *p = yi.data_ptr<int32_t>();
    for (int i = 0; i < batch; i++)
      labels_[static_cast<size_t>(i)] = p[i];
    return labels_.data();
  }

  uint64_t begin_forward(const imml_losses &l) {
    last_ = l;
    pending_ = ++forward_count_;
    return pending_;
  }
  bool is_pending(uint64_t id) const { return id != 0 && pending_ == id; }
  void end_backward() { pending_ = 0; }

private:
  Model() = default;

  // Takes the handle a create or load returned; a failed one holds only
  // the message: read it, free the handle, throw.
  void adopt(imml_status st, imml_model *m, const char *call) {
    imml_config got;
    imml_config_init(&got);
    if (st == IMML_OK) {
      st = imml_model_get_config(m, &got);
      call = "imml_model_get_config";
    }
    if (st != IMML_OK) {
      const std::string msg = std::string(call) + ": " +
                              imml_status_string(st) + ": " +
                              imml_model_errmsg(m);
      imml_model_free(m);
      throw Error(st, msg);
    }
    m_ = m;
    dims_.assign(got.dims, got.dims + got.n_modalities);
    n_classes_ = got.n_classes;
    max_batch_ = got.max_batch;
    labels_.resize(static_cast<size_t>(max_batch_));
  }

  static std::string shape_string(const torch::Tensor &t) {
    std::string s = "[";
    for (int64_t i = 0; i < t.dim(); i++)
      s += (i ? ", " : "") + std::to_string(t.size(i));
    return s + "]";
  }

  imml_model *m_ = nullptr;
  std::vector<int> dims_;
  int n_classes_ = 0, max_batch_ = 0;
  std::vector<int> labels_;
  imml_losses last_{};
  uint64_t forward_count_ = 0, pending_ = 0;
};

// The autograd Function.  Inputs: the model (not a tensor), the labels, the
// M feature tensors; outputs: {loss, logits}.
class ImmlFunction : public torch::autograd::Function<ImmlFunction> {
public:
  static torch::autograd::variable_list
  forward(torch::autograd::AutogradContext *ctx, Model *model,
          const torch::Tensor &labels, torch::TensorList h) {
    int batch = 0;
    const std::vector<torch::Tensor> hc = model->features(h, &batch);
    const int *y = model->labels(labels, batch);
    std::vector<const float *> ptr;
    for (const torch::Tensor &t : hc)
      ptr.push_back(t.data_ptr<float>());
    torch::Tensor logits = torch::empty({batch, model->n_classes()});
    imml_losses l;
    model->check(imml_forward(model->get(), IMML_MODE_TRAIN, batch, ptr.data(),
                              y, logits.data_ptr<float>(), &l),
                 "imml_forward");
    const uint64_t id = model->begin_forward(l);
    ctx->saved_data["model"] =
        static_cast<int64_t>(reinterpret_cast<intptr_t>(model));
    ctx->saved_data["forward"] = static_cast<int64_t>(id);
    ctx->saved_data["batch"] = static_cast<int64_t>(batch);
    ctx->mark_non_differentiable({logits});
    ctx->set_materialize_grads(false);
    return {torch::scalar_tensor(l.total, torch::kFloat), logits};
  }

  static torch::autograd::variable_list
  backward(torch::autograd::AutogradContext *ctx,
           torch::autograd::variable_list grad) {
    Model *model = reinterpret_cast<Model *>(
        static_cast<intptr_t>(ctx->saved_data["model"].toInt()));
    const uint64_t id =
        static_cast<uint64_t>(ctx->saved_data["forward"].toInt());
    const int batch = static_cast<int>(ctx->saved_data["batch"].toInt());
    const int M = model->n_modalities();
    // One undefined gradient for the model and the labels each.
    torch::autograd::variable_list out(static_cast<size_t>(2 + M));
    if (!grad[0].defined())
      return out; // the loss did not reach the objective
    if (!model->is_pending(id))
      throw std::logic_error(
          "imml_torch: this graph's training forward is no longer pending in "
          "libimml (another training forward ran on the model after it, or "
          "its backward already ran): run each backward before the next "
          "training forward, once");
    const double g = grad[0].item<double>();
    if (g != 1.0)
      throw std::logic_error(
          "imml_torch: the gradient reaching libimml's loss is " +
          std::to_string(g) +
          ", not 1: imml_backward() computes the gradients of libimml's own "
          "loss, unscaled; back-propagate the loss itself, or a sum that "
          "holds it once");
    std::vector<float *> dptr(static_cast<size_t>(M), nullptr);
    for (int m = 0; m < M; m++) {
      // edges: 0 = labels, 1 + m = h_m
      if (!ctx->needs_input_grad(static_cast<size_t>(1 + m)))
        continue;
      out[static_cast<size_t>(2 + m)] = torch::empty({batch, model->dim(m)});
      dptr[static_cast<size_t>(m)] =
          out[static_cast<size_t>(2 + m)].data_ptr<float>();
    }
    model->check(imml_backward(model->get(), dptr.data()), "imml_backward");
    model->end_backward();
    return out;
  }
};

// The result of a training forward.
struct TrainOutput {
  torch::Tensor loss;   // 0-dim float32, differentiable w.r.t. every h_m
  torch::Tensor logits; // B x C, not differentiable
};

inline TrainOutput train_forward(Model &model, const torch::Tensor &labels,
                                 const std::vector<torch::Tensor> &h) {
  torch::autograd::variable_list r =
      ImmlFunction::apply(&model, labels, torch::TensorList(h));
  return {r[0], r[1]};
}

// An evaluation forward (never changes the model; may run between a
// training forward and its backward).  With labels, *loss receives the
// objective (in double, as the library sums it).  Returns the logits.
inline torch::Tensor eval_forward(Model &model,
                                  const std::vector<torch::Tensor> &h,
                                  const torch::Tensor &labels = {},
                                  double *loss = nullptr) {
  torch::NoGradGuard no_grad;
  int batch = 0;
  const std::vector<torch::Tensor> hc = model.features(h, &batch);
  const int *y = labels.defined() ? model.labels(labels, batch) : nullptr;
  std::vector<const float *> ptr;
  for (const torch::Tensor &t : hc)
    ptr.push_back(t.data_ptr<float>());
  torch::Tensor logits = torch::empty({batch, model.n_classes()});
  imml_losses l;
  model.check(imml_forward(model.get(), IMML_MODE_EVAL, batch, ptr.data(), y,
                           logits.data_ptr<float>(), &l),
              "imml_forward (eval)");
  if (loss)
    *loss = l.total;
  return logits;
}

} // namespace imml_torch

#endif
