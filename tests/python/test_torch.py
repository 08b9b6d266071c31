"""imml.torch.IMML: an nn.Module over libimml whose parameters share the
library's memory; the commit policy; torch optimisers; eval mode."""

import numpy as np
import pytest
import torch

import imml
import imml.torch

DIMS = [6, 4]
C = 3
B = 8


def head(**kw):
    cfg = dict(max_batch=B, hidden_dim=16, knowledge_dim=8, dict_size=16,
               predominant=0, seed=3)
    cfg.update(kw)
    return imml.torch.IMML(dims=DIMS, n_classes=C, **cfg)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(B) % C
    return [torch.randn(B, DIMS[0], generator=g) + y[:, None],
            torch.randn(B, DIMS[1], generator=g) - y[:, None]], y


def grads(h):
    return {n: p.grad.clone() for n, p in h.named_parameters()}


def test_parameters_share_the_library_memory():
    h = head()
    named = dict(h.named_library_parameters())
    assert list(named) == list(h.model.params())
    assert dict(h.named_parameters())["m0_w1"] is named["m0.w1"]
    for name, p in named.items():
        view = h.model.param(name)
        assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32
        assert p.data_ptr() == view.data.ctypes.data
        assert p.grad.data_ptr() == view.grad.ctypes.data
        assert tuple(p.shape) == view.data.shape
    before = h.model.param("ft.b").data.copy()
    with torch.no_grad():
        named["ft.b"].add_(1.5)
    assert np.array_equal(h.model.param("ft.b").data, before + 1.5)


def test_backward_reaches_encoders_and_library_grads():
    h = head()
    enc = torch.nn.Linear(5, DIMS[0])
    x, y = batch()
    out = h([enc(x[0][:, :5]), x[1]], y)
    assert out.loss.dtype == torch.float64 and out.loss.requires_grad
    assert out.logits.shape == (B, C) and not out.logits.requires_grad
    assert float(out.loss) == out.losses.total
    out.loss.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    flat_grad = h.model.flat()[1]
    assert np.abs(flat_grad).max() > 0
    assert h.ft_w.grad.abs().sum() > 0
    assert torch.equal(h.ft_w.grad,
                       torch.from_numpy(h.model.param("ft.w").grad))


def test_auto_commit_pushes_each_backward():
    h = head()
    x, y = batch()
    out = h(x, y)
    assert h.model.dict_fill == 0
    out.loss.backward()
    assert h.model.dict_fill == B  # committed by the backward


def test_manual_commit_accumulates_micro_batches(tmp_path):
    """auto_commit=False: K backwards add up, one commit ends the step; the
    sum equals the micro-batches' gradients taken one at a time."""
    a = head(auto_commit=False)
    ref = imml.torch.IMML(model=imml.Model.from_bytes(a.model.to_bytes()))
    (x1, y1), (x2, y2) = batch(1), batch(2)
    a(x1, y1).loss.backward()
    a(x2, y2).loss.backward()
    assert a.model.dict_fill == 0
    with pytest.raises(imml.ImmlError) as e:
        a.save(str(tmp_path / "a.imml"))
    assert e.value.status_name == "IMML_ERR_STATE"
    a.commit()
    assert a.model.dict_fill == 2 * B
    a.save(str(tmp_path / "a.imml"))
    ref(x1, y1).loss.backward()
    g1 = grads(ref)
    ref.zero_grad()
    # the second micro-batch sees the pre-step dictionary: undo the push
    ref2 = imml.torch.IMML(model=imml.Model.from_bytes(
        head(auto_commit=False).model.to_bytes()))
    ref2(x2, y2).loss.backward()
    g2 = grads(ref2)
    for n, p in a.named_parameters():
        assert torch.allclose(p.grad, g1[n] + g2[n], rtol=1e-5, atol=1e-7), n


def test_loss_scaling_scales_every_gradient():
    a, b = head(), head()
    ea, eb = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
    eb.load_state_dict(ea.state_dict())
    x, y = batch()
    a([ea(x[0]), x[1]], y).loss.backward()
    (0.25 * b([eb(x[0]), x[1]], y).loss).backward()
    assert torch.allclose(eb.weight.grad, 0.25 * ea.weight.grad, rtol=1e-5,
                          atol=1e-8)
    ga, gb = grads(a), grads(b)
    for n in ga:
        assert torch.allclose(gb[n], 0.25 * ga[n], rtol=1e-4, atol=1e-8), n


def test_torch_optimiser_updates_library_memory():
    h = head()
    enc = torch.nn.Linear(6, 6)
    opt = torch.optim.Adam(list(enc.parameters()) + list(h.parameters()),
                           lr=1e-2)
    x, y = batch()
    before = h.model.flat()[0].copy()
    losses = []
    for _ in range(40):
        out = h([enc(x[0]), x[1]], y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.losses.total)
    after = h.model.flat()[0]
    assert not np.array_equal(before, after)
    assert losses[-1] < 0.5 * losses[0]
    h.eval()
    with torch.no_grad():
        classes, probs = h.predict([enc(x[0]), x[1]])
    assert (classes == y).float().mean() >= 0.9
    assert torch.equal(classes, torch.from_numpy(
        h.model.predict([enc(x[0]).detach().numpy(),
                         x[1].numpy()]).classes.astype(np.int64)))


def test_zero_grad_set_to_none_is_honoured():
    """A .grad set to None means zero: the next forward re-attaches the
    library's gradient memory, zeroed."""
    h = head()
    opt = torch.optim.SGD(h.parameters(), lr=0.0)
    x, y = batch()
    h(x, y).loss.backward()
    h(x, y).loss.backward()  # two steps' gradients accumulated
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in h.parameters())
    fresh = head()
    fresh(x, y).loss.backward()
    fresh(x, y).loss.backward()
    fresh.zero_grad()  # imml_grad_zero
    out = h(x, y)
    assert all(p.grad is not None and p.grad.data_ptr() ==
               h.model.param(n).grad.ctypes.data
               for n, p in h.named_library_parameters())
    assert not h.model.flat()[1].any()
    out.loss.backward()
    fresh(x, y).loss.backward()
    gh, gf = grads(h), grads(fresh)
    for n in gh:
        assert torch.equal(gh[n], gf[n]), n


def test_zero_grad_between_forward_and_backward():
    """out = head(...); opt.zero_grad(set_to_none=True); out.loss.backward();
    opt.step() (a common loop): the backward re-attaches .grad, zeroed, so
    the optimiser sees (and updates with) exactly this step's gradients."""
    a, b = head(), head()
    x, y = batch()
    for h in (a, b):
        h(x, y).loss.backward()  # leaves one step's gradients behind
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    out = a(x, y)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in a.parameters())
    out.loss.backward()
    b.zero_grad()
    b(x, y).loss.backward()
    for (n, pa), pb in zip(a.named_library_parameters(), b.parameters()):
        assert pa.grad is not None, n
        assert pa.grad.data_ptr() == a.model.param(n).grad.ctypes.data
        assert torch.equal(pa.grad, pb.grad), n
    before = a.model.flat()[0].copy()
    opt.step()
    g = a.model.flat()[1]
    assert np.allclose(a.model.flat()[0], before - 0.5 * g, atol=1e-6)
    assert np.abs(g).max() > 0


def test_backward_of_a_replaced_forward_is_refused():
    h = head()
    x, y = batch()
    first = h(x, y)
    second = h(x, y)
    with pytest.raises(RuntimeError, match="one training forward at a time"):
        first.loss.backward()
    second.loss.backward()
    # a forward of the numpy layer in between is caught too
    third = h(x, y)
    h.model.forward([t.numpy() for t in x], y.numpy())
    with pytest.raises(RuntimeError, match="one training forward at a time"):
        third.loss.backward()


def test_eval_mode_is_an_evaluation_forward():
    h = head()
    x, y = batch()
    h(x, y).loss.backward()
    h.eval()
    saved = h.model.to_bytes()
    out = h(x)
    assert torch.isnan(out.loss) and out.logits.shape == (B, C)
    out2 = h(x, y)
    assert torch.isfinite(out2.loss)
    assert h.model.to_bytes() == saved
    logits, _ = h.model.forward([t.numpy() for t in x], train=False)
    assert np.array_equal(out.logits.numpy(), logits)


def test_library_optimiser_path():
    h = head()
    h.optim("adamw", lr=1e-2)
    enc = torch.nn.Linear(6, 6)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    x, y = batch()
    first = None
    for _ in range(40):
        out = h([enc(x[0]), x[1]], y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        h.step()  # imml_optim_step, then zero library gradients
        first = first if first is not None else out.losses.total
        assert not h.model.flat()[1].any()
    assert out.losses.total < 0.5 * first


def test_refuses_to_move():
    h = head()
    h.to("cpu")
    h.float()
    for move in (h.double, h.half, lambda: h.to(torch.float64),
                 lambda: h.share_memory()):
        with pytest.raises(ValueError, match="cannot be converted or moved"):
            move()
        for n, p in h.named_library_parameters():
            assert p.dtype == torch.float32
            assert p.data_ptr() == h.model.param(n).data.ctypes.data


def test_state_dict_and_load(tmp_path):
    a = head(seed=1)
    b = head(seed=2)
    x, y = batch()
    a(x, y).loss.backward()
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.model.flat()[0], b.model.flat()[0])
    path = str(tmp_path / "h.imml")
    a.save(path)
    c = imml.torch.IMML.load(path)
    c.eval()
    a.eval()
    assert torch.equal(c(x).logits, a(x).logits)
    assert c.model.dict_fill == a.model.dict_fill == B
