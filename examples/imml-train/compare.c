/* --compare: IMML, its ablations and peer baselines on the same splits. */
/* imml_warmup_get() (model_p) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "compare.h"

#include "baselines.h"
#include "rng.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { UNI, LF, LFH, OGM, QMF, IMC, IMS, N_METHODS };

static const char *const method_name[N_METHODS] = {
    "unimodal", "late fusion",      "late fusion + heads", "OGM-GE",
    "QMF",      "IMML conditional", "IMML strict"};

/* Training order within a seed: the IMML runs first, so that with
 * --predominant auto the conditional run's choice of p is known before the
 * corrupted-auxiliary test of the others needs it; then every modality
 * alone (UNI, once per modality). */
static const int run_order[N_METHODS] = {IMC, IMS, LF, LFH, OGM, QMF, UNI};

typedef struct stat_acc {
  double sum, sum2, min, max;
  int n;
} stat_acc;

static void stat_add(stat_acc *s, double v) {
  if (s->n == 0 || v < s->min)
    s->min = v;
  if (s->n == 0 || v > s->max)
    s->max = v;
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

/* The predominant modality a trained IMML model uses: its fixed p, or, when
 * the warm-up outlasted training, the one its warm-up EMAs favour (the
 * lowest cross-entropy EMA: the rule the library applies when warm-up
 * ends, METHOD.md section 5). */
static int model_p(imml_model *model, int m) {
  float ema[IMML_MAX_MODALITIES];
  int p = -1, fixed = 0, steps = 0;
  imml_predominant_get(model, &p, &fixed);
  if (fixed && p >= 0)
    return p;
  imml_warmup_get(model, &steps, ema);
  p = 0;
  for (int i = 1; i < m; i++)
    if (ema[i] < ema[p])
      p = i;
  return p;
}

/* The per-seed data of one modality subset: every modality, or one
 * modality next to a constant-zero input of width 1 (the unimodal
 * baseline: the library needs M >= 2; the zero branch only adds a constant
 * slot, a bias of the F&T, so the model is a unimodal MLP d -> H -> k -> C
 * trained with the same optimiser and schedule). */
static void view_of(const dataset *ds, int alone, const float *zeros,
                    dataset *v) {
  *v = *ds;
  if (alone < 0)
    return;
  v->m = 2;
  v->d[0] = ds->d[alone];
  v->x[0] = ds->x[alone];
  v->d[1] = 1;
  v->x[1] = (float *)zeros;
}

int run_compare(const train_opts *o, const fit_opts *f, const raw_data *rd,
                const raw_data *rt, int seeds) {
  const int M = rd->m, C = rd->c;
  char names[IMML_MAX_MODALITIES][64];
  for (int m = 0; m < M; m++)
    base_name(rd->path[m], names[m], sizeof names[m]);
  stat_acc acc[N_METHODS] = {{0}}, f1[N_METHODS] = {{0}},
           shuf[N_METHODS] = {{0}}, secs[N_METHODS] = {{0}},
           ep_best[N_METHODS] = {{0}}, ep_run[N_METHODS] = {{0}};
  stat_acc head[IMML_MAX_MODALITIES] = {{0}},
           alone[IMML_MAX_MODALITIES] = {{0}};
  stat_acc ogm_k[IMML_MAX_MODALITIES] = {{0}};
  stat_acc head_gap = {0}, alone_gap = {0};
  stat_acc rows_fit = {0}, rows_val = {0}, rows_test = {0};
  int best_head_chosen = 0, warmup_used = 0, warmup_outlasted = 0;
  int heldout_fallback = 0, tie_breaks = 0;
  long train_steps = 0;
  int *p_seed = calloc((size_t)seeds, sizeof(int));
  double *alone_seed = calloc((size_t)seeds * (size_t)M, sizeof(double));
  int chosen_c[IMML_MAX_MODALITIES] = {0}, chosen_s[IMML_MAX_MODALITIES] = {0};
  int *fit = NULL, *va_idx = NULL, *te_idx = NULL, *pred = NULL, *perm = NULL;
  float *zeros = NULL;
  dataset tr = {0}, va = {0}, te = {0};
  stdz sz = {0};
  ogm_state *ogm = NULL;
  qmf_state *qmf = NULL;
  int rc = 1;
  if (!p_seed || !alone_seed)
    goto oom;
  const double t_start = now_seconds();
  for (int si = 0; si < seeds; si++) {
    train_opts so = *o;
    so.seed = o->seed + (uint64_t)si;
    int nfit = 0, nva = 0, nte = 0;
    if (seed_rows(rd, rt != NULL, o, f, so.seed, &fit, &nfit, &va_idx, &nva,
                  &te_idx, &nte) != 0)
      goto out;
    if (!rt && nte == 0) {
      errorf("--test-fraction %g leaves no test rows", o->test_fraction);
      goto out;
    }
    if (stdz_fit(&sz, rd, fit, nfit, o->no_standardize) != 0 ||
        stdz_apply(&sz, rd, fit, nfit, &tr) != 0 ||
        stdz_apply(&sz, rd, va_idx, nva, &va) != 0 ||
        (rt ? stdz_apply(&sz, rt, NULL, 0, &te)
            : stdz_apply(&sz, rd, te_idx, nte, &te)) != 0)
      goto oom;
    nte = te.n;
    stat_add(&rows_fit, nfit);
    stat_add(&rows_val, nva);
    stat_add(&rows_test, nte);
    const int most =
        nfit > nte ? (nfit > nva ? nfit : nva) : (nte > nva ? nte : nva);
    pred = malloc((size_t)nte * sizeof(int));
    perm = malloc((size_t)nte * sizeof(int));
    zeros = calloc((size_t)(most > 0 ? most : 1), sizeof(float));
    if (!pred || !perm || !zeros)
      goto oom;
    /* One seeded permutation of the test rows, shared by every auxiliary
     * modality and every method of this seed. */
    for (int i = 0; i < nte; i++)
      perm[i] = i;
    trng r;
    trng_seed(&r, so.seed, 3);
    trng_shuffle(&r, perm, (size_t)nte);
    const long steps = (long)so.epochs * ((nfit + so.batch - 1) / so.batch);
    train_steps = steps;
    char note[256] = "";
    const int W = o->predominant >= 0
                      ? o->warmup
                      : warmup_effective(o->warmup, f->warmup_given, steps,
                                         note, sizeof note);
    if (si == 0 && note[0])
      notef(o->quiet, "imml-train: %s\n", note);
    warmup_used = W;
    if (steps < W)
      warmup_outlasted = 1;
    const int no_fdc_warmup = steps >= INT_MAX ? INT_MAX : (int)steps + 1;
    int p = o->predominant;
    for (int oi = 0; oi < N_METHODS; oi++) {
      const int meth = run_order[oi];
      const int n_runs = meth == UNI ? M : 1;
      for (int ru = 0; ru < n_runs; ru++) {
        train_opts mo = so;
        const int only = meth == UNI ? ru : -1;
        dataset mtr, mva, mte;
        view_of(&tr, only, zeros, &mtr);
        view_of(&va, only, zeros, &mva);
        view_of(&te, only, zeros, &mte);
        run_spec spec = {NULL,           0, 0,           1,   NULL,
                         CHOOSE_LIBRARY, 0, f->patience, NULL};
        method_hooks hooks;
        if (meth == IMC || meth == IMS) {
          mo.slot_mode = meth == IMC ? IMML_SLOT_CONDITIONAL : IMML_SLOT_STRICT;
          mo.warmup = W;
          spec.front_door = 1;
          spec.choose_p = W == 0 ? CHOOSE_LIBRARY : f->choose_p;
        } else {
          /* No front-door: an automatic p whose warm-up outlasts training
           * keeps every slot at z_m (METHOD.md section 5). */
          mo.predominant = -1;
          mo.warmup = no_fdc_warmup;
          mo.gamma1 = 0.0f;
          if (meth != LFH)
            mo.gamma2 = 0.0f;
        }
        imml_config cfg;
        int dims_uni[2];
        if (only >= 0) {
          dims_uni[0] = tr.d[only];
          dims_uni[1] = 1;
        }
        make_config(&mo, mtr.m, only >= 0 ? dims_uni : tr.d, C, &cfg);
        if (meth == OGM) {
          ogm = ogm_create(M, cfg.knowledge_dim, C, cfg.max_batch, OGM_ALPHA,
                           so.seed, &hooks);
          if (!ogm)
            goto out;
          spec.hooks = &hooks;
        } else if (meth == QMF) {
          qmf = qmf_create(M, cfg.knowledge_dim, C, cfg.max_batch, nfit, &mo,
                           &hooks);
          if (!qmf)
            goto out;
          spec.hooks = &hooks;
        }
        char title[160];
        snprintf(title, sizeof title, "[seed %d/%d] %s%s%s: ", si + 1, seeds,
                 method_name[meth], only >= 0 ? " " : "",
                 only >= 0 ? names[only] : "");
        spec.title = title;
        imml_model *model = NULL;
        run_result res;
        if (train_run(&mo, &cfg, &mtr, &mva, &mte, &spec, &model, &res) != 0)
          goto out;
        if (meth == IMC || meth == IMS) {
          const int mp = res.p >= 0 ? res.p : model_p(model, M);
          heldout_fallback |= res.heldout_fallback;
          if (meth == IMC && res.p_tied > 1)
            tie_breaks++;
          (meth == IMC ? chosen_c : chosen_s)[mp]++;
          if (meth == IMC) {
            if (p < 0)
              p = mp;
            p_seed[si] = p;
            double ha[IMML_MAX_MODALITIES];
            if (heads_eval(model, &te, ha, NULL, NULL) != 0) {
              imml_model_free(model);
              goto out;
            }
            double hbest = ha[0];
            for (int m = 0; m < M; m++) {
              stat_add(&head[m], ha[m]);
              hbest = ha[m] > hbest ? ha[m] : hbest;
            }
            stat_add(&head_gap, ha[mp] - hbest);
            best_head_chosen += ha[mp] == hbest;
          }
        }
        if (meth == OGM)
          for (int m = 0; m < M; m++)
            stat_add(&ogm_k[m], ogm_mean_coeff(ogm, m));
        int *swap[IMML_MAX_MODALITIES] = {0};
        if (only >= 0)
          swap[1] = perm;
        else
          for (int m = 0; m < M; m++)
            swap[m] = m == p ? NULL : perm;
        eval_out e;
        const int bad = evaluate(model, &mte, C, swap, pred, &e);
        imml_model_free(model);
        ogm_free(ogm);
        qmf_free(qmf);
        ogm = NULL;
        qmf = NULL;
        if (bad)
          goto out;
        if (only >= 0) {
          stat_add(&alone[only], e.acc);
          alone_seed[(size_t)si * M + only] = e.acc;
          if (only != p)
            continue;
        }
        stat_add(&acc[meth], e.acc);
        stat_add(&f1[meth], e.f1);
        stat_add(&shuf[meth], e.acc_shuffled);
        stat_add(&secs[meth], res.last.seconds);
        stat_add(&ep_best[meth], res.best_epoch);
        stat_add(&ep_run[meth], res.epochs_run);
        notef(o->quiet,
              "[seed %d/%d] %-20s test %6.2f%%  macro-F1 %6.2f%%  aux "
              "shuffled %6.2f%%  epoch %d/%d  (%.1fs)\n",
              si + 1, seeds, method_name[meth], 100.0 * e.acc, 100.0 * e.f1,
              100.0 * e.acc_shuffled, res.best_epoch, res.epochs_run,
              res.last.seconds);
      }
    }
    /* The chosen p against every modality alone, on this seed. */
    double abest = alone_seed[(size_t)si * M];
    for (int m = 1; m < M; m++)
      abest = alone_seed[(size_t)si * M + m] > abest
                  ? alone_seed[(size_t)si * M + m]
                  : abest;
    stat_add(&alone_gap, alone_seed[(size_t)si * M + p] - abest);
    free(fit);
    free(va_idx);
    free(te_idx);
    free(pred);
    free(perm);
    free(zeros);
    fit = va_idx = te_idx = pred = perm = NULL;
    zeros = NULL;
    dataset_free(&tr);
    dataset_free(&va);
    dataset_free(&te);
    stdz_free(&sz);
  }
  const double total = now_seconds() - t_start;
  /* The report. */
  int p_const = 1;
  for (int si = 1; si < seeds; si++)
    p_const &= p_seed[si] == p_seed[0];
  int best_alone = 0;
  for (int m = 1; m < M; m++)
    if (stat_mean(&alone[m]) > stat_mean(&alone[best_alone]))
      best_alone = m;
  printf("imml-train --compare: %d seed%s (%llu..%llu), up to %d epochs, "
         "batch %d, H=%d, k=%d, J=%d, %s lr %g\n",
         seeds, seeds == 1 ? "" : "s", (unsigned long long)o->seed,
         (unsigned long long)(o->seed + (uint64_t)seeds - 1), o->epochs,
         o->batch, o->hidden, o->knowledge, o->dict_size,
         o->optimizer == IMML_OPTIM_SGD ? "SGD" : "AdamW", (double)o->lr);
  printf("modalities:");
  for (int m = 0; m < M; m++)
    printf(" %d=%s (%d features)%s", m, names[m], rd->d[m],
           m + 1 < M ? "," : "\n");
  char test_desc[96];
  if (rt)
    snprintf(test_desc, sizeof test_desc, "the --test files");
  else
    snprintf(test_desc, sizeof test_desc, "test fraction %.2f",
             o->test_fraction);
  char sub_desc[64] = "";
  if (f->subsample < 1.0)
    snprintf(sub_desc, sizeof sub_desc, ", training subsample %.0f%%",
             100.0 * f->subsample);
  char keep_desc[96];
  if (stat_mean(&rows_val) == 0.0)
    snprintf(keep_desc, sizeof keep_desc,
             "no validation rows: the last epoch kept");
  else if (f->patience == 0)
    snprintf(keep_desc, sizeof keep_desc,
             "best validation epoch kept, no early stopping");
  else
    snprintf(keep_desc, sizeof keep_desc,
             "best validation epoch kept, patience %d", f->patience);
  printf("rows per seed: %.0f fitting, %.0f validation, %.0f test (%s%s, "
         "validation fraction %.2f); %s\n",
         stat_mean(&rows_fit), stat_mean(&rows_val), stat_mean(&rows_test),
         test_desc, sub_desc, f->val_fraction, keep_desc);
  if (o->predominant >= 0) {
    printf("predominant modality: %d=%s (given by --predominant)\n",
           o->predominant, names[o->predominant]);
  } else {
    const char *how = f->choose_p == CHOOSE_HELDOUT
                          ? "the unimodal head with the lowest validation "
                            "cross-entropy (--choose-p heldout)"
                      : f->choose_p == CHOOSE_LIBRARY
                          ? "the library's rule (lowest warm-up EMA of the "
                            "heads' cross-entropy)"
                          : "given by --choose-p";
    printf("predominant modality: after %d warm-up step%s (of %ld), %s; "
           "conditional runs chose",
           warmup_used, warmup_used == 1 ? "" : "s", train_steps,
           warmup_used == 0 ? "none" : how);
    for (int m = 0; m < M; m++)
      if (chosen_c[m])
        printf(" %s in %d/%d", names[m], chosen_c[m], seeds);
    printf(" seeds, strict runs chose");
    for (int m = 0; m < M; m++)
      if (chosen_s[m])
        printf(" %s in %d/%d", names[m], chosen_s[m], seeds);
    printf(" seeds\n");
    if (f->choose_p == CHOOSE_HELDOUT && !heldout_fallback)
      printf("held-out choice: the validation rows told the best head apart "
             "in %d/%d conditional runs; in the others the heads they could "
             "not separate were ranked on every training row\n",
             seeds - tie_breaks, seeds);
    if (heldout_fallback)
      printf("note: without validation rows (too few rows per class) the "
             "library's rule fixed p\n");
    if (warmup_outlasted)
      printf("note: the warm-up (%d steps) is longer than training (%ld "
             "steps): no front-door was applied, p is the argmin of the "
             "warm-up EMAs\n",
             warmup_used, train_steps);
  }
  if (!p_const) {
    printf("predominant modality per seed (for the unimodal row and "
           "the shuffled test):");
    for (int si = 0; si < seeds; si++)
      printf(" %s", names[p_seed[si]]);
    printf("\n");
  }
  printf("\neach modality, test accuracy (%%)   alone (unimodal model)   head "
         "of IMML conditional\n");
  for (int m = 0; m < M; m++) {
    char a[32], h[32];
    snprintf(a, sizeof a, "%.2f +- %.2f", 100.0 * stat_mean(&alone[m]),
             100.0 * stat_std(&alone[m]));
    snprintf(h, sizeof h, "%.2f +- %.2f", 100.0 * stat_mean(&head[m]),
             100.0 * stat_std(&head[m]));
    printf("  %-32s %-24s %-16s%s\n", names[m], a, h,
           p_const && m == p_seed[0] ? "   <- predominant" : "");
  }
  printf("  chosen p minus the best modality, per seed (points): heads mean "
         "%+.2f, worst %+.2f (best head chosen in %d/%d); alone mean %+.2f, "
         "worst %+.2f\n",
         100.0 * stat_mean(&head_gap), 100.0 * head_gap.min, best_head_chosen,
         seeds, 100.0 * stat_mean(&alone_gap), 100.0 * alone_gap.min);
  printf("  OGM-GE mean gradient coefficient k_m:");
  for (int m = 0; m < M; m++)
    printf(" %s %.2f", names[m], stat_mean(&ogm_k[m]));
  printf("\n\n");
  char uni_label[96];
  snprintf(uni_label, sizeof uni_label, "unimodal (%s)",
           p_const ? names[p_seed[0]] : "predominant");
  printf("%-28s %-16s %-16s %-22s %-10s %s\n", "method", "test acc (%)",
         "macro-F1 (%)", "acc, aux shuffled (%)", "epoch", "s/run");
  for (int meth = 0; meth < N_METHODS; meth++) {
    char a[32], fs[32], s[32], ep[32];
    snprintf(a, sizeof a, "%.2f +- %.2f", 100.0 * stat_mean(&acc[meth]),
             100.0 * stat_std(&acc[meth]));
    snprintf(fs, sizeof fs, "%.2f +- %.2f", 100.0 * stat_mean(&f1[meth]),
             100.0 * stat_std(&f1[meth]));
    snprintf(s, sizeof s, "%.2f +- %.2f", 100.0 * stat_mean(&shuf[meth]),
             100.0 * stat_std(&shuf[meth]));
    snprintf(ep, sizeof ep, "%.0f/%.0f", stat_mean(&ep_best[meth]),
             stat_mean(&ep_run[meth]));
    printf("%-28s %-16s %-16s %-22s %-10s %.1f\n",
           meth == UNI ? uni_label : method_name[meth], a, fs, s, ep,
           stat_mean(&secs[meth]));
  }
  printf("(mean +- sample std over seeds; epoch: mean best epoch / mean "
         "epochs trained; total %.1fs)\n",
         total);
  printf("IMML conditional minus: late fusion %+.2f, late fusion + heads "
         "%+.2f, the best modality alone (%s) %+.2f points\n",
         100.0 * (stat_mean(&acc[IMC]) - stat_mean(&acc[LF])),
         100.0 * (stat_mean(&acc[IMC]) - stat_mean(&acc[LFH])),
         names[best_alone],
         100.0 * (stat_mean(&acc[IMC]) - stat_mean(&alone[best_alone])));
  printf("aux shuffled: test rows of every modality but p permuted across "
         "samples (a corrupted auxiliary modality).\n"
         "conditional: auxiliary slots z_a + x^_a (own knowledge + front-door "
         "estimate); strict: x^_a alone (front-door only).\n");
  fflush(stdout);
  rc = 0;
  goto out;
oom:
  errorf("out of memory");
out:
  free(p_seed);
  free(alone_seed);
  free(fit);
  free(va_idx);
  free(te_idx);
  free(pred);
  free(perm);
  free(zeros);
  ogm_free(ogm);
  qmf_free(qmf);
  dataset_free(&tr);
  dataset_free(&va);
  dataset_free(&te);
  stdz_free(&sz);
  return rc;
}
