"""Gradients across the boundary against central finite differences of the
library's own loss (imml_losses.total, summed in double by libimml).

What is checked is the boundary, not libimml's calculus (tests/
test_gradients.c checks every tensor against a float64 reference): that
dL/dh_m returned by the autograd Function is the derivative of the loss the
forward returned, for the right modality, sign and scale; that it chains
into a float64 PyTorch encoder; and that the .grad of the nn.Parameters
over the library's memory is the derivative with respect to what a write
through those same parameters changes.

Method: directional derivatives.  For a unit direction v, the analytic
<g, v> is compared with (L(x + eps v) - L(x - eps v)) / (2 eps), the loss
evaluated by training forwards of the same model (a training forward changes
nothing but the pending step; the dictionary stays as the checked backward
saw it, as no commit runs in between).  The directions are g / |g| (which
checks the magnitude) and seeded random ones, over all modalities and over
each modality alone (which catches swapped modalities).

Tolerance: |fd - <g, v>| <= 0.02 |g| + 2e-4.  The forward is float32: the
loss carries a rounding noise of about 1e-7 |L| (L ~ 1..3), which eps = 1e-3
turns into ~3e-4 / 2 on the difference quotient; the curvature term
eps^2 |L'''| / 6 is far below that away from ReLU kinks, which random
directions of norm eps = 1e-3 do not reach at these shapes (inputs ~N(0,1),
fresh weights).  A wrong sign, a missing loss term or a swapped modality
moves the quotient by a large fraction of |g|.
"""

import numpy as np
import pytest
import torch

import imml
import imml.torch

DIMS = [6, 4]
C = 3
B = 8
EPS = 1e-3


def make_head(**kw):
    cfg = dict(max_batch=B, hidden_dim=16, knowledge_dim=8, dict_size=16,
               seed=3, auto_commit=False)
    cfg.update(kw)
    h = imml.torch.IMML(dims=DIMS, n_classes=C, **cfg)
    # fill the dictionary with other batches, so that the checked forward
    # attends over stored strata (an empty dictionary is replaced by the
    # batch's own knowledge, held constant: not what a perturbation sees)
    g = torch.Generator().manual_seed(99)
    for _ in range(3):
        x = [torch.randn(B, d, generator=g) for d in DIMS]
        h(x, torch.arange(B) % C).loss.backward()
        h.commit()
    h.zero_grad()
    return h


def loss_at(model, hs, y):
    """The library's training loss at inputs hs (float64 arrays)."""
    xs = [np.ascontiguousarray(a, dtype=np.float32) for a in hs]
    return model.forward(xs, y.numpy(), train=True)[1].total


def directions(g, seed, n=4):
    """g / |g|, then n seeded random unit directions over all of g, then one
    per block of g alone (g: a list of arrays)."""
    rng = np.random.default_rng(seed)
    norm = np.sqrt(sum((a * a).sum() for a in g))
    out = [[a / norm for a in g]]
    for _ in range(n):
        v = [rng.standard_normal(a.shape) for a in g]
        s = np.sqrt(sum((a * a).sum() for a in v))
        out.append([a / s for a in v])
    for i in range(len(g)):
        v = [np.zeros(a.shape) for a in g]
        v[i] = rng.standard_normal(g[i].shape)
        v[i] /= np.sqrt((v[i] * v[i]).sum())
        out.append(v)
    return out, norm


def check(f, x0, g, seed):
    """f(list of float64 arrays) -> loss; g the analytic gradient at x0."""
    dirs, norm = directions(g, seed)
    assert norm > 1e-3, "a vanishing gradient checks nothing"
    worst = 0.0
    for v in dirs:
        an = sum(float((a * b).sum()) for a, b in zip(g, v))
        fd = (f([x + EPS * d for x, d in zip(x0, v)])
              - f([x - EPS * d for x, d in zip(x0, v)])) / (2 * EPS)
        err = abs(fd - an)
        worst = max(worst, err / norm)
        assert err <= 0.02 * norm + 2e-4, (
            "directional derivative %.6g, finite difference %.6g, |g| %.4g"
            % (an, fd, norm))
    return worst


@pytest.mark.parametrize("case", [
    dict(predominant=0),                        # the full method
    dict(predominant=1, slot_mode="strict"),
    dict(predominant=None, warmup_steps=50),    # warm-up: no L_con, slot z
])
def test_dl_dh_through_the_function(case):
    head = make_head(**case)
    gen = torch.Generator().manual_seed(5)
    h = [torch.randn(B, d, generator=gen).requires_grad_() for d in DIMS]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = head(h, y)
    out.loss.backward()
    g = [t.grad.double().numpy() for t in h]
    x0 = [t.detach().double().numpy() for t in h]
    assert loss_at(head.model, x0, y) == pytest.approx(out.losses.total,
                                                       rel=1e-12)
    check(lambda xs: loss_at(head.model, xs, y), x0, g, seed=1)


def test_chain_into_a_float64_encoder():
    head = make_head(predominant=0)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(),
                              torch.nn.Linear(12, DIMS[0])).double()
    x = torch.randn(B, 5, dtype=torch.float64)
    other = torch.randn(B, DIMS[1])
    y = torch.arange(B) % C
    head([enc(x).float(), other], y).loss.backward()
    params = list(enc.parameters())
    g = [p.grad.numpy().copy() for p in params]
    x0 = [p.detach().numpy().copy() for p in params]

    def f(ws):
        with torch.no_grad():
            for p, w in zip(params, ws):
                p.copy_(torch.from_numpy(w))
            h0 = enc(x).numpy()
        return loss_at(head.model, [h0, other.double().numpy()], y)

    check(f, x0, g, seed=2)


@pytest.mark.parametrize("names", [["m0.w1", "m0.b1", "m1.w2"],
                                   ["m0.wc", "m1.bc"],
                                   ["fdc.wq", "fdc.wk"],
                                   ["ft.w", "ft.b"]])
def test_library_parameter_grads(names):
    """.grad of the nn.Parameters against perturbations written through
    the same nn.Parameters (so through the library's memory)."""
    head = make_head(predominant=0)
    named = dict(head.named_library_parameters())
    gen = torch.Generator().manual_seed(7)
    h = [torch.randn(B, d, generator=gen) for d in DIMS]
    y = torch.arange(B) % C
    head(h, y).loss.backward()
    ps = [named[n] for n in names]
    g = [p.grad.double().numpy().copy() for p in ps]
    x0 = [p.detach().double().numpy().copy() for p in ps]
    hs = [t.double().numpy() for t in h]

    def f(ws):
        with torch.no_grad():
            for p, w in zip(ps, ws):
                p.copy_(torch.from_numpy(w))
        return loss_at(head.model, hs, y)

    check(f, x0, g, seed=3)
