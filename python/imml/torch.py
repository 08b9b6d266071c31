"""The torch layer: imml.torch.IMML, libimml as an nn.Module.

    import imml.torch
    head = imml.torch.IMML(dims=[64, 16], n_classes=10)
    out = head([h_image, h_text], labels)   # h_m = encoder_m(x_m), float32
    out.loss.backward()                      # dL/dh_m flows into the encoders

The module's training forward is a torch.autograd.Function over libimml:
its forward is imml_forward(IMML_MODE_TRAIN) and returns IMML's training
loss (ce + gamma1 * con + gamma2 * dis, a float64 scalar) and the F&T's
logits (not differentiable: the loss is computed inside the library); its
backward is imml_backward, which returns dL/dh_m to the encoders and adds
libimml's own parameter gradients to the library's gradient block.

**Parameters.**  libimml's parameters (m0.w1, ..., fdc.wq, ..., ft.b) are
registered as nn.Parameters named with '_' for '.' (m0_w1, ...) whose data
*and* .grad are tensors over the library's own memory, so any torch
optimiser updates them in place and libimml sees the update, with no copy
in either direction.  Their .grad stays attached: zero_grad() with
set_to_none=True (torch 2's default) is honoured at the next forward by
imml_grad_zero, which is also the fast way: gradients that torch zeroes in
place (torch 1.13's zero_grad() default) are not known to be zero to
libimml, whose next backward then accumulates through a staging buffer
(doc/PERFORMANCE.md, the Python boundary).  The module refuses to be moved
to another dtype or device: the library computes in float32 on the CPU.

**Where imml_commit and imml_optim_step fit.**  A libimml training step is
forward + backward per micro-batch, then imml_commit once (it pushes the
step's knowledge into the front-door dictionary and advances the warm-up),
then an optimiser update.  By default (auto_commit=True) the backward
commits at once: every loss.backward() is one whole step's gradients,
ready for any torch optimiser's step().  For gradient accumulation over K
micro-batches, create the module with auto_commit=False and call
module.commit() once after the K-th loss.backward(), before the
optimiser's step().  imml_optim_step (the library's own AdamW or SGD) is
optional: module.optim(...) attaches it and module.step() runs it on
libimml's parameters only (then zeroes their gradients); give the torch
optimiser the encoders' parameters alone in that case.
"""

import collections

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _lib
from ._model import ImmlError, Losses, Model  # noqa: F401 (re-exported)

__all__ = ["IMML", "Output", "ImmlError", "Losses"]

Output = collections.namedtuple("Output", "loss logits losses")
Output.__doc__ = """IMML.forward's result: loss (0-d float64 tensor, IMML's
training loss, differentiable in training mode; NaN without labels),
logits ((B, C) float32, not differentiable) and losses (imml.Losses of
Python floats)."""


def _check_features(model, features):
    """Checks M float32 CPU contiguous (B, d_m) tensors; fills the model's
    pointer array; returns B."""
    if not isinstance(features, (list, tuple)):
        raise TypeError("features must be a list of %d tensors (one per "
                        "modality), got %s"
                        % (model.n_modalities, type(features).__name__))
    if len(features) != model.n_modalities:
        raise ValueError("features has %d tensors, the model has %d "
                         "modalities" % (len(features), model.n_modalities))
    B = -1
    for m, x in enumerate(features):
        if not isinstance(x, torch.Tensor):
            raise TypeError("features[%d] must be a torch.Tensor, got %s"
                            % (m, type(x).__name__))
        if x.dtype != torch.float32:
            raise TypeError("features[%d] has dtype %s; libimml takes "
                            "torch.float32 (x.float())" % (m, x.dtype))
        if x.layout != torch.strided:
            raise TypeError("features[%d] has layout %s; libimml takes dense "
                            "tensors" % (m, x.layout))
        if x.device.type != "cpu":
            raise ValueError("features[%d] is on %s; libimml computes on the "
                             "CPU (x.cpu())" % (m, x.device))
        if x.dim() != 2 or x.shape[1] != model.dims[m]:
            raise ValueError("features[%d] has shape %s, expected "
                             "(batch, %d)"
                             % (m, tuple(x.shape), model.dims[m]))
        if B < 0:
            B = x.shape[0]
        elif x.shape[0] != B:
            raise ValueError("features[%d] has %d rows, features[0] has %d"
                             % (m, x.shape[0], B))
        if not x.is_contiguous():
            raise ValueError("features[%d] is not contiguous "
                             "(x.contiguous())" % m)
        model._xptrs[m] = x.data_ptr()
    if not 1 <= B <= model.max_batch:
        raise ValueError("batch of %d rows: must be 1..%d (max_batch)"
                         % (B, model.max_batch))
    return B


def _check_labels(model, labels, batch):
    """Labels: an integer CPU tensor (B,) in 0..C-1 -> a C-contiguous int32
    numpy array (a copy, or the tensor's own memory if it is one)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError("labels must be an integer torch.Tensor, got %s"
                        % type(labels).__name__)
    if labels.dtype not in _INT_DTYPES:
        raise TypeError("labels have dtype %s; expected an integer dtype "
                        "(torch.long)" % labels.dtype)
    if labels.device.type != "cpu":
        raise ValueError("labels are on %s; libimml computes on the CPU"
                         % labels.device)
    if tuple(labels.shape) != (batch,):
        raise ValueError("labels have shape %s, expected (%d,)"
                         % (tuple(labels.shape), batch))
    a = labels.numpy()
    if a.min() < 0 or a.max() >= model.n_classes:
        i = int(np.flatnonzero((a < 0) | (a >= model.n_classes))[0])
        raise ValueError("labels[%d] = %d is outside 0..%d (n_classes = %d)"
                         % (i, int(a[i]), model.n_classes - 1,
                            model.n_classes))
    return np.ascontiguousarray(a, dtype=np.intc)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8,
               torch.uint8)


class _IMMLFunction(torch.autograd.Function):
    """forward: imml_forward(TRAIN); backward: imml_backward (+ commit)."""

    @staticmethod
    def forward(ctx, head, labels, batch, *inputs):
        model = head.model
        # the pointers were checked and set by IMML.forward just before
        logits = torch.empty((batch, model.n_classes), dtype=torch.float32)
        losses = model._forward_raw(_lib.MODE_TRAIN, batch,
                                    labels.ctypes.data, logits.data_ptr())
        head._losses = losses
        ctx.head = head
        ctx.forward_id = model._train_forwards
        ctx.batch = batch
        ctx.mark_non_differentiable(logits)
        return torch.tensor(losses.total, dtype=torch.float64), logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logits):
        head = ctx.head
        model = head.model
        if (ctx.forward_id != model._train_forwards
                or head._done == ctx.forward_id):
            raise RuntimeError(
                "imml.torch.IMML: this output's training forward was "
                "followed by another one before its backward, or its "
                "backward already ran; libimml keeps one training forward "
                "at a time (call backward on each output before the next "
                "training forward)")
        M = model.n_modalities
        need = ctx.needs_input_grad[3:3 + M]
        dh = []
        for m in range(M):
            if need[m]:
                d = torch.empty((ctx.batch, model.dims[m]),
                                dtype=torch.float32)
                model._dptrs[m] = d.data_ptr()
            else:
                d = None
                model._dptrs[m] = None
            dh.append(d)
        # .grad may have been dropped since the forward
        # (optimizer.zero_grad(set_to_none=True) between forward and
        # backward): attach it again before the library writes into it
        head._attach()
        g = 1.0 if grad_loss is None else float(grad_loss)
        before = None
        if g != 1.0:
            before = model.flat()[1].copy()
        model._backward_raw(any(need))  # a refusal leaves it retryable
        head._done = ctx.forward_id
        if before is not None:
            # the library added dL/dtheta; the graph asks for g * dL/dtheta
            grad = model.flat()[1]
            grad -= before
            grad *= np.float32(g)
            grad += before
            for d in dh:
                if d is not None:
                    d.mul_(g)
        if head.auto_commit:
            model.commit()
        return (None, None, None) + tuple(dh) + (None,) * len(
            head._param_list)


class IMML(torch.nn.Module):
    """libimml (MDKEN + front-door adjustment + built-in F&T) as an
    nn.Module.

    IMML(dims=[d_0, ...], n_classes=C, auto_commit=True, **config) with
    imml.Model's config keys; or IMML(model=imml.Model.load(path)).

    forward(features, labels=None) takes M float32 CPU contiguous tensors
    (B, d_m), B <= max_batch, and integer labels (B,) in 0..C-1 (required
    in training mode), and returns Output(loss, logits, losses).  In
    training mode the loss is differentiable with respect to the features
    (dL/dh_m from imml_backward) and libimml's parameters (their .grad over
    the library's memory); in eval mode (module.eval()) it is an
    evaluation forward that changes nothing.
    """

    def __init__(self, dims=None, n_classes=None, *, auto_commit=True,
                 model=None, **config):
        super().__init__()
        if model is None:
            if dims is None or n_classes is None:
                raise TypeError("IMML needs dims and n_classes, or model")
            model = Model(dims, n_classes, **config)
        elif not isinstance(model, Model):
            raise TypeError("model must be an imml.Model, got %s"
                            % type(model).__name__)
        elif dims is not None or n_classes is not None or config:
            raise TypeError("give either model or dims/n_classes/config")
        self.model = model
        self.auto_commit = bool(auto_commit)
        self._done = None
        self._losses = None
        self._lib_names = []
        # (parameter, library data view, its address, grad view, address)
        self._pairs = []
        for name, p in model.params().items():
            param = torch.nn.Parameter(torch.from_numpy(p.data))
            param.grad = torch.from_numpy(p.grad)
            self.register_parameter(name.replace(".", "_"), param)
            self._lib_names.append(name)
            self._pairs.append((param, p.data, p.data.ctypes.data, p.grad,
                                p.grad.ctypes.data))
        self._param_list = [p[0] for p in self._pairs]

    @classmethod
    def load(cls, path, *, auto_commit=True, memory_limit=None):
        """A module over a checkpoint file (imml_model_load)."""
        return cls(model=Model.load(path, memory_limit=memory_limit),
                   auto_commit=auto_commit)

    def save(self, path):
        """Writes the checkpoint (imml_model_save); refused while a step's
        micro-batches are not committed."""
        self.model.save(path)

    def extra_repr(self):
        return "dims=%s, n_classes=%d, auto_commit=%s" % (
            list(self.model.dims), self.model.n_classes, self.auto_commit)

    def named_library_parameters(self):
        """(libimml name, nn.Parameter) pairs: ("m0.w1", m0_w1), ..."""
        return list(zip(self._lib_names, self._param_list))

    # -- keeping the tensors on the library's memory ------------------

    def _apply(self, fn, *args, **kwargs):
        moved = False
        for param in self._param_list:
            t = fn(param)
            moved = moved or t is not param and (
                t.data_ptr() != param.data_ptr() or t.dtype != param.dtype
                or t.device != param.device)
        # an in-place move (share_memory_) changes the pointer of the
        # parameter itself: put every parameter back on the library memory
        moved = self._attach() or moved
        if moved:
            raise ValueError(
                "imml.torch.IMML's parameters live in libimml's float32 "
                "CPU memory and cannot be converted or moved (move the "
                "encoders, not this module)")
        return self

    def zero_grad(self, set_to_none=False):
        """Zeroes libimml's gradients (imml_grad_zero); the .grad tensors
        stay attached to the library's memory whatever set_to_none is."""
        self._attach()
        self.model.grad_zero()

    def _attach(self):
        """Re-attaches .data and .grad to the library's memory if a caller
        replaced them (optimizer.zero_grad(set_to_none=True) sets .grad to
        None, meaning zero).  Returns True if a .data had moved."""
        moved = False
        dropped = 0
        for param, data, data_addr, grad, grad_addr in self._pairs:
            if param.data_ptr() != data_addr:
                moved = True
                with torch.no_grad():
                    torch.from_numpy(data).copy_(param.data)
                param.data = torch.from_numpy(data)
            g = param.grad
            if g is None:
                dropped += 1
            elif g.data_ptr() != grad_addr:
                with torch.no_grad():
                    torch.from_numpy(grad).copy_(g)
                param.grad = torch.from_numpy(grad)
        if dropped:
            if dropped == len(self._pairs):
                self.model.grad_zero()
            for param, _, _, grad, _ in self._pairs:
                if param.grad is None:
                    if dropped != len(self._pairs):
                        grad[...] = 0
                    param.grad = torch.from_numpy(grad)
        return moved

    # -- forward ------------------------------------------------------

    def forward(self, features, labels=None):
        model = self.model
        B = _check_features(model, features)
        if self.training:
            if labels is None:
                raise ValueError("a training forward needs labels "
                                 "(module.eval() for evaluation)")
            lab = _check_labels(model, labels, B)
            self._attach()
            loss, logits = _IMMLFunction.apply(self, lab, B, *features,
                                               *self._param_list)
            return Output(loss, logits, self._losses)
        lab_addr = None
        if labels is not None:
            lab = _check_labels(model, labels, B)
            lab_addr = lab.ctypes.data
        logits = torch.empty((B, model.n_classes), dtype=torch.float32)
        losses = model._forward_raw(_lib.MODE_EVAL, B, lab_addr,
                                    logits.data_ptr())
        return Output(torch.tensor(losses.total, dtype=torch.float64),
                      logits, losses)

    # -- the step -----------------------------------------------------

    def commit(self):
        """imml_commit: ends a step of several micro-batches (only with
        auto_commit=False)."""
        self.model.commit()

    def optim(self, kind="adamw", **options):
        """Attaches libimml's own optimiser to libimml's parameters
        (imml_optim_setup); see imml.Model.optim."""
        self.model.optim(kind, **options)

    def step(self):
        """imml_optim_step: updates libimml's parameters with the library's
        optimiser, then zeroes their gradients."""
        self.model.step()

    @torch.no_grad()
    def predict(self, features):
        """Classes (N,) int64 and probabilities (N, C) for any N rows of
        float32 CPU tensors, in batches of max_batch (imml_predict)."""
        model = self.model
        if not isinstance(features, (list, tuple)):
            raise TypeError("features must be a list of tensors")
        arrays = []
        for m, x in enumerate(features):
            if not isinstance(x, torch.Tensor):
                raise TypeError("features[%d] must be a torch.Tensor, got %s"
                                % (m, type(x).__name__))
            if x.device.type != "cpu":
                raise ValueError("features[%d] is on %s; libimml computes on "
                                 "the CPU (x.cpu())" % (m, x.device))
            if x.dtype != torch.float32:
                raise TypeError("features[%d] has dtype %s; libimml takes "
                                "torch.float32 (x.float())" % (m, x.dtype))
            arrays.append(x.detach().numpy())
        pred = model.predict(arrays)
        return (torch.from_numpy(pred.classes.astype(np.int64)),
                torch.from_numpy(pred.probs))
