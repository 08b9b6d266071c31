/* mpi-ckpt-compare: compares the parameters of imml checkpoints with a
 * reference, through the public API only.
 *
 *   mpi-ckpt-compare TOL REF.ckpt A.ckpt [B.ckpt ...]
 *
 * Every checkpoint must have the reference's configuration, predominant
 * modality, warm-up step count and dictionary fill, and every parameter
 * tensor t must satisfy ||t - t_ref|| / max(||t_ref||, 1e-12) <= TOL
 * (TOL 0: bit-identical).  Prints the largest error of each file; exit 0
 * when all agree, 1 otherwise. */
#define IMML_EXPERIMENTAL /* imml_warmup_get */
#include <imml.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static imml_model *load(const char *path) {
  imml_model *m = NULL;
  const imml_status st = imml_model_load(path, NULL, NULL, &m);
  if (st != IMML_OK) {
    /* m: NULL, or the failed handle that holds the message */
    const char *err = m ? imml_model_errmsg(m) : "";
    fprintf(stderr, "mpi-ckpt-compare: %s: %s%s%s\n", path,
            imml_status_string(st), err[0] ? ": " : "", err);
    imml_model_free(m);
    return NULL;
  }
  return m;
}

static int same_config(const imml_config *a, const imml_config *b) {
  if (a->n_modalities != b->n_modalities || a->hidden_dim != b->hidden_dim ||
      a->knowledge_dim != b->knowledge_dim || a->n_classes != b->n_classes ||
      a->dict_size != b->dict_size || a->beta != b->beta ||
      a->gamma1 != b->gamma1 || a->gamma2 != b->gamma2 || a->tau != b->tau ||
      a->predominant != b->predominant || a->warmup_steps != b->warmup_steps ||
      a->slot_mode != b->slot_mode || a->seed != b->seed)
    return 0;
  for (int m = 0; m < a->n_modalities; m++)
    if (a->dims[m] != b->dims[m])
      return 0;
  return 1;
}

/* 0 when `path` agrees with ref within tol. */
static int compare(imml_model *ref, const char *path, double tol) {
  imml_model *m = load(path);
  if (!m)
    return 1;
  int bad = 0;
  imml_config ca, cb;
  imml_config_init(&ca);
  imml_config_init(&cb);
  imml_model_get_config(ref, &ca);
  imml_model_get_config(m, &cb);
  int pa, pb, sa, sb;
  imml_predominant_get(ref, &pa, NULL);
  imml_predominant_get(m, &pb, NULL);
  imml_warmup_get(ref, &sa, NULL);
  imml_warmup_get(m, &sb, NULL);
  if (!same_config(&ca, &cb) || imml_param_count(ref) != imml_param_count(m)) {
    fprintf(stderr, "%s: configuration differs from the reference's\n", path);
    bad = 1;
  } else if (pa != pb || sa != sb ||
             imml_fdc_dict_fill(ref) != imml_fdc_dict_fill(m)) {
    fprintf(stderr,
            "%s: predominant %d/%d, warm-up steps %d/%d, dictionary fill "
            "%d/%d differ\n",
            path, pb, pa, sb, sa, imml_fdc_dict_fill(m),
            imml_fdc_dict_fill(ref));
    bad = 1;
  } else {
    double worst = 0.0;
    const char *name = "";
    for (int t = 0; t < imml_param_count(ref); t++) {
      imml_param_view va, vb;
      imml_param_get(ref, t, &va);
      imml_param_get(m, t, &vb);
      const size_t n = (size_t)va.rows * (size_t)va.cols;
      double d = 0.0, r = 0.0;
      for (size_t i = 0; i < n; i++) {
        const double e = (double)vb.data[i] - (double)va.data[i];
        d += e * e;
        r += (double)va.data[i] * (double)va.data[i];
      }
      const double rel = sqrt(d) / fmax(sqrt(r), 1e-12);
      if (rel > worst || t == 0) {
        worst = rel;
        name = va.name;
      }
    }
    printf("%s: largest relative parameter error %.3g (%s), predominant %d, "
           "dictionary fill %d\n",
           path, worst, name, pb, imml_fdc_dict_fill(m));
    if (!(worst <= tol)) {
      fprintf(stderr, "%s: relative error %.3g of %s exceeds %g\n", path, worst,
              name, tol);
      bad = 1;
    }
  }
  imml_model_free(m);
  return bad;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: mpi-ckpt-compare TOL REF.ckpt A.ckpt [...]\n");
    return 2;
  }
  char *end;
  errno = 0;
  const double tol = strtod(argv[1], &end);
  if (errno || end == argv[1] || *end || !(tol >= 0.0)) {
    fprintf(stderr,
            "mpi-ckpt-compare: TOL: expected a number >= 0, got "
            "'%s'\n",
            argv[1]);
    return 2;
  }
  imml_model *ref = load(argv[2]);
  if (!ref)
    return 1;
  int bad = 0;
  for (int i = 3; i < argc; i++)
    bad |= compare(ref, argv[i], tol);
  imml_model_free(ref);
  return bad;
}
