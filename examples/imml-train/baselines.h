/* The peer baselines of --compare, as method_hooks on the library's
 * branches (doc/BASELINES.md has their equations and sources):
 *
 *  - OGM-GE (Peng et al., CVPR 2022): late fusion whose branch gradients
 *    are scaled per modality from the ratio of the modalities' confidence
 *    on the batch, plus Gaussian noise (generalisation enhancement);
 *  - QMF (Zhang et al., ICML 2023): confidence-weighted late fusion, a host
 *    F&T of per-modality linear heads weighted by their energy scores, with
 *    the unimodal losses and the history-based ranking regulariser. */
#ifndef IMML_TRAIN_BASELINES_H
#define IMML_TRAIN_BASELINES_H

#include "train.h"

#include <imml.h>

#include <stdint.h>

/* OGM-GE's alpha (the default: the value the authors recommend for
 * CREMA-D, two modalities of very unequal strength, as in mfeat's pairs). */
#define OGM_ALPHA 0.8f

typedef struct ogm_state ogm_state;

/*! ogm_create() : the OGM-GE hooks for a late-fusion model of M modalities,
 *  knowledge width k, C classes and batches up to max_batch, with
 *  modulation strength alpha and the noise drawn from `seed`.  The model
 *  must use the built-in F&T and gamma2 = 0: OGM-GE's unimodal outputs
 *  (the fused linear head's slice of each modality, plus its share of the
 *  bias) are computed by the library's own unimodal heads, whose weights
 *  the hooks overwrite with those slices before each step.
 *  @return NULL after printing an error. */
ogm_state *ogm_create(int m, int k, int c, int max_batch, float alpha,
                      uint64_t seed, method_hooks *hooks);
/*! ogm_coeff() : the gradient coefficient k_m of the last batch. */
float ogm_coeff(const ogm_state *s, int m);
/*! ogm_mean_coeff() : the mean gradient coefficient k_m of modality m over
 *  the steps so far (1 = not slowed down). */
double ogm_mean_coeff(const ogm_state *s, int m);
void ogm_free(ogm_state *s);

typedef struct qmf_state qmf_state;

/*! qmf_create() : the QMF host F&T and hooks for M modalities of knowledge
 *  width k, C classes, batches up to max_batch, n_train training rows
 *  (indices of the per-sample loss history), the host heads initialised
 *  from `seed` and trained with the optimiser of `o` (kind, lr, weight
 *  decay, momentum).  @return NULL after printing an error. */
qmf_state *qmf_create(int m, int k, int c, int max_batch, int n_train,
                      const train_opts *o, method_hooks *hooks);
void qmf_free(qmf_state *s);

/*! qmf_gradcheck() : test support.  QMF's backward on a small random batch
 *  (3 modalities, ranking terms active) against central finite differences
 *  of its loss computed in double, over every host parameter and slot
 *  entry.  @return the norm-wise relative error. */
double qmf_gradcheck(uint64_t seed);

#endif
