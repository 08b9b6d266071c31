/*
 * bf16 matrix products (doc/DECISIONS.md, "bf16 matrix products"): the
 * operands are rounded to bfloat16 (round to nearest even) and their
 * products accumulated in float32 by the AVX512-BF16 instructions.  The
 * kernel is the library's own: blocked like a BLAS, with every buffer it
 * uses in a scratch block the caller allocated at model creation, so a
 * product never allocates.  Internal: not exported from the shared
 * library.
 */
#ifndef IMML_BF16_H
#define IMML_BF16_H

#include <stddef.h>

/* The most threads one product uses (one scratch region each). */
#define IMML_BF16_THREADS_MAX 8

/* 1 if this build has the bf16 kernel and this CPU (and its operating
 * system) can run it; else 0, with the reason in why[0..n). */
int imml_bf16_supported(char *why, size_t n);

/* Bytes of scratch a context needs: IMML_BF16_THREADS_MAX regions. */
size_t imml_bf16_scratch_bytes(void);
/* Bytes of one region: one thread's part of a product. */
size_t imml_bf16_region_bytes(void);

/* A product is split across threads only where every part gets at least
 * this many multiply-adds: IMML_BF16_START_MIN_MACS when the split would
 * start the call's helpers (starting and joining a thread costs some 50
 * microseconds here, about what a part of 4 M multiply-adds gains), and
 * IMML_BF16_PART_MIN_MACS once they run and a part costs a wake-up.  The
 * context holds both (start_min_macs, part_min_macs): tests lower them. */
#define IMML_BF16_START_MIN_MACS 4.0e6
#define IMML_BF16_PART_MIN_MACS 1.0e6

struct k_ctx;
struct imml_allocator;

/* C = alpha op(A) op(B) + beta C with the contract of k_gemm (C is not
 * read when beta is 0), on up to `threads` threads (the context's team),
 * in the context's scratch.  Only call it once imml_bf16_supported() said
 * 1.  m, n >= 1 and kk >= 1. */
void imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a, int trans_b,
                    int m, int n, int kk, float alpha, const float *a, int lda,
                    const float *b, int ldb, float beta, float *c, int ldc);

/* A bf16 product context (kernels.h) with its scratch, its team (team.h)
 * and `work_floats` floats of work memory per team member (for tasks,
 * k_tasks), in one block from `alloc` (lib/arena.c's imml_alloc); NULL
 * when out of memory.  A model and each of its shares own one: no state
 * is shared between them. */
struct k_ctx *imml_bf16_ctx_create(const struct imml_allocator *alloc,
                                   size_t work_floats);
/* Joins the helpers the context's products started in this call: every
 * public call that runs products calls it before it returns. */
void imml_bf16_ctx_end(struct k_ctx *ctx);
void imml_bf16_ctx_free(const struct imml_allocator *alloc, struct k_ctx *ctx);
/* The bytes imml_bf16_ctx_create allocates. */
size_t imml_bf16_ctx_bytes(size_t work_floats);

/* The least multiply-adds a part of a job must have to go to another
 * thread now: start_min_macs while the context's helpers are not running
 * in this call, part_min_macs once they are. */
double imml_bf16_part_min(const struct k_ctx *ctx);

/* Runs fn(arg, part, solo) for part 0 .. parts-1 on up to `threads`
 * threads of the context's team, solo the running member's own
 * single-thread context (kernels.h's k_tasks). */
void imml_bf16_tasks(struct k_ctx *ctx, int threads, int parts,
                     void (*fn)(void *arg, int part, struct k_ctx *solo),
                     void *arg);

/* Rounds x to the nearest bfloat16 (ties to even), as the kernel does with
 * every operand, and returns it as a float: the reference of the tests. */
float imml_bf16_round(float x);

#endif /* IMML_BF16_H */
