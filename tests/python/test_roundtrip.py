"""Checkpoints between Python and imml-train, both ways, on the shipped
mfeat data: a model trained and saved from Python predicts the same in
imml-train --predict, and a model imml-train saved reproduces imml-train's
own test accuracy in Python (numpy and torch layers)."""

import os

import numpy as np
import torch

import imml
import imml.torch
from conftest import (DATA, read_csv, read_stats, run_imml_train,
                      standardise, test_accuracy_of, write_stats)

VIEWS = ["fac", "mor"]


def split_files(d, part):
    return [os.path.join(d, "mfeat-%s.%s.csv" % (v, part)) for v in VIEWS]


def read_predictions(path, n_classes):
    a = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    assert a.shape[1] == 2 + n_classes
    assert np.array_equal(a[:, 0], np.arange(len(a)))
    return a[:, 1].astype(np.int64), a[:, 2:]


def test_python_model_in_imml_train(tmp_path):
    d = str(tmp_path)
    # imml-train writes the split (and stops: it trains only to --save)
    run_imml_train(["--quiet", "--write-split", d] +
                   [os.path.join(DATA, "mfeat-%s.csv" % v) for v in VIEWS])
    train = [read_csv(p) for p in split_files(d, "train")]
    test = [read_csv(p) for p in split_files(d, "test")]
    ytr, yte = train[0][1], test[0][1]
    means = [x.mean(axis=0) for x, _ in train]
    sds = [x.std(axis=0) for x, _ in train]
    for s in sds:
        s[s == 0] = 1.0
    xtr = [standardise(x, m, s) for (x, _), m, s in zip(train, means, sds)]
    xte = [standardise(x, m, s) for (x, _), m, s in zip(test, means, sds)]

    model = imml.Model(dims=[x.shape[1] for x in xtr], n_classes=10,
                       max_batch=64, warmup_steps=20, seed=1)
    model.optim(lr=1e-3)
    rng = np.random.default_rng(1)
    for _ in range(4):
        order = rng.permutation(len(ytr))
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            model.train_step([np.ascontiguousarray(x[idx]) for x in xtr],
                             ytr[idx])
    pred = model.predict(xte)
    acc = float((pred.classes == yte).mean())
    assert acc > 0.8

    path = os.path.join(d, "py.imml")
    model.save(path)
    write_stats(path + ".stats", means, sds)
    out = os.path.join(d, "pred.csv")
    _, err = run_imml_train(["--predict", path, "--out", out] +
                            split_files(d, "test"))
    classes, probs = read_predictions(out, 10)
    assert np.array_equal(classes, pred.classes)
    assert np.allclose(probs, pred.probs, rtol=1e-5, atol=1e-6)
    assert ("imml-train: accuracy %.6f (%d of %d rows)"
            % (acc, int((pred.classes == yte).sum()), len(yte))) in err


def test_imml_train_model_in_python(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "model.imml")
    out, _ = run_imml_train(
        ["--quiet", "--seed", "3", "--epochs", "5", "--warmup", "20",
         "--val-fraction", "0", "--write-split", d, "--save", path] +
        [os.path.join(DATA, "mfeat-%s.csv" % v) for v in VIEWS])
    acc_c = test_accuracy_of(out)
    means, sds = read_stats(path + ".stats")
    test = [read_csv(p) for p in split_files(d, "test")]
    yte = test[0][1]
    xte = [standardise(x, m, s) for (x, _), m, s in zip(test, means, sds)]

    model = imml.Model.load(path)
    assert model.dims == tuple(x.shape[1] for x in xte)
    pred = model.predict(xte)
    acc = float((pred.classes == yte).mean())
    assert round(acc, 6) == acc_c  # the accuracy imml-train printed

    pfile = os.path.join(d, "pred.csv")
    run_imml_train(["--predict", path, "--out", pfile] +
                   split_files(d, "test"))
    classes, probs = read_predictions(pfile, 10)
    assert np.array_equal(classes, pred.classes)
    assert np.allclose(probs, pred.probs, rtol=1e-5, atol=1e-6)

    head = imml.torch.IMML.load(path)
    head.eval()
    tc, tp = head.predict([torch.from_numpy(x) for x in xte])
    assert np.array_equal(tc.numpy(), pred.classes)
    assert np.array_equal(tp.numpy(), pred.probs)

    # and back: the model saved again from Python is the same file
    again = os.path.join(d, "again.imml")
    model.save(again)
    assert open(again, "rb").read() == open(path, "rb").read()
