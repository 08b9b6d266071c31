"""ctypes declarations of libimml's 1.x API (include/imml.h) and the search
for the shared library.

The library is looked up, in order, at:

1. the path in the environment variable ``IMML_LIBRARY`` (the build tree's
   tests set it to the library they just built);
2. the library installed with this package: ``meson install`` writes
   ``_config.py`` next to this file with the install's library directory,
   which is tried relative to this package first (so that a DESTDIR or a
   moved prefix still finds its own copy), then as the absolute path;
3. ``ctypes.util.find_library("imml")`` (the dynamic linker's cache).

Only the ABI major version 1 (soname ``libimml.so.1``) is accepted.
"""

import ctypes
import ctypes.util
import os

ABI_MAJOR = 1
SONAME = "libimml.so.%d" % ABI_MAJOR

c_int = ctypes.c_int
c_float = ctypes.c_float
c_double = ctypes.c_double
c_size_t = ctypes.c_size_t
c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p


class Allocator(ctypes.Structure):
    _fields_ = [("malloc_fn", c_void_p), ("free_fn", c_void_p),
                ("user_data", c_void_p)]


class Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("n_modalities", c_int),
        ("dims", ctypes.POINTER(c_int)),
        ("hidden_dim", c_int),
        ("knowledge_dim", c_int),
        ("n_classes", c_int),
        ("max_batch", c_int),
        ("dict_size", c_int),
        ("beta", c_float),
        ("gamma1", c_float),
        ("gamma2", c_float),
        ("tau", c_float),
        ("predominant", c_int),
        ("warmup_steps", c_int),
        ("slot_mode", c_int),
        ("seed", ctypes.c_uint64),
        ("allocator", Allocator),
        ("precision", c_int),
        ("memory_limit", c_size_t),
    ]


class LoadOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("allocator", Allocator),
                ("memory_limit", c_size_t)]


class OptimConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int),
        ("lr", c_float),
        ("weight_decay", c_float),
        ("momentum", c_float),
        ("nesterov", c_int),
        ("beta1", c_float),
        ("beta2", c_float),
        ("eps", c_float),
        ("clip_norm", c_float),
        ("flags", c_int),
    ]


class Losses(ctypes.Structure):
    _fields_ = [("total", c_double), ("ce", c_double), ("con", c_double),
                ("dis", c_double)]


class ParamView(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("rows", c_int), ("cols", c_int),
                ("data", c_void_p), ("grad", c_void_p)]


# Status codes (imml_status), frozen and append-only.
STATUS_NAMES = {
    0: "IMML_OK",
    1: "IMML_ERR_NULL",
    2: "IMML_ERR_INVALID_ARG",
    3: "IMML_ERR_NOMEM",
    4: "IMML_ERR_SHAPE",
    5: "IMML_ERR_LABEL",
    6: "IMML_ERR_STATE",
    7: "IMML_ERR_CALLBACK",
    8: "IMML_ERR_NONFINITE",
    9: "IMML_ERR_IO",
    10: "IMML_ERR_BAD_MAGIC",
    11: "IMML_ERR_BAD_VERSION",
    12: "IMML_ERR_TRUNCATED",
    13: "IMML_ERR_CHECKSUM",
    14: "IMML_ERR_FORMAT",
    15: "IMML_ERR_TOO_LARGE",
    16: "IMML_ERR_NEED_CALLBACKS",
    17: "IMML_ERR_BUFFER_SMALL",
    18: "IMML_ERR_UNKNOWN_FIELD",
    19: "IMML_ERR_UNSUPPORTED",
}

MODE_TRAIN = 0
MODE_EVAL = 1
OPTIM_SGD = 0
OPTIM_ADAMW = 1

# name: (restype, argtypes).  Handles and buffers are passed as integers
# (addresses) through c_void_p: the cheapest conversion ctypes has.
_PROTOTYPES = {
    "imml_version_number": (ctypes.c_uint, []),
    "imml_version_string": (c_char_p, []),
    "imml_status_string": (c_char_p, [c_int]),
    "imml_config_init": (None, [c_void_p]),
    "imml_model_create": (c_int, [c_void_p, c_void_p, c_void_p]),
    "imml_load_options_init": (None, [c_void_p]),
    "imml_model_load": (c_int, [c_char_p, c_void_p, c_void_p, c_void_p]),
    "imml_model_load_mem": (c_int,
                            [c_void_p, c_size_t, c_void_p, c_void_p,
                             c_void_p]),
    "imml_model_free": (None, [c_void_p]),
    "imml_model_errmsg": (c_char_p, [c_void_p]),
    "imml_model_get_config": (c_int, [c_void_p, c_void_p]),
    "imml_model_save": (c_int, [c_void_p, c_char_p]),
    "imml_model_save_mem": (c_int, [c_void_p, c_void_p, c_size_t, c_void_p]),
    "imml_forward": (c_int,
                     [c_void_p, c_int, c_int, c_void_p, c_void_p, c_void_p,
                      c_void_p]),
    "imml_backward": (c_int, [c_void_p, c_void_p]),
    "imml_commit": (c_int, [c_void_p]),
    "imml_predict": (c_int,
                     [c_void_p, c_int, c_void_p, c_void_p, c_void_p,
                      c_void_p]),
    "imml_fdc_dict_fill": (c_int, [c_void_p]),
    "imml_param_count": (c_int, [c_void_p]),
    "imml_param_get": (c_int, [c_void_p, c_int, c_void_p]),
    "imml_param_find": (c_int, [c_void_p, c_char_p, c_void_p]),
    "imml_param_flat": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p]),
    "imml_grad_zero": (c_int, [c_void_p]),
    "imml_predominant_get": (c_int, [c_void_p, c_void_p, c_void_p]),
    "imml_predominant_set": (c_int, [c_void_p, c_int]),
    "imml_optim_config_init": (None, [c_void_p, c_int]),
    "imml_optim_setup": (c_int, [c_void_p, c_void_p]),
    "imml_optim_set_lr": (c_int, [c_void_p, c_float]),
    "imml_optim_step": (c_int, [c_void_p]),
    # experimental (IMML_EXPERIMENTAL): not frozen
    "imml_threads_set": (c_int, [c_int]),
}


def _candidates():
    env = os.environ.get("IMML_LIBRARY")
    if env:
        # an explicit choice is the only candidate: a wrong path must fail,
        # not silently fall back to another copy
        return [env], "IMML_LIBRARY=%s" % env
    found = []
    try:
        from . import _config  # written by meson install
    except ImportError:
        _config = None
    if _config is not None:
        here = os.path.dirname(os.path.abspath(__file__))
        rel = os.path.relpath(_config.LIBDIR,
                              os.path.join(_config.PYTHON_DIR, "imml"))
        found.append(os.path.normpath(os.path.join(here, rel, SONAME)))
        found.append(os.path.join(_config.LIBDIR, SONAME))
    name = ctypes.util.find_library("imml")
    if name:
        found.append(name)
    return found, None


def load_library():
    """Loads libimml.so.1 (see the module's doc) and declares its
    functions.  Raises OSError naming every place tried."""
    paths, forced = _candidates()
    errors = []
    for path in paths:
        if forced is None and os.path.isabs(path) and not os.path.exists(path):
            errors.append("%s: no such file" % path)
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append("%s: %s" % (path, e))
            continue
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        major = lib.imml_version_number() // 10000
        if major != ABI_MAJOR:
            errors.append("%s: libimml %s, but this package needs %d.x"
                          % (path, lib.imml_version_string().decode(),
                             ABI_MAJOR))
            continue
        lib.path = path
        return lib
    raise OSError("imml: cannot load libimml (%s): %s" % (
        forced or "install libimml, or set IMML_LIBRARY to its path",
        "; ".join(errors) or "not found by ctypes.util.find_library"))


lib = load_library()
