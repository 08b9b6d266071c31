#!/usr/bin/env python3
"""Time per training step added by the Python boundary, against the C step,
on bench/bench.c's small and paper shapes (M = 2, J = 256, predominant
modality fixed so every step runs the whole method, AdamW, input gradients
dL/dh_m computed), and on request (--shapes tiny) on a shape whose C step
takes microseconds, which shows the boundary's fixed cost per step.

One training step, five ways:

- C (imml-bench): bench/imml-bench --csv --shape S --threads T, its own
  process: imml_forward TRAIN, imml_backward with dL/dh outputs,
  imml_commit, imml_optim_step.
- C (ctypes): the same four C calls made from this process through ctypes
  with prepared arguments: the C step measured beside the others.
- numpy: imml.Model.forward(train) + backward(out=preallocated dL/dh) +
  commit() + step(): the numpy layer, every argument checked.
- torch: imml.torch.IMML as a PyTorch host uses it: out = head(h, y) on
  tensors that require grad, out.loss.backward() (the autograd Function:
  imml_backward into new dL/dh tensors, then imml_commit), head.step()
  (imml_optim_step).  Its parameters are torch tensors over the library's
  memory, i.e. the library has handed out pointers to its parameter and
  gradient blocks, so each backward and optimiser step reads those blocks
  once more (imml.h, imml_param_flat; doc/DECISIONS.md).
- C exposed (ctypes): as C (ctypes) on a model whose blocks were handed out
  with imml_param_flat: that read, without any Python.
- torch+AdamW (informative, not the boundary): torch with
  torch.optim.AdamW over the module's parameters instead of head.step().

The in-process variants run interleaved, one step of each in turn, so that
load on a shared machine falls on all of them alike, in an order rotated at
every repetition, so that each follows each other equally often;
imml-bench runs once per round between them.  Every column is the median over --rounds rounds of
the per-round medians of --reps steps.  Overheads are against C (ctypes).
All use one release build of libimml (--build, default build-bench as
bench/compare.sh, configured and built when missing).  imml-bench always
reports elapsed time; --clock thread times the in-process variants by this
thread's CPU time instead (one thread only), for a machine shared with
other work.

    python3 bench/python_boundary.py [--reps 30] [--rounds 3] [--threads 1,2]
                                     [--clock wall|thread]
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(
    os.path.abspath(__file__)), ".."))

# bench/bench.c's shapes: B, dims, H, k, C, J; and "tiny" (not in
# bench.c: --shapes tiny), whose C step is a few microseconds, so that what
# the other variants add is the boundary's fixed cost per step
SHAPES = {
    "small": (64, [216, 6], 256, 128, 10, 256),
    "paper": (64, [768, 6144], 512, 256, 101, 256),
    "tiny": (4, [4, 4], 4, 4, 2, 4),
}


def build(dirname):
    if not os.path.isdir(dirname):
        subprocess.run(["meson", "setup", dirname, "--buildtype=release",
                        "-Dtests=false"], check=True,
                       stdout=subprocess.DEVNULL)
    # imml-bench links libimml.so.1: building it builds the library
    subprocess.run(["ninja", "-C", dirname, "bench/imml-bench"], check=True,
                   stdout=subprocess.DEVNULL)


def imml_bench_ms(bench, shape, threads, reps):
    if shape not in ("small", "paper"):
        return float("nan")
    out = subprocess.run([bench, "--csv", "--shape", shape, "--threads",
                          str(threads), "--reps", str(reps)], check=True,
                         stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return float(out.strip().split(",")[2])


class Steps:
    """One model per variant, on bench.c's inputs (uniform in [-1, 1),
    labels i % C)."""

    def __init__(self, imml, np, torch, shape):
        import imml.torch
        B, dims, H, k, C, J = SHAPES[shape]
        self.warm = J // B + 3
        self.warmed = False
        cfg = dict(hidden_dim=H, knowledge_dim=k, max_batch=B, dict_size=J,
                   predominant=0)
        rng = np.random.default_rng(0)
        self.xs = [rng.uniform(-1, 1, (B, d)).astype(np.float32)
                   for d in dims]
        self.y = (np.arange(B) % C).astype(np.int64)
        self.dh = [np.empty_like(x) for x in self.xs]
        lib = imml._model.lib

        def raw(expose):
            m = imml.Model(dims=dims, n_classes=C, **cfg)
            m.optim("adamw")
            if expose:
                m.flat()
            h = m._h
            xp = (ctypes.c_void_p * 2)(*[x.ctypes.data for x in self.xs])
            dp = (ctypes.c_void_p * 2)(*[d.ctypes.data for d in self.dh])
            y32 = self.y.astype(np.intc)
            args = (h, 0, B, ctypes.addressof(xp), y32.ctypes.data, None,
                    None)
            dpa = ctypes.addressof(dp)
            fwd, bwd = lib.imml_forward, lib.imml_backward
            com, opt = lib.imml_commit, lib.imml_optim_step

            def step():
                if fwd(*args) or bwd(h, dpa) or com(h) or opt(h):
                    raise RuntimeError(lib.imml_model_errmsg(h).decode())
            step.keep = (m, xp, dp, y32)
            return step

        npm = imml.Model(dims=dims, n_classes=C, **cfg)
        npm.optim("adamw")

        def numpy_step():
            npm.forward(self.xs, self.y)
            npm.backward(out=self.dh)
            npm.commit()
            npm.step()

        def torch_step(torch_optim):
            head = imml.torch.IMML(dims=dims, n_classes=C, **cfg)
            h = [torch.from_numpy(x.copy()).requires_grad_()
                 for x in self.xs]
            labels = torch.from_numpy(self.y)
            if torch_optim:
                o = torch.optim.AdamW(head.parameters())

                def step():
                    out = head(h, labels)
                    o.zero_grad(set_to_none=True)
                    out.loss.backward()
                    o.step()
            else:
                head.optim("adamw")

                def step():
                    out = head(h, labels)
                    out.loss.backward()
                    head.step()
            return step

        self.variants = {"ctypes": raw(False), "numpy": numpy_step,
                         "torch": torch_step(False), "exposed": raw(True),
                         "torch+AdamW": torch_step(True)}

    def round(self, reps, clock):
        """reps steps of every variant, interleaved: one step of each in
        turn, so that load on the machine falls on all alike, in an order
        rotated at every repetition, so that each variant follows each
        other equally often (the one after a large step finds its own data
        out of the caches)."""
        names = list(self.variants)
        warm = 3 if self.warmed else self.warm  # first: fill the dictionary
        self.warmed = True
        for k in names:
            for _ in range(warm):
                self.variants[k]()
        t = {k: [] for k in names}
        for i in range(reps):
            s = i % len(names)
            for k in names[s:] + names[:s]:
                t0 = clock()
                self.variants[k]()
                t[k].append(clock() - t0)
        return {k: 1e3 * statistics.median(v) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default="small,paper")
    ap.add_argument("--build", default=os.path.join(ROOT, "build-bench"))
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall: elapsed time (as imml-bench); thread: this "
                    "thread's CPU time, which time-sharing with other "
                    "processes does not inflate (with --threads 1 only: "
                    "the BLAS then computes on the calling thread)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "thread" and args.threads != "1":
        ap.error("--clock thread needs --threads 1")
    build(args.build)
    bench = os.path.join(args.build, "bench", "imml-bench")
    os.environ["IMML_LIBRARY"] = os.path.join(args.build, "libimml.so.1")
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import numpy as np
    import torch
    import imml
    import imml._model

    print("# libimml %s (%s), torch %s, %d cores; %s clock; %d steps per "
          "round, medians; median of %d rounds; overheads against C (ctypes)"
          % (imml.version(), imml.library_path(), torch.__version__,
             os.cpu_count(), args.clock, args.reps, args.rounds))
    print("%-6s %3s %9s %9s %9s %7s %9s %7s %9s %7s %11s" % (
        "shape", "thr", "imml-bench", "C ctypes", "numpy", "+%", "torch",
        "+%", "C exposed", "+%", "torch+AdamW"))
    for t in [int(v) for v in args.threads.split(",")]:
        torch.set_num_threads(t)
        imml.set_threads(t)
        for shape in args.shapes.split(","):
            steps = Steps(imml, np, torch, shape)
            rounds = []
            for _ in range(args.rounds):
                r = steps.round(args.reps, clock)
                r["bench"] = imml_bench_ms(bench, shape, t, args.reps)
                rounds.append(r)
            med = {k: statistics.median(r[k] for r in rounds)
                   for k in rounds[0]}
            c = med["ctypes"]
            print("%-6s %3d %10.3f %9.3f %9.3f %+6.1f%% %9.3f %+6.1f%% "
                  "%9.3f %+6.1f%% %11.3f" % (
                      shape, t, med["bench"], c, med["numpy"],
                      100 * (med["numpy"] / c - 1), med["torch"],
                      100 * (med["torch"] / c - 1), med["exposed"],
                      100 * (med["exposed"] / c - 1), med["torch+AdamW"]))
            sys.stdout.flush()
            del steps


if __name__ == "__main__":
    main()
