"""The numpy layer: imml.Model, a libimml model handle.

Every array crosses into the library without a copy, so every argument is
checked here, before the C call, and refused with TypeError (wrong type or
dtype) or ValueError (wrong shape, layout or value) instead of being
converted silently.  A refused C call raises ImmlError carrying the
library's own message (imml_model_errmsg).
"""

import collections
import ctypes
import numbers
import os
import weakref

import numpy as np

from . import _lib
from ._lib import lib

Losses = collections.namedtuple("Losses", "total ce con dis")
Losses.__doc__ = """Loss terms of one forward (doc/METHOD.md section 4), in
double: total = ce + gamma1 * con + gamma2 * dis; NaN without labels."""

Prediction = collections.namedtuple("Prediction", "classes probs logits")
Prediction.__doc__ = """imml.Model.predict's result: classes (N,) int32,
probs and logits (N, C) float32."""


class Param(collections.namedtuple("Param", "name data grad")):
    """One named parameter tensor: data and grad are (rows, cols) float32
    numpy arrays over the library's own memory (rows = 1 for a bias).
    Writing into them writes the model; they keep the model alive."""
    __slots__ = ()


class ImmlError(RuntimeError):
    """A libimml call returned a status other than IMML_OK.

    Attributes: call (the C function), status (the imml_status number),
    status_name ("IMML_ERR_SHAPE", ...), message (imml_model_errmsg)."""

    def __init__(self, call, status, message):
        self.call = call
        self.status = status
        self.status_name = _lib.STATUS_NAMES.get(status, "IMML_ERR_%d" % status)
        self.message = message
        super().__init__("%s: %s (%s): %s" % (
            call, self.status_name,
            lib.imml_status_string(status).decode(), message))


def version():
    """The version string of the loaded libimml ("1.0.0")."""
    return lib.imml_version_string().decode()


def library_path():
    """The path of the libimml this package loaded."""
    return lib.path


def set_threads(n):
    """Experimental (imml_threads_set): sets the BLAS's thread count
    (process-wide) when that BLAS supports it; n <= 0 only asks.  Returns
    the count in effect, or 0 if unknown."""
    return lib.imml_threads_set(_int_arg("n", n))


_INT_MIN, _INT_MAX = -(2 ** 31), 2 ** 31 - 1
_SIZE_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1
_SLOT_MODES = {"conditional": 0, "strict": 1}
_PRECISIONS = {"fp32": 0, "bf16": 1}
_OPTIMS = {"sgd": _lib.OPTIM_SGD, "adamw": _lib.OPTIM_ADAMW}
_INT_KEYS = ("hidden_dim", "knowledge_dim", "max_batch", "dict_size",
             "warmup_steps")
_FLOAT_KEYS = ("beta", "gamma1", "gamma2", "tau")
CONFIG_KEYS = _INT_KEYS + _FLOAT_KEYS + ("predominant", "slot_mode", "seed",
                                         "precision", "memory_limit")
OPTIM_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "beta1", "beta2",
              "eps", "clip_norm")

# Room for the struct of a newer library: its *_init() writes its own
# sizeof, and we then declare ours (an older header's) in struct_size.
_STRUCT_SLACK = 1024


def _new_struct(cls, init, *args):
    buf = ctypes.create_string_buffer(ctypes.sizeof(cls) + _STRUCT_SLACK)
    init(ctypes.addressof(buf), *args)
    s = cls.from_buffer_copy(buf)
    s.struct_size = ctypes.sizeof(cls)
    return s


def _int_arg(what, v, lo=_INT_MIN, hi=_INT_MAX):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError("%s must be an int, got %s" % (what, type(v).__name__))
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError("%s = %d is outside %d..%d" % (what, v, lo, hi))
    return v


def _float_arg(what, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError("%s must be a number, got %s" % (what,
                                                          type(v).__name__))
    return float(v)


def _choice_arg(what, v, names):
    if isinstance(v, str):
        if v not in names:
            raise ValueError("%s = %r: expected one of %s" % (
                what, v, ", ".join(sorted(names))))
        return names[v]
    return _int_arg(what, v)


class _Memory:
    """Exposes library memory to numpy, keeping its owner alive."""
    __slots__ = ("__array_interface__", "owner")

    def __init__(self, owner, addr, shape, typestr="<f4"):
        self.owner = owner
        self.__array_interface__ = {"data": (addr, False), "shape": shape,
                                    "typestr": typestr, "version": 3}


def _array_over(owner, addr, shape):
    return np.asarray(_Memory(owner, addr, shape))


def _check_labels(labels, batch, n_classes):
    """numpy labels -> a C-contiguous int32 array, or an exception."""
    if not isinstance(labels, np.ndarray):
        raise TypeError("labels must be a numpy integer array, got %s"
                        % type(labels).__name__)
    if labels.dtype.kind not in "iu":
        raise TypeError("labels must have an integer dtype, got %s"
                        % labels.dtype)
    if labels.shape != (batch,):
        raise ValueError("labels have shape %s, expected (%d,)"
                         % (labels.shape, batch))
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError("labels[%d] = %d is outside 0..%d (n_classes = %d)"
                         % (i, int(labels[i]), n_classes - 1, n_classes))
    if labels.dtype != np.intc or not labels.flags.c_contiguous:
        labels = np.ascontiguousarray(labels, dtype=np.intc)
    return labels


class Model:
    """A libimml model: MDKEN + front-door adjustment + the built-in F&T.

    Model(dims=[d_0, ..., d_{M-1}], n_classes=C, **config), config keys as
    imml_config's fields: hidden_dim, knowledge_dim, max_batch, dict_size,
    beta, gamma1, gamma2, tau, predominant (None or -1: chosen after the
    warm-up), warmup_steps, slot_mode ("conditional" or "strict"), seed,
    precision ("fp32" or "bf16"), memory_limit (bytes).  Unset keys keep
    doc/METHOD.md's defaults (imml_config_init).

    A training step is forward(train=True) + backward() per micro-batch,
    then commit() once, then step() (the library's optimiser, set up with
    optim()) or any optimiser of your own writing into params().
    train_step() does the four for one batch.

    Features are lists of M float32, C-contiguous numpy arrays (B, d_m);
    labels an integer array (B,) in 0..C-1.  They are passed to the library
    without a copy.  The memory is released when the model and every array
    viewing it (params(), flat()) are gone.
    """

    def __init__(self, dims, n_classes, **config):
        if isinstance(dims, (str, bytes)) or not hasattr(dims, "__len__"):
            raise TypeError("dims must be a sequence of M ints, got %s"
                            % type(dims).__name__)
        dims = [_int_arg("dims[%d]" % i, d) for i, d in enumerate(dims)]
        n_classes = _int_arg("n_classes", n_classes)
        fields = []  # every value is checked before the first C call
        for key, value in config.items():
            if key in _INT_KEYS:
                value = _int_arg(key, value)
            elif key in _FLOAT_KEYS:
                value = _float_arg(key, value)
            elif key == "predominant":
                value = -1 if value is None else _int_arg(key, value)
            elif key == "slot_mode":
                value = _choice_arg(key, value, _SLOT_MODES)
            elif key == "precision":
                value = _choice_arg(key, value, _PRECISIONS)
            elif key == "seed":
                value = _int_arg(key, value, 0, 2 ** 64 - 1)
            elif key == "memory_limit":
                value = _int_arg(key, value, 0, _SIZE_MAX)
            else:
                raise TypeError("unknown config key %r (known: %s)"
                                % (key, ", ".join(CONFIG_KEYS)))
            fields.append((key, value))
        cfg = _new_struct(_lib.Config, lib.imml_config_init)
        dims_arr = (ctypes.c_int * max(len(dims), 1))(*dims)
        cfg.n_modalities = len(dims)
        cfg.dims = ctypes.cast(dims_arr, ctypes.POINTER(ctypes.c_int))
        cfg.n_classes = n_classes
        for key, value in fields:
            setattr(cfg, key, value)
        handle = ctypes.c_void_p()
        st = lib.imml_model_create(ctypes.addressof(cfg), None,
                                   ctypes.addressof(handle))
        self._adopt(handle, st, "imml_model_create")

    # -- construction -------------------------------------------------

    def _adopt(self, handle, st, call):
        h = handle.value
        if not h:
            raise MemoryError("%s: out of memory (no handle returned)" % call)
        if st != 0:
            msg = lib.imml_model_errmsg(h).decode(errors="replace")
            lib.imml_model_free(h)
            raise ImmlError(call, st, msg)
        self._h = h
        self._finalizer = weakref.finalize(self, lib.imml_model_free, h)
        # struct_size tells the library how much of the config we can take
        cfg = _new_struct(_lib.Config, lib.imml_config_init)
        self._check(lib.imml_model_get_config(h, ctypes.addressof(cfg)),
                    "imml_model_get_config")
        self.n_modalities = cfg.n_modalities
        self.dims = tuple(cfg.dims[i] for i in range(cfg.n_modalities))
        self.n_classes = cfg.n_classes
        self.max_batch = cfg.max_batch
        self.knowledge_dim = cfg.knowledge_dim
        self._config = {f: getattr(cfg, f) for f, _ in _lib.Config._fields_
                        if f not in ("struct_size", "dims", "allocator")}
        self._config["dims"] = self.dims
        M = self.n_modalities
        self._xptrs = (ctypes.c_void_p * M)()
        self._dptrs = (ctypes.c_void_p * M)()
        self._xptrs_addr = ctypes.addressof(self._xptrs)
        self._dptrs_addr = ctypes.addressof(self._dptrs)
        self._closs = _lib.Losses()
        self._closs_addr = ctypes.addressof(self._closs)
        self._train_batch = 0
        self._train_forwards = 0  # lets imml.torch tell its forward's own

    @classmethod
    def _from_handle(cls, handle, st, call):
        self = cls.__new__(cls)
        self._adopt(handle, st, call)
        return self

    @staticmethod
    def _load_options(memory_limit):
        if memory_limit is not None:
            memory_limit = _int_arg("memory_limit", memory_limit, 0,
                                    _SIZE_MAX)
        opt = _new_struct(_lib.LoadOptions, lib.imml_load_options_init)
        if memory_limit is not None:
            opt.memory_limit = memory_limit
        return opt

    @classmethod
    def load(cls, path, *, memory_limit=None):
        """Loads a checkpoint file (imml_model_load), e.g. one written by
        imml-train --save.  Raises ImmlError naming what is wrong."""
        opt = cls._load_options(memory_limit)
        handle = ctypes.c_void_p()
        st = lib.imml_model_load(os.fsencode(path), None,
                                 ctypes.addressof(opt),
                                 ctypes.addressof(handle))
        return cls._from_handle(handle, st, "imml_model_load")

    @classmethod
    def from_bytes(cls, data, *, memory_limit=None):
        """Loads a checkpoint from bytes (imml_model_load_mem)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes, got %s" % type(data).__name__)
        data = bytes(data)
        opt = cls._load_options(memory_limit)
        handle = ctypes.c_void_p()
        st = lib.imml_model_load_mem(data, len(data), None,
                                     ctypes.addressof(opt),
                                     ctypes.addressof(handle))
        return cls._from_handle(handle, st, "imml_model_load_mem")

    def __repr__(self):
        p, fixed = self._predominant()
        return ("imml.Model(dims=%s, n_classes=%d, hidden_dim=%d, "
                "knowledge_dim=%d, max_batch=%d, predominant=%s)"
                % (list(self.dims), self.n_classes, self._config["hidden_dim"],
                   self.knowledge_dim, self.max_batch,
                   p if fixed else "not fixed"))

    # -- errors -------------------------------------------------------

    def _check(self, st, call):
        if st != 0:
            raise ImmlError(call, st, lib.imml_model_errmsg(self._h).decode(
                errors="replace"))

    @property
    def config(self):
        """The model's configuration as a dict (imml_model_get_config)."""
        return dict(self._config)

    # -- argument checks ----------------------------------------------

    def _features(self, features, max_rows):
        """Checks M float32 C-contiguous (B, d_m) arrays; fills the pointer
        array; returns B."""
        if not isinstance(features, (list, tuple)):
            raise TypeError("features must be a list of %d arrays (one per "
                            "modality), got %s"
                            % (self.n_modalities, type(features).__name__))
        if len(features) != self.n_modalities:
            raise ValueError("features has %d arrays, the model has %d "
                             "modalities" % (len(features), self.n_modalities))
        B = -1
        for m, x in enumerate(features):
            if not isinstance(x, np.ndarray):
                raise TypeError("features[%d] must be a numpy array, got %s"
                                % (m, type(x).__name__))
            if x.dtype != np.float32:
                raise TypeError("features[%d] has dtype %s; libimml takes "
                                "float32 (x.astype(np.float32))"
                                % (m, x.dtype))
            if x.ndim != 2 or x.shape[1] != self.dims[m]:
                raise ValueError("features[%d] has shape %s, expected "
                                 "(batch, %d)" % (m, x.shape, self.dims[m]))
            if B < 0:
                B = x.shape[0]
            elif x.shape[0] != B:
                raise ValueError("features[%d] has %d rows, features[0] has "
                                 "%d" % (m, x.shape[0], B))
            if not (x.flags.c_contiguous and x.flags.aligned):
                raise ValueError("features[%d] is not a C-contiguous array "
                                 "(np.ascontiguousarray(x))" % m)
            self._xptrs[m] = x.ctypes.data
        if not 1 <= B <= max_rows:
            raise ValueError("batch of %d rows: must be 1..%d%s" % (
                B, max_rows, " (max_batch)" if max_rows == self.max_batch
                else ""))
        return B

    def _outputs(self, out, batch):
        """dL/dh outputs: None (allocate), or M entries None or float32
        C-contiguous writable (batch, d_m) arrays.  Fills the pointers."""
        if out is None:
            out = [np.empty((batch, d), np.float32) for d in self.dims]
        elif not isinstance(out, (list, tuple)):
            raise TypeError("out must be a list of %d arrays or None"
                            % self.n_modalities)
        elif len(out) != self.n_modalities:
            raise ValueError("out has %d entries, the model has %d "
                             "modalities" % (len(out), self.n_modalities))
        for m, x in enumerate(out):
            if x is None:
                self._dptrs[m] = None
                continue
            if not isinstance(x, np.ndarray):
                raise TypeError("out[%d] must be a numpy array or None" % m)
            if x.dtype != np.float32:
                raise TypeError("out[%d] has dtype %s, expected float32"
                                % (m, x.dtype))
            if x.shape != (batch, self.dims[m]):
                raise ValueError("out[%d] has shape %s, expected (%d, %d)"
                                 % (m, x.shape, batch, self.dims[m]))
            if not (x.flags.c_contiguous and x.flags.aligned
                    and x.flags.writeable):
                raise ValueError("out[%d] must be a writable C-contiguous "
                                 "array" % m)
            self._dptrs[m] = x.ctypes.data
        return out

    # -- raw calls (pointers already checked) -------------------------

    def _forward_raw(self, mode, batch, labels_addr, logits_addr):
        if mode == _lib.MODE_TRAIN:
            self._train_batch = batch
            self._train_forwards += 1
        self._check(lib.imml_forward(self._h, mode, batch, self._xptrs_addr,
                                     labels_addr, logits_addr,
                                     self._closs_addr), "imml_forward")
        c = self._closs
        return Losses(c.total, c.ce, c.con, c.dis)

    def _backward_raw(self, with_outputs):
        self._check(lib.imml_backward(
            self._h, self._dptrs_addr if with_outputs else None),
            "imml_backward")

    # -- one batch ----------------------------------------------------

    def forward(self, features, labels=None, *, train=True):
        """Runs a forward on one batch of B <= max_batch rows.

        train=True (a training forward, labels required) keeps what
        backward() needs; train=False evaluates and changes nothing
        (labels optional: the losses are NaN without them).  Returns
        (logits (B, C) float32, Losses)."""
        B = self._features(features, self.max_batch)
        if labels is None:
            if train:
                raise ValueError("a training forward needs labels")
            lab_addr = None
        else:
            labels = _check_labels(labels, B, self.n_classes)
            lab_addr = labels.ctypes.data
        logits = np.empty((B, self.n_classes), np.float32)
        losses = self._forward_raw(_lib.MODE_TRAIN if train else
                                   _lib.MODE_EVAL, B, lab_addr,
                                   logits.ctypes.data)
        return logits, losses

    def backward(self, out=None, *, input_grads=True):
        """Adds the last training forward's parameter gradients to the
        model's gradients (one micro-batch) and returns dL/dh_m, the
        gradients for the M inputs, as a list of (B, d_m) float32 arrays
        (written into `out` when given; entries of `out` may be None).
        input_grads=False computes no input gradients and returns None."""
        if not input_grads:
            self._backward_raw(False)
            return None
        out = self._outputs(out, self._train_batch or 1)
        self._backward_raw(True)
        return out

    def commit(self):
        """Ends a training step after its micro-batches (imml_commit):
        pushes their knowledge into the strata dictionary and advances the
        warm-up once."""
        self._check(lib.imml_commit(self._h), "imml_commit")

    def optim(self, kind="adamw", **options):
        """Attaches the library's optimiser (imml_optim_setup): kind "adamw"
        or "sgd"; options lr, weight_decay, momentum, nesterov, beta1,
        beta2, eps, clip_norm (PyTorch's defaults for the kind)."""
        k = _choice_arg("kind", kind, _OPTIMS)
        fields = []
        for key, value in options.items():
            if key == "nesterov":
                value = 1 if value else 0
            elif key in OPTIM_KEYS:
                value = _float_arg(key, value)
            else:
                raise TypeError("unknown optimiser option %r (known: %s)"
                                % (key, ", ".join(OPTIM_KEYS)))
            fields.append((key, value))
        oc = _new_struct(_lib.OptimConfig, lib.imml_optim_config_init, k)
        for key, value in fields:
            setattr(oc, key, value)
        self._check(lib.imml_optim_setup(self._h, ctypes.addressof(oc)),
                    "imml_optim_setup")

    def set_lr(self, lr):
        """Changes the library optimiser's learning rate."""
        self._check(lib.imml_optim_set_lr(self._h, _float_arg("lr", lr)),
                    "imml_optim_set_lr")

    def step(self):
        """One update of the library's optimiser from the accumulated
        gradients, then zero gradients (imml_optim_step).  Needs optim()
        and a commit() of the step's micro-batches."""
        self._check(lib.imml_optim_step(self._h), "imml_optim_step")

    def train_step(self, features, labels):
        """One whole training step on one batch: forward, backward (no
        input gradients), commit, step.  Returns the Losses."""
        B = self._features(features, self.max_batch)
        if labels is None:
            raise ValueError("a training step needs labels")
        labels = _check_labels(labels, B, self.n_classes)
        losses = self._forward_raw(_lib.MODE_TRAIN, B, labels.ctypes.data,
                                   None)
        self._backward_raw(False)
        self.commit()
        self.step()
        return losses

    def grad_zero(self):
        """Sets every gradient to 0 (imml_grad_zero)."""
        self._check(lib.imml_grad_zero(self._h), "imml_grad_zero")

    def predict(self, features):
        """Predicts any number N >= 1 of rows, in batches of max_batch
        (imml_predict).  Returns Prediction(classes, probs, logits)."""
        N = self._features(features, 2 ** 62)
        C = self.n_classes
        classes = np.empty(N, np.intc)
        probs = np.empty((N, C), np.float32)
        logits = np.empty((N, C), np.float32)
        base = list(self._xptrs)
        for s in range(0, N, self.max_batch):
            b = min(self.max_batch, N - s)
            for m, d in enumerate(self.dims):
                self._xptrs[m] = base[m] + 4 * s * d
            self._check(lib.imml_predict(
                self._h, b, self._xptrs_addr, logits[s:].ctypes.data,
                probs[s:].ctypes.data, classes[s:].ctypes.data),
                "imml_predict")
        return Prediction(classes, probs, logits)

    # -- checkpoints --------------------------------------------------

    def save(self, path):
        """Writes the model to a file atomically (imml_model_save); the
        file loads in imml-train --predict and any libimml host."""
        self._check(lib.imml_model_save(self._h, os.fsencode(path)),
                    "imml_model_save")

    def to_bytes(self):
        """The checkpoint as bytes (imml_model_save_mem)."""
        size = ctypes.c_size_t()
        self._check(lib.imml_model_save_mem(self._h, None, 0,
                                            ctypes.addressof(size)),
                    "imml_model_save_mem")
        buf = ctypes.create_string_buffer(size.value)
        self._check(lib.imml_model_save_mem(self._h, ctypes.addressof(buf),
                                            size.value,
                                            ctypes.addressof(size)),
                    "imml_model_save_mem")
        return buf.raw[:size.value]

    # -- parameters ---------------------------------------------------

    def params(self):
        """Every parameter tensor by name, in the library's order
        (m<m>.w1 b1 w2 b2 wc bc per modality, fdc.wq, fdc.wk, ft.w, ft.b):
        a dict name -> Param(name, data, grad), numpy views over the
        library's memory.  The library's optimiser and backward see what is
        written into them."""
        views = {}
        v = _lib.ParamView()
        for i in range(lib.imml_param_count(self._h)):
            self._check(lib.imml_param_get(self._h, i, ctypes.addressof(v)),
                        "imml_param_get")
            name = v.name.decode()
            views[name] = self._param(name, v)
        return views

    def _param(self, name, v):
        # the views refer to the model, never the other way round: no
        # reference cycle through arrays (which the collector cannot see)
        shape = (v.rows, v.cols)
        return Param(name, _array_over(self, v.data, shape),
                     _array_over(self, v.grad, shape))

    def param(self, name):
        """One parameter tensor by name (imml_param_find): Param(name, data,
        grad).  Raises ImmlError (IMML_ERR_INVALID_ARG) for an unknown
        name."""
        if not isinstance(name, str):
            raise TypeError("name must be a str, got %s" % type(name).__name__)
        v = _lib.ParamView()
        self._check(lib.imml_param_find(self._h, name.encode(),
                                        ctypes.addressof(v)),
                    "imml_param_find")
        return self._param(name, v)

    def flat(self):
        """(data, grad): every parameter and every gradient as one
        contiguous float32 vector each (imml_param_flat), in params()
        order."""
        data, grad = ctypes.c_void_p(), ctypes.c_void_p()
        n = ctypes.c_size_t()
        self._check(lib.imml_param_flat(self._h, ctypes.addressof(data),
                                        ctypes.addressof(grad),
                                        ctypes.addressof(n)),
                    "imml_param_flat")
        return (_array_over(self, data.value, (n.value,)),
                _array_over(self, grad.value, (n.value,)))

    # -- predominant modality, dictionary -----------------------------

    def _predominant(self):
        p, fixed = ctypes.c_int(), ctypes.c_int()
        self._check(lib.imml_predominant_get(self._h, ctypes.addressof(p),
                                             ctypes.addressof(fixed)),
                    "imml_predominant_get")
        return p.value, bool(fixed.value)

    @property
    def predominant(self):
        """The predominant modality p, or None while it is not fixed."""
        p, fixed = self._predominant()
        return p if fixed else None

    def set_predominant(self, p):
        """Fixes the predominant modality before the warm-up does
        (imml_predominant_set)."""
        self._check(lib.imml_predominant_set(self._h, _int_arg("p", p)),
                    "imml_predominant_set")

    @property
    def dict_fill(self):
        """The number of filled strata dictionary entries."""
        return lib.imml_fdc_dict_fill(self._h)
