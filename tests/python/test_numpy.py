"""imml.Model, the numpy layer: training, the 1.0 step split, parameters as
views over the library's memory, checkpoints, and libimml's errors."""

import gc
import os

import numpy as np
import pytest

import imml

DIMS = [5, 3]
C = 4


def small(**kw):
    cfg = dict(max_batch=16, hidden_dim=16, knowledge_dim=8, dict_size=32,
               warmup_steps=3, seed=7)
    cfg.update(kw)
    return imml.Model(dims=DIMS, n_classes=C, **cfg)


def batch(rng, B=16):
    """A learnable batch: the class shifts both modalities' means."""
    y = np.arange(B) % C
    x0 = (rng.standard_normal((B, DIMS[0])) + y[:, None]).astype(np.float32)
    x1 = (rng.standard_normal((B, DIMS[1])) - y[:, None]).astype(np.float32)
    return [x0, x1], y


def test_version_and_library():
    assert imml.version() == imml.__version__
    assert imml.version().split(".")[0] == "1"
    assert os.path.exists(imml.library_path())


def test_config_round_trip():
    m = small(beta=0.25, gamma1=0.5, slot_mode="strict", predominant=1)
    cfg = m.config
    assert cfg["dims"] == tuple(DIMS) and cfg["n_classes"] == C
    assert cfg["hidden_dim"] == 16 and cfg["knowledge_dim"] == 8
    assert cfg["max_batch"] == 16 and cfg["dict_size"] == 32
    assert cfg["beta"] == 0.25 and cfg["gamma1"] == 0.5
    assert cfg["slot_mode"] == 1 and cfg["predominant"] == 1
    assert m.predominant == 1  # named in the config: fixed from the start
    assert small().predominant is None  # chosen after the warm-up


def test_training_learns(rng):
    m = small()
    m.optim("adamw", lr=1e-2)
    xs, y = batch(rng)
    first = m.train_step(xs, y).total
    for _ in range(60):
        last = m.train_step(xs, y)
    assert last.total < 0.5 * first
    assert np.isclose(last.total, last.ce + 0.1 * last.con + 1.0 * last.dis)
    pred = m.predict(xs)
    assert pred.classes.dtype == np.intc and pred.classes.shape == (16,)
    assert (pred.classes == y).mean() >= 0.9
    assert np.allclose(pred.probs.sum(axis=1), 1.0, atol=1e-5)
    assert m.predominant in (0, 1)  # fixed after 3 warm-up steps
    assert m.dict_fill == 32


def test_split_step_equals_train_step(rng):
    """forward / backward / commit / step is exactly train_step."""
    a, b = small(), small()
    a.optim(lr=1e-2)
    b.optim(lr=1e-2)
    for _ in range(5):
        xs, y = batch(rng)
        la = a.train_step(xs, y)
        logits, lb = b.forward(xs, y)
        assert logits.shape == (16, C) and logits.dtype == np.float32
        dh = b.backward()
        assert [d.shape for d in dh] == [(16, 5), (16, 3)]
        b.commit()
        b.step()
        assert la == lb
    assert np.array_equal(a.flat()[0], b.flat()[0])
    assert a.dict_fill == b.dict_fill


def test_backward_outputs(rng):
    m = small(predominant=0)
    xs, y = batch(rng)
    m.forward(xs, y)
    dh = m.backward()
    m.grad_zero()
    m.forward(xs, y)
    out = [np.full((16, 5), 7, np.float32), None]
    ret = m.backward(out=out)
    assert ret is out and np.array_equal(out[0], dh[0])
    m.forward(xs, y)
    assert m.backward(input_grads=False) is None
    m.commit()


def test_eval_forward_changes_nothing(rng):
    m = small(predominant=0)
    m.optim(lr=1e-2)
    xs, y = batch(rng)
    m.train_step(xs, y)
    before = m.to_bytes()
    logits, losses = m.forward(xs, train=False)
    assert np.isnan(losses.total)
    _, with_labels = m.forward(xs, y, train=False)
    assert np.isfinite(with_labels.total)
    assert m.to_bytes() == before
    assert np.array_equal(logits, m.predict(xs).logits)


def test_predict_any_number_of_rows(rng):
    m = small(max_batch=4)
    xs, _ = batch(rng, 16)
    whole = m.predict(xs)
    assert whole.probs.shape == (16, C)
    for s in range(0, 16, 4):
        part = m.predict([x[s:s + 4] for x in xs])
        assert np.array_equal(part.logits, whole.logits[s:s + 4])


def test_params_are_views(rng):
    m = small(predominant=0)
    params = m.params()
    names = list(params)
    assert names[:6] == ["m0.w1", "m0.b1", "m0.w2", "m0.b2", "m0.wc",
                         "m0.bc"]
    assert names[-4:] == ["fdc.wq", "fdc.wk", "ft.w", "ft.b"]
    assert params["m0.w1"].data.shape == (5, 16)
    assert params["m1.b1"].data.shape == (1, 16)
    assert params["ft.b"].data.shape == (1, C)
    data, grad = m.flat()
    assert data.size == sum(p.data.size for p in params.values())
    # the same memory through flat(), params() and param()
    w = m.param("ft.w")
    assert w.data.ctypes.data == params["ft.w"].data.ctypes.data
    lo = data.ctypes.data
    assert lo <= w.data.ctypes.data < lo + 4 * data.size
    # writing a view writes the model: zero F&T -> zero logits
    xs, y = batch(rng)
    m.param("ft.w").data[...] = 0
    params["ft.b"].data[...] = 0
    assert np.all(m.predict(xs).logits == 0)
    # backward writes the gradients the views show, step consumes them
    m.optim("sgd", lr=0.1)
    m.forward(xs, y)
    m.backward(input_grads=False)
    assert np.abs(grad).max() > 0
    off = (w.grad.ctypes.data - grad.ctypes.data) // 4
    assert np.array_equal(w.grad.ravel(), grad[off:off + w.grad.size])
    assert off == (w.data.ctypes.data - lo) // 4  # same layout as the data
    g = w.grad.copy()
    before = w.data.copy()
    m.commit()
    m.step()
    assert np.allclose(w.data, before - 0.1 * g, atol=1e-7)
    assert not grad.any()  # imml_optim_step zeroes the gradients


def test_host_optimiser_through_views(rng):
    """A hand-written SGD on the views trains the model as the library's
    SGD does."""
    a, b = small(predominant=0), small(predominant=0)
    a.optim("sgd", lr=0.05)
    pa, ga = b.flat()
    for _ in range(4):
        xs, y = batch(rng)
        a.train_step(xs, y)
        b.forward(xs, y)
        b.backward(input_grads=False)
        b.commit()
        pa -= np.float32(0.05) * ga
        ga[...] = 0
    assert np.allclose(a.flat()[0], pa, atol=1e-6)


def test_views_keep_the_model_alive(rng):
    m = small()
    fin = m._finalizer
    w = m.param("m0.w1").data
    g = m.flat()[1]
    del m
    gc.collect()
    assert fin.alive
    assert w.shape == (5, 16) and np.isfinite(w).all() and g.size > 0
    del w, g
    gc.collect()
    assert not fin.alive  # imml_model_free ran


def test_save_load(tmp_path, rng):
    m = small()
    m.optim(lr=1e-2)
    for _ in range(5):
        m.train_step(*batch(rng))
    xs, y = batch(rng)
    path = str(tmp_path / "m.imml")
    m.save(path)
    copies = [imml.Model.load(path), imml.Model.from_bytes(m.to_bytes())]
    for other in copies:
        assert other.config == m.config
        assert np.array_equal(other.predict(xs).probs, m.predict(xs).probs)
        assert np.array_equal(other.flat()[0], m.flat()[0])
        assert other.dict_fill == m.dict_fill
        assert other.to_bytes() == m.to_bytes()
    # the optimiser state travels too: the next step is the same
    m.train_step(xs, y)
    for other in copies:
        other.train_step(xs, y)
        assert np.array_equal(other.flat()[0], m.flat()[0])


def test_predominant_set(rng):
    m = small()
    m.set_predominant(1)
    assert m.predominant == 1
    with pytest.raises(imml.ImmlError) as e:
        m.set_predominant(0)
    assert e.value.status_name == "IMML_ERR_STATE"


def test_errors_carry_the_library_message(tmp_path, rng):
    m = small()
    xs, y = batch(rng)
    with pytest.raises(imml.ImmlError) as e:
        m.commit()
    assert e.value.status == 6 and e.value.status_name == "IMML_ERR_STATE"
    assert e.value.call == "imml_commit"
    assert "imml_backward" in e.value.message
    assert e.value.message in str(e.value)
    with pytest.raises(imml.ImmlError) as e:
        m.backward()
    assert e.value.status_name == "IMML_ERR_STATE"
    m.forward(xs, y)
    m.backward()
    with pytest.raises(imml.ImmlError) as e:
        m.save(str(tmp_path / "x.imml"))  # uncommitted micro-batch
    assert e.value.status_name == "IMML_ERR_STATE"
    m.commit()
    with pytest.raises(imml.ImmlError) as e:
        m.step()  # no optimiser attached
    assert e.value.status_name == "IMML_ERR_STATE"
    with pytest.raises(imml.ImmlError) as e:
        m.param("m9.w1")
    assert e.value.status_name == "IMML_ERR_INVALID_ARG"
    assert "m9.w1" in e.value.message
    bad = [xs[0].copy(), xs[1]]
    bad[0][3, 2] = np.nan
    with pytest.raises(imml.ImmlError) as e:
        m.forward(bad, y)
    assert e.value.status_name == "IMML_ERR_NONFINITE"


def test_failed_create_and_load(tmp_path):
    with pytest.raises(imml.ImmlError) as e:
        imml.Model(dims=[5], n_classes=3)
    assert e.value.call == "imml_model_create"
    assert e.value.status_name == "IMML_ERR_INVALID_ARG"
    assert "n_modalities" in e.value.message
    with pytest.raises(imml.ImmlError) as e:
        imml.Model(dims=[5, 3], n_classes=1)
    assert "n_classes" in e.value.message
    with pytest.raises(imml.ImmlError) as e:
        imml.Model(dims=[5, 3], n_classes=3, precision=7)
    assert e.value.status_name == "IMML_ERR_INVALID_ARG"
    assert "precision" in e.value.message
    with pytest.raises(imml.ImmlError) as e:
        imml.Model(dims=[5, 3], n_classes=3, memory_limit=1000)
    assert e.value.status_name == "IMML_ERR_TOO_LARGE"
    with pytest.raises(imml.ImmlError) as e:
        imml.Model.load(str(tmp_path / "missing.imml"))
    assert e.value.status_name == "IMML_ERR_IO"
    assert "missing.imml" in e.value.message
    junk = tmp_path / "junk.imml"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(imml.ImmlError) as e:
        imml.Model.load(str(junk))
    assert e.value.status_name == "IMML_ERR_BAD_MAGIC"
    with pytest.raises(imml.ImmlError) as e:
        imml.Model.from_bytes(small().to_bytes()[:-9])
    assert e.value.status_name in ("IMML_ERR_TRUNCATED", "IMML_ERR_CHECKSUM",
                                   "IMML_ERR_FORMAT")
