#!/usr/bin/python3
"""PyTorch twin of bench/bench.c: the same IMML training step (forward with
every loss term of doc/METHOD.md, backward including input gradients, AdamW
step) and the same inference forward, same shapes, autograd, on the CPU with
a fixed number of threads, in float32 or (--precision bf16) with the
forward under torch.autocast("cpu", dtype=torch.bfloat16): the matrix
products in bf16 (oneDNN), weights, gradients and optimiser in float32, as
libimml's bf16 precision. Prints one CSV line per shape:
shape,threads,train_ms,infer_ms,corename,precision

usage: torch_reference.py [--shape NAME] [--reps N] [--threads N]
                          [--precision fp32|bf16]
"""
import contextlib
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "small": dict(M=2, B=64, dims=(216, 6), H=256, k=128, C=10, J=256),
    "paper": dict(M=2, B=64, dims=(768, 6144), H=512, k=256, C=101, J=256),
    "large-batch": dict(M=2, B=512, dims=(768, 2048), H=512, k=256, C=101, J=256),
    "many-modalities": dict(M=4, B=128, dims=(512, 512, 256, 64), H=256, k=128, C=20, J=256),
}


def linear(n_in, n_out):
    bound = 1.0 / math.sqrt(n_in)
    w = torch.empty(n_in, n_out).uniform_(-bound, bound).requires_grad_()
    b = torch.empty(n_out).uniform_(-bound, bound).requires_grad_()
    return w, b


class IMML:
    """METHOD.md sections 1-4 with p = 0 fixed (no warm-up), conditional slots."""

    def __init__(self, M, dims, H, k, C, J, beta=0.5, gamma1=0.1, gamma2=1.0, tau=0.1):
        self.M, self.k, self.C, self.J = M, k, C, J
        self.beta, self.gamma1, self.gamma2, self.tau = beta, gamma1, gamma2, tau
        self.branches = [(linear(d, H), linear(H, k), linear(k, C)) for d in dims]
        bound = 1.0 / math.sqrt(M * k)
        self.wq = torch.empty(M * k, k).uniform_(-bound, bound).requires_grad_()
        self.wk = torch.empty(M * k, k).uniform_(-bound, bound).requires_grad_()
        self.wf, self.bf = linear(M * k, C)
        self.dict = torch.zeros(J, M * k)
        self.fill = 0
        self.pos = 0

    def parameters(self):
        ps = []
        for layer in self.branches:
            for w, b in layer:
                ps += [w, b]
        return ps + [self.wq, self.wk, self.wf, self.bf]

    @staticmethod
    def supcon(S, pos):
        logp = F.log_softmax(S, dim=1)
        return -((logp * pos).sum(1) / pos.sum(1)).mean()

    def forward(self, h, y=None):
        z, dis = [], 0.0
        for m, ((w1, b1), (w2, b2), (wc, bc)) in enumerate(self.branches):
            u = torch.relu(h[m] @ w1 + b1)
            zm = u @ w2 + b2
            z.append(zm)
            if y is not None:
                dis = dis + F.cross_entropy(zm @ wc + bc, y)
        if self.fill == 0:
            D = torch.cat(z, 1).detach()
        else:
            D = self.dict[: self.fill]
        q = torch.cat(z, 1) @ self.wq
        c = D @ self.wk
        alpha = torch.softmax(q @ c.t() / math.sqrt(self.k), dim=1)
        w = self.beta * alpha + (1 - self.beta) / D.shape[0]
        slots = [z[0]] + [z[a] + w @ D[:, a * self.k:(a + 1) * self.k] for a in range(1, self.M)]
        logits = torch.cat(slots, 1) @ self.wf + self.bf
        if y is None:
            return logits, z, None
        ce = F.cross_entropy(logits, y)
        pos = (y[:, None] == y[None, :]).float()
        n = [F.normalize(zm, dim=1, eps=1e-12) for zm in z]
        con = 0.0
        for a in range(1, self.M):
            S = n[0] @ n[a].t() / self.tau
            con = con + 0.5 * (self.supcon(S, pos) + self.supcon(S.t(), pos))
        con = con / (self.M - 1)
        loss = ce + self.gamma1 * con + self.gamma2 * dis / self.M
        return logits, z, loss

    def push(self, z):
        rows = torch.cat([zm.detach() for zm in z], 1)[-self.J:]
        n = rows.shape[0]
        idx = (self.pos + torch.arange(n)) % self.J
        self.dict[idx] = rows
        self.pos = (self.pos + n) % self.J
        self.fill = min(self.fill + n, self.J)


def run(name, s, reps, threads, precision):
    torch.manual_seed(0)
    # bf16: every forward (training and inference) under autocast; its
    # backward runs the matching bf16 products.  float32: no context.
    def ctx():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    model = IMML(s["M"], s["dims"], s["H"], s["k"], s["C"], s["J"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    h = [(torch.rand(s["B"], d) * 2 - 1).requires_grad_() for d in s["dims"]]
    y = torch.arange(s["B"]) % s["C"]
    warm = s["J"] // s["B"] + 3
    t_train = []
    for r in range(-warm, reps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        for x in h:
            x.grad = None
        with ctx():
            _, z, loss = model.forward(h, y)
        loss.backward()
        opt.step()
        model.push(z)
        if r >= 0:
            t_train.append(time.perf_counter() - t0)
    t_infer = []
    with torch.no_grad():
        for r in range(-3, reps):
            t0 = time.perf_counter()
            with ctx():
                model.forward(h)
            if r >= 0:
                t_infer.append(time.perf_counter() - t0)
    core = "unknown"
    try:
        core = torch.__config__.show().split("BLAS_INFO=")[1].split(",")[0]
    except (IndexError, AttributeError):
        pass
    print("%s,%d,%.4f,%.4f,%s,%s" % (name, threads, 1e3 * statistics.median(t_train),
                                     1e3 * statistics.median(t_infer), core, precision))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, s in SHAPES.items():
        if args.shape and args.shape != name:
            continue
        run(name, s, args.reps, args.threads, args.precision)


if __name__ == "__main__":
    main()
