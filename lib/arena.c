/* The allocator hooks and the carving of the one arena per model: every
 * parameter, gradient, activation and scratch buffer is sized at create
 * time, so forward and backward never allocate. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CARVE_ALIGN 64

void *imml_alloc(const imml_allocator *a, size_t bytes) {
  if (bytes == 0)
    bytes = 1;
  if (a && a->malloc_fn)
    return a->malloc_fn(bytes, a->user_data);
  return malloc(bytes);
}

void imml_free(const imml_allocator *a, void *p) {
  if (!p)
    return;
  if (a && a->free_fn)
    a->free_fn(p, a->user_data);
  else
    free(p);
}

/* Counting saturates: once a size overflows, used stays SIZE_MAX and the
 * overflow flag tells (the memory limit then refuses the model). */
void *imml_carve(imml_carver *c, size_t count, size_t elem) {
  size_t bytes, start = c->used;
  if (c->overflow || !imml_size_mul(&bytes, count, elem)) {
    c->overflow = 1;
    c->used = SIZE_MAX;
    return NULL;
  }
  size_t pad = (CARVE_ALIGN - start % CARVE_ALIGN) % CARVE_ALIGN;
  if (!imml_size_add(&start, pad) || !imml_size_add(&bytes, start)) {
    c->overflow = 1;
    c->used = SIZE_MAX;
    return NULL;
  }
  c->used = bytes;
  return c->base ? c->base + start : NULL;
}

static float *carve_f(imml_carver *c, size_t a, size_t b) {
  size_t n;
  if (!imml_size_mul(&n, a, b)) {
    c->overflow = 1;
    return NULL;
  }
  return imml_carve(c, n, sizeof(float));
}

void imml_carve_acts(imml_carver *c, const imml_config *cfg, int jmax,
                     int training, imml_acts *a, fdc_scratch *att) {
  const size_t B = (size_t)cfg->max_batch, H = (size_t)cfg->hidden_dim,
               k = (size_t)cfg->knowledge_dim, C = (size_t)cfg->n_classes;
  for (int m = 0; m < cfg->n_modalities; m++) {
    a->h[m] = training ? carve_f(c, B, (size_t)cfg->dims[m]) : NULL;
    a->u[m] = carve_f(c, B, H);
    a->z[m] = carve_f(c, B, k);
    a->o[m] = carve_f(c, B, C);
    a->po[m] = carve_f(c, B, C);
    a->nz[m] = carve_f(c, B, k);
    a->r[m] = carve_f(c, B, 1);
    a->s[m] = carve_f(c, B, B);
    a->st[m] = carve_f(c, B, B);
    a->slot[m] = carve_f(c, B, k);
  }
  a->q = carve_f(c, B, k);
  att->kk = carve_f(c, (size_t)jmax, k);
  a->qk = carve_f(c, B, (size_t)cfg->n_modalities * k);
  att->alpha = carve_f(c, B, (size_t)jmax);
  att->w = carve_f(c, B, (size_t)jmax);
  a->logits = carve_f(c, B, C);
  a->probs = carve_f(c, B, C);
  a->labels = imml_carve(c, B, sizeof(int));
}

static void add_tensor(imml_tensor *t, int *nt, uint64_t *off, const char *name,
                       int rows, int cols, int fan_in) {
  imml_tensor *x = &t[(*nt)++];
  snprintf(x->name, sizeof x->name, "%s", name);
  x->fan_in = fan_in;
  x->rows = rows;
  x->cols = cols;
  x->offset = (size_t)*off;
  *off += (uint64_t)rows * (uint64_t)cols;
}

uint64_t imml_params_layout(const imml_config *cfg, int builtin_ft,
                            imml_tensor *t, int *n_tensors) {
  /* imml_config_validate's limits keep the total below 2^58: no overflow
   * in 64 bits.  The caller checks that it fits size_t. */
  const int H = cfg->hidden_dim, k = cfg->knowledge_dim, C = cfg->n_classes,
            M = cfg->n_modalities;
  uint64_t off = 0;
  int nt = 0;
  char name[IMML_NAME_SIZE];
  for (int m = 0; m < M; m++) {
    static const char *const suffix[IMML_PER_MODALITY] = {"w1", "b1", "w2",
                                                          "b2", "wc", "bc"};
    const int rows[IMML_PER_MODALITY] = {cfg->dims[m], 1, H, 1, k, 1};
    const int cols[IMML_PER_MODALITY] = {H, H, k, k, C, C};
    /* A bias shares the fan-in of its layer's weight. */
    const int fan[IMML_PER_MODALITY] = {cfg->dims[m], cfg->dims[m], H, H, k, k};
    for (int i = 0; i < IMML_PER_MODALITY; i++) {
      snprintf(name, sizeof name, "m%d.%s", m, suffix[i]);
      add_tensor(t, &nt, &off, name, rows[i], cols[i], fan[i]);
    }
  }
  add_tensor(t, &nt, &off, "fdc.wq", M * k, k, M * k);
  add_tensor(t, &nt, &off, "fdc.wk", M * k, k, M * k);
  if (builtin_ft) {
    add_tensor(t, &nt, &off, "ft.w", M * k, C, M * k);
    add_tensor(t, &nt, &off, "ft.b", 1, C, M * k);
  }
  *n_tensors = nt;
  return off;
}

void imml_ptensors_point(const imml_model *m, float *base, imml_ptensors *t) {
  memset(t, 0, sizeof *t);
  if (!base)
    return;
  const imml_tensor *x = m->tensors;
  for (int mm = 0; mm < m->cfg.n_modalities; mm++, x += IMML_PER_MODALITY) {
    t->w1[mm] = base + x[T_W1].offset;
    t->b1[mm] = base + x[T_B1].offset;
    t->w2[mm] = base + x[T_W2].offset;
    t->b2[mm] = base + x[T_B2].offset;
    t->wc[mm] = base + x[T_WC].offset;
    t->bc[mm] = base + x[T_BC].offset;
  }
  t->wq = base + x[0].offset;
  t->wk = base + x[1].offset;
  if (m->builtin_ft) {
    t->ftw = base + x[2].offset;
    t->ftb = base + x[3].offset;
  }
}
