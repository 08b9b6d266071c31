/*
 * What the library knows about the blocks it alone writes (the struct
 * imml_cache, in internal.h), and the one place that changes it.
 *
 * A step is cheaper when the library can trust facts it kept instead of
 * reading a block: that the gradients are all +0.0 (a backward then
 * accumulates into them directly), and the largest magnitudes of the
 * parameters, gradients and AdamW moments (an optimiser step then proves
 * its update finite from four numbers).  Each fact holds only until
 * something it cannot see may have changed the block, so every call site
 * says what happened (imml_cache_note) and this file alone decides what
 * that invalidates.  Handing the host a pointer into a block (imml_param_get,
 * imml_param_flat) is such an event for good: from then on the blocks are
 * read instead (doc/ARCHITECTURE.md, "What the host's pointers cost").
 *
 * Header-only (static inline): a lib/cache.c would need a line in the top
 * meson.build's source list.
 */
#ifndef IMML_CACHE_H
#define IMML_CACHE_H

#include "internal.h"

#include <math.h>

typedef enum imml_event {
  IMML_EV_ARENA_NEW,        /* a new arena: gradients +0.0, parameters next */
  IMML_EV_PARAMS_CHANGED,   /* parameters written by other means (a test) */
  IMML_EV_GRADS_ZEROED,     /* the library set every gradient to +0.0 */
  IMML_EV_GRADS_ADDED,      /* a backward added its gradients; x.g: their
                             * max if they were added to zeros, else NaN */
  IMML_EV_PARAMS_EXPOSED,   /* the host holds a pointer to the parameters */
  IMML_EV_GRADS_EXPOSED,    /* ... to the gradients */
  IMML_EV_MOMENTS_ZEROED,   /* a new optimiser: both moments +0.0 */
  IMML_EV_MOMENTS_LOADED,   /* moments read from a checkpoint */
  IMML_EV_MOMENTS_MEASURED, /* x.m1, x.m2 read from the moments */
  IMML_EV_STEPPED           /* an update committed (gradients zeroed); x:
                             * AdamW's new maxima p, m1, m2, NULL for SGD */
} imml_event;

/* Maxima an event brings (NaN: not known). */
typedef struct imml_maxima {
  float p, g, m1, m2;
} imml_maxima;

/* The single point of change of m->cache. */
static inline void imml_cache_note(imml_model *m, imml_event e,
                                   const imml_maxima *x) {
  imml_cache *c = &m->cache;
  switch (e) {
  case IMML_EV_ARENA_NEW:
    c->grads_zero = 1;
    c->max_g = 0.0f;
    c->max_p = NAN; /* parameters are initialised or loaded next */
    break;
  case IMML_EV_PARAMS_CHANGED:
    c->max_p = NAN;
    break;
  case IMML_EV_GRADS_ZEROED:
    c->grads_zero = 1;
    c->max_g = 0.0f;
    break;
  case IMML_EV_GRADS_ADDED:
    c->grads_zero = 0;
    c->max_g = x->g;
    break;
  case IMML_EV_PARAMS_EXPOSED:
    c->exposed |= IMML_EXPOSED_PARAMS;
    break;
  case IMML_EV_GRADS_EXPOSED:
    c->exposed |= IMML_EXPOSED_GRADS;
    break;
  case IMML_EV_MOMENTS_ZEROED:
    c->max1 = c->max2 = 0.0f;
    break;
  case IMML_EV_MOMENTS_LOADED:
    c->max1 = c->max2 = NAN; /* the first step measures them */
    break;
  case IMML_EV_MOMENTS_MEASURED:
    c->max1 = x->m1;
    c->max2 = x->m2;
    break;
  case IMML_EV_STEPPED:
    if (x) {
      c->max1 = x->m1;
      c->max2 = x->m2;
      c->max_p = x->p;
    } else {
      c->max_p = NAN; /* SGD does not track it */
    }
    c->max_g = 0.0f;
    c->grads_zero = 1;
    break;
  }
}

/* The gradients are all +0.0: known, or (once the host holds a pointer to
 * them) checked with one read of the block. */
static inline int imml_cache_grads_zero(const imml_model *m) {
  const imml_cache *c = &m->cache;
  return c->grads_zero && (!(c->exposed & IMML_EXPOSED_GRADS) ||
                           imml_par_all_zero(m->n_params, m->grads));
}

/* Sets *mp, *mg to max |params| and max |grads| and returns 1 when the
 * library knows them without reading either block (neither handed out);
 * else returns 0 and the caller reads the blocks. */
static inline int imml_cache_maxima(const imml_model *m, float *mp, float *mg) {
  if (m->cache.exposed)
    return 0;
  *mp = m->cache.max_p;
  *mg = m->cache.max_g;
  return 1;
}

#endif /* IMML_CACHE_H */
