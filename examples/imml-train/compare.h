/* --compare: IMML, its ablations and peer baselines trained on the same
 * seeded splits. */
#ifndef IMML_TRAIN_COMPARE_H
#define IMML_TRAIN_COMPARE_H

#include "data.h"
#include "train.h"

/*! run_compare() : for seeds o->seed .. o->seed + seeds - 1: the training
 *  and test rows (rt NULL: a stratified split of rd with o->test_fraction;
 *  else rd is every training row and rt the test rows), a stratified
 *  training subsample (f->subsample), a stratified validation split
 *  (f->val_fraction), standardisation with the remaining (fitting) rows;
 *  then trains, each with the validation rows' best epoch and early
 *  stopping: every modality alone, late fusion, late fusion + unimodal
 *  heads, OGM-GE, QMF, IMML conditional and IMML strict; prints the table
 *  on stdout.
 *  @return 0, or 1 after printing an error. */
int run_compare(const train_opts *o, const fit_opts *f, const raw_data *rd,
                const raw_data *rt, int seeds);

#endif
