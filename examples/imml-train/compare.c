/* imml_warmup_get() (model_p) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "compare.h"

#include "rng.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { UNI, LF, LFH, IMC, IMS, N_METHODS };

static const char *const method_name[N_METHODS] = {
    "unimodal", "late fusion", "late fusion + heads", "IMML conditional",
    "IMML strict"};

/* Training order within a seed: the IMML runs first, so that with
 * --predominant auto the conditional run's choice of p is known before the
 * unimodal baseline and the corrupted-auxiliary test need it. */
static const int run_order[N_METHODS] = {IMC, IMS, UNI, LF, LFH};

typedef struct stat_acc {
  double sum, sum2;
  int n;
} stat_acc;

static void stat_add(stat_acc *s, double v) {
  s->sum += v;
  s->sum2 += v * v;
  s->n++;
}

static double stat_mean(const stat_acc *s) {
  return s->n ? s->sum / s->n : NAN;
}

/* Sample standard deviation (n - 1); 0 for a single value. */
static double stat_std(const stat_acc *s) {
  if (s->n < 2)
    return 0.0;
  const double m = s->sum / s->n;
  const double v = (s->sum2 - s->n * m * m) / (s->n - 1);
  return v > 0.0 ? sqrt(v) : 0.0;
}

typedef struct eval_out {
  double acc, f1, acc_shuffled;
} eval_out;

static int evaluate(imml_model *model, const dataset *te, int c,
                    int *const *swap, int *pred, eval_out *e) {
  if (predict_rows(model, te, NULL, pred, NULL) != 0)
    return -1;
  e->acc = accuracy(te->y, pred, te->n);
  e->f1 = macro_f1(te->y, pred, te->n, c);
  if (predict_rows(model, te, swap, pred, NULL) != 0)
    return -1;
  e->acc_shuffled = accuracy(te->y, pred, te->n);
  return 0;
}

/* The predominant modality a trained model uses: its fixed p, or, when the
 * warm-up outlasted training, the one its warm-up EMAs favour (the rule
 * the library applies when warm-up ends). */
static int model_p(imml_model *model, int m, float *ema) {
  int p = -1, fixed = 0, steps = 0;
  imml_predominant_get(model, &p, &fixed);
  imml_warmup_get(model, &steps, ema);
  if (fixed && p >= 0)
    return p;
  p = 0;
  for (int i = 1; i < m; i++)
    if (ema[i] > ema[p])
      p = i;
  return p;
}

int run_compare(const train_opts *o, const raw_data *rd, int seeds,
                double frac) {
  const int M = rd->m, C = rd->c;
  char names[IMML_MAX_MODALITIES][64];
  for (int m = 0; m < M; m++)
    base_name(rd->path[m], names[m], sizeof names[m]);
  stat_acc acc[N_METHODS] = {{0}}, f1[N_METHODS] = {{0}},
           shuf[N_METHODS] = {{0}}, secs[N_METHODS] = {{0}};
  stat_acc head[IMML_MAX_MODALITIES] = {{0}},
           ema_s[IMML_MAX_MODALITIES] = {{0}};
  stat_acc margin = {0};
  long train_steps = 0;
  int warmup_outlasted = 0;
  int *p_seed = calloc((size_t)seeds, sizeof(int));
  int chosen_c[IMML_MAX_MODALITIES] = {0}, chosen_s[IMML_MAX_MODALITIES] = {0};
  int *tr_idx = NULL, *te_idx = NULL, *pred = NULL, *perm = NULL;
  float *zeros = NULL;
  dataset tr = {0}, te = {0};
  stdz sz = {0};
  int rc = 1;
  if (!p_seed)
    goto oom;
  const double t_start = now_seconds();
  for (int si = 0; si < seeds; si++) {
    train_opts so = *o;
    so.seed = o->seed + (uint64_t)si;
    char err[512];
    int ntr = 0, nte = 0;
    if (split_stratified(rd->y, rd->n, C, frac, so.seed, &tr_idx, &ntr, &te_idx,
                         &nte, err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
    if (nte == 0) {
      errorf("--test-fraction %g leaves no test rows", frac);
      goto out;
    }
    if (stdz_fit(&sz, rd, tr_idx, ntr, o->no_standardize) != 0 ||
        stdz_apply(&sz, rd, tr_idx, ntr, &tr) != 0 ||
        stdz_apply(&sz, rd, te_idx, nte, &te) != 0)
      goto oom;
    pred = malloc((size_t)nte * sizeof(int));
    perm = malloc((size_t)nte * sizeof(int));
    zeros = calloc((size_t)(ntr > nte ? ntr : nte), sizeof(float));
    if (!pred || !perm || !zeros)
      goto oom;
    /* One seeded permutation of the test rows, shared by every auxiliary
     * modality and every method of this seed. */
    for (int i = 0; i < nte; i++)
      perm[i] = i;
    trng r;
    trng_seed(&r, so.seed, 3);
    trng_shuffle(&r, perm, (size_t)nte);
    const long steps = (long)so.epochs * ((ntr + so.batch - 1) / so.batch);
    train_steps = steps;
    if (steps < o->warmup)
      warmup_outlasted = 1;
    const int no_fdc_warmup = steps >= INT_MAX ? INT_MAX : (int)steps + 1;
    int p = o->predominant;
    for (int oi = 0; oi < N_METHODS; oi++) {
      const int meth = run_order[oi];
      train_opts mo = so;
      dataset mtr = tr, mte = te;
      int dims_uni[2];
      if (meth == IMC || meth == IMS) {
        mo.slot_mode = meth == IMC ? IMML_SLOT_CONDITIONAL : IMML_SLOT_STRICT;
      } else {
        /* No front-door: an automatic p whose warm-up outlasts training
         * keeps every slot at z_m (METHOD.md section 5). */
        mo.predominant = -1;
        mo.warmup = no_fdc_warmup;
        mo.gamma1 = 0.0f;
        if (meth != LFH)
          mo.gamma2 = 0.0f;
      }
      if (meth == UNI) {
        /* The predominant modality alone: M = 2 with a constant-zero
         * auxiliary input of width 1, so its branch only adds a constant
         * slot (a bias) to the F&T: a unimodal MLP d_p -> H -> k -> C. */
        dims_uni[0] = tr.d[p];
        dims_uni[1] = 1;
        mtr.m = mte.m = 2;
        mtr.d[0] = mte.d[0] = tr.d[p];
        mtr.d[1] = mte.d[1] = 1;
        mtr.x[0] = tr.x[p];
        mte.x[0] = te.x[p];
        mtr.x[1] = mte.x[1] = zeros;
      }
      imml_config cfg;
      make_config(&mo, mtr.m, meth == UNI ? dims_uni : tr.d, C, &cfg);
      char title[160];
      snprintf(title, sizeof title, "[seed %d/%d] %s: ", si + 1, seeds,
               method_name[meth]);
      run_spec spec = {title, 0, 0, 1, NULL};
      imml_model *model = NULL;
      epoch_report rep;
      if (train_run(&mo, &cfg, &mtr, &mte, &spec, &model, &rep) != 0)
        goto out;
      if (meth == IMC || meth == IMS) {
        float ema[IMML_MAX_MODALITIES];
        const int mp = model_p(model, M, ema);
        (meth == IMC ? chosen_c : chosen_s)[mp]++;
        if (meth == IMC) {
          if (p < 0)
            p = mp;
          p_seed[si] = p;
          double best_aux = -1.0, hp = 0.0;
          for (int m = 0; m < M; m++) {
            if (head_predict(model, m, &te, pred) != 0) {
              imml_model_free(model);
              goto out;
            }
            const double a = accuracy(te.y, pred, nte);
            stat_add(&head[m], a);
            stat_add(&ema_s[m], ema[m]);
            if (m == p)
              hp = a;
            else if (a > best_aux)
              best_aux = a;
          }
          stat_add(&margin, hp - best_aux);
        }
      }
      int *swap[IMML_MAX_MODALITIES] = {0};
      if (meth == UNI)
        swap[1] = perm;
      else
        for (int m = 0; m < M; m++)
          swap[m] = m == p ? NULL : perm;
      eval_out e;
      const int bad = evaluate(model, &mte, C, swap, pred, &e);
      imml_model_free(model);
      if (bad)
        goto out;
      stat_add(&acc[meth], e.acc);
      stat_add(&f1[meth], e.f1);
      stat_add(&shuf[meth], e.acc_shuffled);
      stat_add(&secs[meth], rep.seconds);
      notef(o->quiet,
            "[seed %d/%d] %-20s test %6.2f%%  macro-F1 %6.2f%%  aux shuffled "
            "%6.2f%%  (%.1fs)\n",
            si + 1, seeds, method_name[meth], 100.0 * e.acc, 100.0 * e.f1,
            100.0 * e.acc_shuffled, rep.seconds);
    }
    free(tr_idx);
    free(te_idx);
    free(pred);
    free(perm);
    free(zeros);
    tr_idx = te_idx = pred = perm = NULL;
    zeros = NULL;
    dataset_free(&tr);
    dataset_free(&te);
    stdz_free(&sz);
  }
  const double total = now_seconds() - t_start;

  /* The report. */
  int p_const = 1;
  for (int si = 1; si < seeds; si++)
    p_const &= p_seed[si] == p_seed[0];
  printf("imml-train --compare: %d seed%s (%llu..%llu), %d epochs, batch %d, "
         "H=%d, k=%d, J=%d, %s lr %g, test fraction %.2f\n",
         seeds, seeds == 1 ? "" : "s", (unsigned long long)o->seed,
         (unsigned long long)(o->seed + (uint64_t)seeds - 1), o->epochs,
         o->batch, o->hidden, o->knowledge, o->dict_size,
         o->optimizer == IMML_OPTIM_SGD ? "SGD" : "AdamW", (double)o->lr, frac);
  printf("modalities:");
  for (int m = 0; m < M; m++)
    printf(" %d=%s (%d features)%s", m, names[m], rd->d[m],
           m + 1 < M ? "," : "\n");
  if (o->predominant >= 0) {
    printf("predominant modality: %d=%s (given by --predominant)\n",
           o->predominant, names[o->predominant]);
  } else {
    printf("predominant modality: chosen by IMML after %d warm-up steps; "
           "conditional runs chose",
           o->warmup);
    for (int m = 0; m < M; m++)
      if (chosen_c[m])
        printf(" %s in %d/%d", names[m], chosen_c[m], seeds);
    printf(" seeds, strict runs chose");
    for (int m = 0; m < M; m++)
      if (chosen_s[m])
        printf(" %s in %d/%d", names[m], chosen_s[m], seeds);
    printf(" seeds\n");
    if (warmup_outlasted)
      printf("note: --warmup %d is longer than training (%ld steps): no "
             "front-door was applied, p is the argmax of the warm-up EMAs\n",
             o->warmup, train_steps);
  }
  if (!p_const) {
    printf("predominant modality per seed (for the unimodal baseline and "
           "the shuffled test):");
    for (int si = 0; si < seeds; si++)
      printf(" %s", names[p_seed[si]]);
    printf("\n");
  }
  printf("unimodal head test accuracy of each modality (heads of the IMML "
         "conditional runs; warm-up EMA of training batch accuracy):\n");
  for (int m = 0; m < M; m++)
    printf("  %-24s %6.2f +- %4.2f %%   EMA %.3f%s\n", names[m],
           100.0 * stat_mean(&head[m]), 100.0 * stat_std(&head[m]),
           stat_mean(&ema_s[m]),
           p_const && m == p_seed[0] ? "   <- predominant" : "");
  printf("  predominant head minus best auxiliary head: %+.2f +- %.2f "
         "points\n\n",
         100.0 * stat_mean(&margin), 100.0 * stat_std(&margin));
  char uni_label[96];
  snprintf(uni_label, sizeof uni_label, "unimodal (%s)",
           p_const ? names[p_seed[0]] : "predominant");
  printf("%-28s %-16s %-16s %-22s %s\n", "method", "test acc (%)",
         "macro-F1 (%)", "acc, aux shuffled (%)", "s/run");
  for (int meth = 0; meth < N_METHODS; meth++) {
    char a[32], f[32], s[32];
    snprintf(a, sizeof a, "%.2f +- %.2f", 100.0 * stat_mean(&acc[meth]),
             100.0 * stat_std(&acc[meth]));
    snprintf(f, sizeof f, "%.2f +- %.2f", 100.0 * stat_mean(&f1[meth]),
             100.0 * stat_std(&f1[meth]));
    snprintf(s, sizeof s, "%.2f +- %.2f", 100.0 * stat_mean(&shuf[meth]),
             100.0 * stat_std(&shuf[meth]));
    printf("%-28s %-16s %-16s %-22s %.1f\n",
           meth == UNI ? uni_label : method_name[meth], a, f, s,
           stat_mean(&secs[meth]));
  }
  printf("(mean +- sample std over seeds; total %.1fs)\n", total);
  fflush(stdout);
  rc = 0;
  goto out;
oom:
  errorf("out of memory");
out:
  free(p_seed);
  free(tr_idx);
  free(te_idx);
  free(pred);
  free(perm);
  free(zeros);
  dataset_free(&tr);
  dataset_free(&te);
  stdz_free(&sz);
  return rc;
}
