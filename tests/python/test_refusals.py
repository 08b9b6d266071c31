"""Bad input is refused before any C call, with TypeError (wrong type or
dtype) or ValueError (shape, layout, device, values).

Every case runs with the package's handle on libimml replaced by a guard
that fails the test if a model call (forward, backward, predict, create,
...) is reached, and checks that the model is byte for byte as before."""

import numpy as np
import pytest
import torch

import imml
import imml._model
import imml.torch

DIMS = [5, 3]
C = 4
B = 8


class Guard:
    """Stands in for the loaded library: reaching any imml_* call while
    armed fails the test."""

    def __init__(self, real):
        self.real = real
        self.armed = False

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not self.armed or name in ("imml_status_string",
                                      "imml_version_string"):
            return fn

        def reached(*args):
            raise AssertionError("the C call %s was reached" % name)
        return reached

    def __enter__(self):
        self.armed = True

    def __exit__(self, *exc):
        self.armed = False


@pytest.fixture
def guard(monkeypatch):
    g = Guard(imml._model.lib)
    monkeypatch.setattr(imml._model, "lib", g)
    return g


def np_batch(b=B):
    rng = np.random.default_rng(0)
    return ([rng.standard_normal((b, d)).astype(np.float32) for d in DIMS],
            np.arange(b) % C)


def refused(guard, exc, fn, model=None, match=None):
    before = model.to_bytes() if model is not None else None
    with guard:
        with pytest.raises(exc, match=match):
            fn()
    if model is not None:
        assert model.to_bytes() == before


# -- numpy layer ------------------------------------------------------

def numpy_cases():
    x, y = np_batch()
    f64 = [x[0].astype(np.float64), x[1]]
    i32 = [x[0], x[1].astype(np.int32)]
    fortran = [np.asfortranarray(x[0]), x[1]]
    strided = [np.repeat(x[0], 2, axis=0)[::2], x[1]]
    assert not fortran[0].flags.c_contiguous
    assert not strided[0].flags.c_contiguous and strided[0].shape == (B, 5)
    big = np_batch(B + 1)[0]
    return [
        # (name, exception, features, labels)
        ("features not a list", TypeError, x[0], y),
        ("a feature not an array", TypeError, [x[0].tolist(), x[1]], y),
        ("float64 features", TypeError, f64, y),
        ("int32 features", TypeError, i32, y),
        ("one modality missing", ValueError, [x[0]], y),
        ("a 1-D feature", ValueError, [x[0].ravel(), x[1]], y),
        ("wrong width", ValueError, [x[1], x[1]], y),
        ("rows differ", ValueError, [x[0], x[1][:-1]], y),
        ("empty batch", ValueError, [x[0][:0], x[1][:0]], y[:0]),
        ("batch over max_batch", ValueError, big, np.arange(B + 1) % C),
        ("Fortran-ordered feature", ValueError, fortran, y),
        ("strided feature", ValueError, strided, y),
        ("labels a list", TypeError, x, list(y)),
        ("float labels", TypeError, x, y.astype(np.float32)),
        ("labels of shape (B, 1)", ValueError, x, y[:, None]),
        ("labels too short", ValueError, x, y[:-1]),
        ("label -1", ValueError, x, np.where(np.arange(B) == 3, -1, y)),
        ("label C", ValueError, x, np.where(np.arange(B) == 5, C, y)),
        ("training without labels", ValueError, x, None),
    ]


@pytest.mark.parametrize("name,exc,features,labels", numpy_cases(),
                         ids=[c[0] for c in numpy_cases()])
def test_numpy_forward_refuses(guard, name, exc, features, labels):
    m = imml.Model(dims=DIMS, n_classes=C, max_batch=B, hidden_dim=8,
                   knowledge_dim=4)
    m.optim()
    refused(guard, exc, lambda: m.forward(features, labels), m)
    refused(guard, exc, lambda: m.train_step(features, labels), m)
    if labels is not None and name != "batch over max_batch" and (
            "label" not in name):
        refused(guard, exc, lambda: m.predict(features), m)


def test_numpy_label_message_names_the_row(guard):
    m = imml.Model(dims=DIMS, n_classes=C, max_batch=B)
    x, y = np_batch()
    y[5] = 7
    refused(guard, ValueError, lambda: m.forward(x, y), m,
            match=r"labels\[5\] = 7 is outside 0..3")


def test_numpy_backward_outputs_refused(guard):
    m = imml.Model(dims=DIMS, n_classes=C, max_batch=B, predominant=0)
    x, y = np_batch()
    m.forward(x, y)
    ok = [np.empty((B, d), np.float32) for d in DIMS]
    ro = np.empty((B, 5), np.float32)
    ro.flags.writeable = False
    for exc, out in [
            (TypeError, "nope"),
            (ValueError, ok[:1]),
            (TypeError, [np.empty((B, 5), np.float64), ok[1]]),
            (ValueError, [np.empty((B, 4), np.float32), ok[1]]),
            (ValueError, [ro, ok[1]]),
            (ValueError, [np.asfortranarray(ok[0]), ok[1]]),
            (TypeError, [ok[0].tolist(), ok[1]])]:
        with guard:
            with pytest.raises(exc):
                m.backward(out=out)
    m.backward(out=ok)  # the forward is still pending: nothing was run
    m.commit()


@pytest.mark.parametrize("exc,kw", [
    (TypeError, dict(bogus=1)),
    (TypeError, dict(hidden_dim="16")),
    (TypeError, dict(hidden_dim=16.0)),
    (TypeError, dict(hidden_dim=True)),
    (ValueError, dict(hidden_dim=2 ** 40)),
    (TypeError, dict(beta="0.5")),
    (ValueError, dict(slot_mode="loose")),
    (ValueError, dict(precision="fp8")),
    (ValueError, dict(seed=-1)),
    (TypeError, dict(dims="ab")),
    (TypeError, dict(dims=[5, 3.0])),
    (TypeError, dict(dims=5)),
    (TypeError, dict(n_classes=3.5)),
])
def test_config_refused(guard, exc, kw):
    args = dict(dims=DIMS, n_classes=C)
    args.update(kw)
    refused(guard, exc, lambda: imml.Model(**args))


def test_optim_refused(guard):
    m = imml.Model(dims=DIMS, n_classes=C)
    refused(guard, ValueError, lambda: m.optim("rmsprop"), m)
    refused(guard, TypeError, lambda: m.optim(lr="fast"), m)
    refused(guard, TypeError, lambda: m.optim(momentun=0.9), m)
    refused(guard, TypeError, lambda: m.param(3), m)


# -- torch layer ------------------------------------------------------

def torch_cases():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, d, generator=g) for d in DIMS]
    y = torch.arange(B) % C
    meta = [torch.empty(B, 5, device="meta"), x[1]]
    transposed = [torch.randn(5, B, generator=g).t(), x[1]]
    assert not transposed[0].is_contiguous()
    sparse = [x[0].to_sparse(), x[1]]
    return [
        ("features not a list", TypeError, x[0], y),
        ("a numpy feature", TypeError, [x[0].numpy(), x[1]], y),
        ("float64 tensor", TypeError, [x[0].double(), x[1]], y),
        ("float16 tensor", TypeError, [x[0].half(), x[1]], y),
        ("int64 tensor", TypeError, [x[0].long(), x[1]], y),
        ("sparse tensor", TypeError, sparse, y),
        ("tensor not on the CPU", ValueError, meta, y),
        ("transposed tensor", ValueError, transposed, y),
        ("strided tensor", ValueError,
         [torch.randn(B, 10, generator=g)[:, ::2], x[1]], y),
        ("one modality missing", ValueError, x[:1], y),
        ("wrong width", ValueError, [x[1], x[1]], y),
        ("a 3-D tensor", ValueError, [x[0][None], x[1]], y),
        ("rows differ", ValueError, [x[0], x[1][:-1]], y),
        ("batch over max_batch", ValueError,
         [torch.randn(B + 1, d) for d in DIMS], torch.arange(B + 1) % C),
        ("numpy labels", TypeError, x, y.numpy()),
        ("float labels", TypeError, x, y.float()),
        ("labels not on the CPU", ValueError, x,
         torch.empty(B, dtype=torch.long, device="meta")),
        ("labels of shape (B, 1)", ValueError, x, y[:, None]),
        ("label -1", ValueError, x, torch.where(torch.arange(B) == 3,
                                                torch.tensor(-1), y)),
        ("label C", ValueError, x, torch.where(torch.arange(B) == 2,
                                               torch.tensor(C), y)),
        ("training without labels", ValueError, x, None),
    ]


@pytest.mark.parametrize("name,exc,features,labels", torch_cases(),
                         ids=[c[0] for c in torch_cases()])
def test_torch_forward_refuses(guard, name, exc, features, labels):
    head = imml.torch.IMML(dims=DIMS, n_classes=C, max_batch=B, hidden_dim=8,
                           knowledge_dim=4)
    refused(guard, exc, lambda: head(features, labels), head.model)
    head.eval()
    if labels is not None:
        refused(guard, exc, lambda: head(features, labels), head.model)


@pytest.mark.parametrize("exc,features", [
    (ValueError, [torch.empty(3, 5, device="meta"), torch.zeros(3, 3)]),
    (TypeError, [torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, 3)]),
    (TypeError, [np.zeros((3, 5), np.float32), torch.zeros(3, 3)]),
    (ValueError, [torch.zeros(5, 3).t(), torch.zeros(3, 3)]),
])
def test_torch_predict_refuses(guard, exc, features):
    head = imml.torch.IMML(dims=DIMS, n_classes=C, max_batch=B)
    refused(guard, exc, lambda: head.predict(features), head.model)


def test_the_library_refuses_with_its_message():
    """What only the library can judge (here: NaN in a feature) comes back
    as ImmlError carrying libimml's message, and changes nothing."""
    head = imml.torch.IMML(dims=DIMS, n_classes=C, max_batch=B)
    x = [torch.randn(B, d) for d in DIMS]
    x[1][2, 1] = float("inf")
    before = head.model.to_bytes()
    with pytest.raises(imml.ImmlError) as e:
        head(x, torch.arange(B) % C)
    assert e.value.status_name == "IMML_ERR_NONFINITE"
    assert e.value.call == "imml_forward"
    assert e.value.message and e.value.message in str(e.value)
    assert head.model.to_bytes() == before
