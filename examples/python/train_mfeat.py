#!/usr/bin/env python3
"""PyTorch encoders trained through libimml on the shipped mfeat digits.

Two views of the same 2000 handwritten digits go through their own PyTorch
encoder (a small CNN on the 15 x 16 pixel image of mfeat-pix, an MLP on any
other view) into imml.torch.IMML (MDKEN + front-door adjustment + the
built-in fusion and target head).  IMML's loss flows back through a
torch.autograd.Function into the encoders; one torch Adam updates the
encoders and libimml's parameters (nn.Parameters over the library's own
memory).  Next to it, the same encoders with a plain late-fusion head
(concatenation + linear, cross-entropy) are trained on the same split for
comparison.

    python3 examples/python/train_mfeat.py                  # pix + fou
    python3 examples/python/train_mfeat.py --views fac,mor --epochs 30
    imml-train --write-split DIR ... && \\
        python3 examples/python/train_mfeat.py --split DIR  # imml-train's split

The split is a stratified 50/50 one drawn from --seed, or with --split DIR
exactly the one imml-train --write-split wrote (NAME.train.csv,
NAME.test.csv); features are standardised with the training rows' mean and
population standard deviation, in double, as imml-train does.  Batches of
--batch rows, Adam with --lr, --epochs epochs: imml-train's defaults.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

import imml
import imml.torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "mfeat")


def read_csv(path):
    """An mfeat-format CSV: header row, features, integer label last."""
    a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    return a[:, :-1], a[:, -1].astype(np.int64)


def stratified_split(labels, seed):
    """Half of each class's rows (rounded) for testing."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        test[rng.permutation(rows)[:int(round(0.5 * len(rows)))]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def load(views, split, seed):
    """[(train x, test x)] per view and the train / test labels."""
    if split:
        xs = []
        for v in views:
            xtr, ytr = read_csv(os.path.join(split, "mfeat-%s.train.csv" % v))
            xte, yte = read_csv(os.path.join(split, "mfeat-%s.test.csv" % v))
            xs.append((xtr, xte))
        return xs, ytr, yte
    raw = [read_csv(os.path.join(DATA, "mfeat-%s.csv" % v)) for v in views]
    y = raw[0][1]
    tr, te = stratified_split(y, seed)
    return [(x[tr], x[te]) for x, _ in raw], y[tr], y[te]


def standardise(xtr, xte):
    """imml-train's standardisation: training mean and population std in
    double (a constant column gets std 1), then float32."""
    mean = xtr.mean(axis=0)
    sd = xtr.std(axis=0)
    sd[sd == 0] = 1.0
    return (((xtr - mean) / sd).astype(np.float32),
            ((xte - mean) / sd).astype(np.float32))


class PixCNN(torch.nn.Module):
    """mfeat-pix: 240 pixel averages of a 15 x 16 image (rows of 15)."""

    def __init__(self, out_dim):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),                       # 16 x 8 x 7
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2))                       # 32 x 4 x 3
        self.fc = torch.nn.Linear(32 * 4 * 3, out_dim)

    def forward(self, x):
        x = self.conv(x.view(-1, 1, 16, 15))
        return torch.relu(self.fc(x.flatten(1)))


def encoder(view, in_dim, out_dim):
    if view == "pix":
        return PixCNN(out_dim)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim),
                               torch.nn.ReLU())


def accuracy(pred, y):
    return float((pred == y).float().mean())


def train(head_kind, views, data, args):
    """Trains encoders + head; returns (test accuracy, seconds, detail)."""
    (xs, ytr, yte) = data
    torch.manual_seed(args.seed)
    encs = torch.nn.ModuleList(
        [encoder(v, x[0].shape[1], args.feature_dim)
         for v, x in zip(views, xs)])
    dims = [args.feature_dim] * len(views)
    n_classes = int(ytr.max()) + 1
    if head_kind == "imml":
        head = imml.torch.IMML(dims=dims, n_classes=n_classes,
                               max_batch=max(args.batch, 256),
                               seed=args.seed)
    else:
        head = torch.nn.Linear(sum(dims), n_classes)
    opt = torch.optim.Adam(list(encs.parameters()) + list(head.parameters()),
                           lr=args.lr)
    xtr = [torch.from_numpy(x[0]) for x in xs]
    xte = [torch.from_numpy(x[1]) for x in xs]
    ytr_t = torch.from_numpy(ytr)
    yte_t = torch.from_numpy(yte)
    rng = np.random.default_rng(args.seed)
    n = len(ytr)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        encs.train()
        head.train()
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for s in range(0, n, args.batch):
            idx = order[s:s + args.batch]
            h = [e(x[idx]) for e, x in zip(encs, xtr)]
            if head_kind == "imml":
                # imml_forward(TRAIN); backward: imml_backward (dL/dh_m into
                # the encoders) + imml_commit
                loss = head(h, ytr_t[idx]).loss
            else:
                loss = torch.nn.functional.cross_entropy(
                    head(torch.cat(h, 1)), ytr_t[idx])
            opt.zero_grad(set_to_none=True)  # libimml zeroes its own
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        if not args.quiet:
            print("  %s epoch %d/%d: loss %.4f" % (head_kind, epoch + 1,
                                                   args.epochs, total / n),
                  file=sys.stderr)
    seconds = time.perf_counter() - t0
    encs.eval()
    head.eval()
    with torch.no_grad():
        h = [e(x) for e, x in zip(encs, xte)]
        if head_kind == "imml":
            classes, _ = head.predict(h)
            p = head.model.predominant
            detail = "predominant modality %s" % (
                "%d (%s)" % (p, views[p]) if p is not None else "not fixed")
        else:
            classes = head(torch.cat(h, 1)).argmax(1)
            detail = ""
    return accuracy(classes, yte_t), seconds, detail, encs, head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", default="pix,fou",
                    help="two or more of fac,fou,kar,mor,pix,zer (pix,fou)")
    ap.add_argument("--split", metavar="DIR",
                    help="use the split imml-train --write-split wrote")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--feature-dim", type=int, default=128,
                    help="width of each encoder's output (128)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1: reproducible)")
    ap.add_argument("--only-imml", action="store_true",
                    help="skip the late-fusion baseline")
    ap.add_argument("--save", metavar="FILE",
                    help="save the IMML head (imml_model_save)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    views = args.views.split(",")
    if len(views) < 2 or not all(
            v in ("fac", "fou", "kar", "mor", "pix", "zer") for v in views):
        ap.error("--views: two or more of fac,fou,kar,mor,pix,zer")
    torch.set_num_threads(args.threads)
    imml.set_threads(args.threads)
    xs, ytr, yte = load(views, args.split, args.seed)
    xs = [standardise(a, b) for a, b in xs]
    data = (xs, ytr, yte)
    print("mfeat %s: %d train / %d test rows, %d epochs, batch %d, Adam lr "
          "%g, seed %d, libimml %s" % ("+".join(views), len(ytr), len(yte),
                                       args.epochs, args.batch, args.lr,
                                       args.seed, imml.version()))
    print("%-34s %9s %8s" % ("method", "test acc", "time"))
    results = {}
    for kind in (["imml"] if args.only_imml else ["late-fusion", "imml"]):
        acc, secs, detail, _, head = train(kind, views, data, args)
        name = ("encoders + IMML" if kind == "imml"
                else "encoders + late fusion")
        print("%-34s %8.2f%% %7.1fs %s" % (name, 100 * acc, secs, detail))
        results[kind] = acc
        if kind == "imml" and args.save:
            head.save(args.save)
    return results


if __name__ == "__main__":
    main()
