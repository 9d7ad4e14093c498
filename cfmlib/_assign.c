/* Exact linear assignment for minibatch optimal-transport couplings (chapter 8 of the book).
 *
 * cfm_assign() returns, for a square cost matrix c (n x n, row-major, float32 or float64), a
 * permutation col minimising sum_i c[i][col[i]], and column potentials v such that, with
 * u[i] = c[i][col[i]] - v[col[i]], every reduced cost c[i][j] - u[i] - v[j] is >= 0 (up to
 * rounding) and zero on the matching: the dual certificate that cfmlib/assignment.py checks.
 *
 * Method. Prices p = -v; x[i][j] = c[i][j] + p[j] is the price-adjusted cost.
 *  1. A warm start: Bertsekas' auction with eps-scaling (1988), min-cost form, Gauss-Seidel, in
 *     single precision. The first, coarse phases scan whole rows, sweeping over the rows in order
 *     and fetching the next row into the cache during each scan. In the later phases every
 *     row keeps a list of the columns within a threshold of its minimum; prices only rise, so
 *     every column outside the list stays above the threshold, and the row's two best columns
 *     can be read from its list as long as the second best does not exceed the threshold
 *     (otherwise the row is listed again). Near the optimum a row's list holds a few dozen of
 *     the n columns, so a bid costs that many operations instead of n.
 *  2. Hand-off to a dual feasible start: u[i] = min_j x[i][j]; each auction pair is made tight
 *     by lowering its column's price by its slack, where no other row's reduced cost would turn
 *     negative; pairs that cannot be made tight are dropped. The lists stay valid: their
 *     thresholds are lowered by the largest price drop.
 *  3. Exact phase: shortest augmenting paths (Jonker and Volgenant, 1987), Dijkstra on reduced
 *     costs in double precision from each free row, with a heap over the columns reached. A
 *     scanned row relaxes its list only and leaves a lower bound for its other columns; only
 *     when that bound falls below the next distance to be settled is the row listed again
 *     with a higher threshold. Prices only rise here (p[j] += dmin - d[j] >= 0). This phase
 *     alone decides the assignment, and it is exact whatever the auction did.
 *
 * GNU C (GCC or Clang: vector extensions, function attributes). The dense row kernels
 * (_assign_kernels.h) are compiled for several instruction sets and chosen at run time
 * (x86-64: AVX-512, AVX2, SSE2), so one build runs on any processor of its architecture.
 * Built by setup.py as an optional extension and loaded with ctypes, which releases the GIL
 * during the call. Indices are int (n < 2^28), sizes size_t or int64_t: no 'long', which is
 * 32 bits on Windows. */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CFM_ABI 1
#ifndef CFM_SOURCE_HASH
#define CFM_SOURCE_HASH ""
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CFM_X86 1
#include <immintrin.h>
#else
#define CFM_X86 0
#endif

/* ---- kernels, one set per instruction set ------------------------------------------------- */
#define KVB 16
#define KATTR
#define CT float
#define CT_FLOAT 1
#define KT f_base
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#define CT double
#define CT_FLOAT 0
#define KT d_base
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#undef KATTR
#undef KVB

#if CFM_X86
#define KVB 32
#define KATTR __attribute__((target("avx2")))
#define CT float
#define CT_FLOAT 1
#define KT f_avx2
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#define CT double
#define CT_FLOAT 0
#define KT d_avx2
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#undef KATTR
#undef KVB

#define KVB 64
#define KATTR __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2")))
#define CT float
#define CT_FLOAT 1
#define KT f_avx512
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#define CT double
#define CT_FLOAT 0
#define KT d_avx512
#include "_assign_kernels.h"
#undef CT
#undef CT_FLOAT
#undef KT
#undef KATTR
#undef KVB
#endif

typedef struct {
    const char *name;
    double (*xmin_f)(const float *, const double *, int);
    double (*xmin_d)(const double *, const double *, int);
    int (*xcollect_f)(const float *, const double *, int, double, int, int *, double *);
    int (*xcollect_d)(const double *, const double *, int, double, int, int *, double *);
    int (*relax_f)(const float *, const double *, double, int, double *, int *, int, double, int *);
    int (*relax_d)(const double *, const double *, double, int, double *, int *, int, double, int *);
    void (*colslack_f)(const float *, const double *, double, const int *, int, double *, int);
    void (*colslack_d)(const double *, const double *, double, const int *, int, double *, int);
    int (*range_f)(const float *, size_t, double *, double *);
    int (*range_d)(const double *, size_t, double *, double *);
    void (*two_min)(const float *, const float *, int, const float *, float *, int *, float *);
    int (*collect)(const float *, const float *, int, float, int, int *, float *);
    float (*rowmin)(const float *, const float *, int);
} kernels_t;

#define KTABLE(label, s)                                                                              \
    {label, xmin_f_##s, xmin_d_##s, xcollect_f_##s, xcollect_d_##s, relax_f_##s, relax_d_##s,         \
     colslack_f_##s, colslack_d_##s, range_f_##s, range_d_##s, two_min_f_##s, collect_f_##s, rowmin_f_##s}
#if CFM_X86
static const kernels_t kernel_sets[3] = {KTABLE("sse2", base), KTABLE("avx2", avx2), KTABLE("avx512", avx512)};
#else
static const kernels_t kernel_sets[1] = {KTABLE("baseline", base)};
#endif

static int supported(int level) {
    if (level == 0) return 1;
#if CFM_X86
    __builtin_cpu_init();
    if (level == 1) return __builtin_cpu_supports("avx2");
    if (level == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx2");
#endif
    return 0;
}

static int best_level(void) {
    int n = (int)(sizeof kernel_sets / sizeof kernel_sets[0]);
    for (int level = n - 1; level > 0; level--)
        if (supported(level)) return level;
    return 0;
}

static volatile int isa_level = -1; /* -1: not chosen yet */

static const kernels_t *kernels(void) {
    int level = isa_level;
    if (level < 0) isa_level = level = best_level();
    return &kernel_sets[level];
}

/* ---- exported helpers --------------------------------------------------------------------- */
int cfm_abi(void) { return CFM_ABI; }
const char *cfm_source_hash(void) { return CFM_SOURCE_HASH; }
const char *cfm_isa(void) { return kernels()->name; }
/* Force a kernel set (0: baseline, then wider ones; -1: the best this processor supports).
   Returns 0, or -1 when this processor or build lacks it. */
int cfm_set_isa(int level) {
    int n = (int)(sizeof kernel_sets / sizeof kernel_sets[0]);
    if (level < 0) { isa_level = best_level(); return 0; }
    if (level >= n || !supported(level)) return -1;
    isa_level = level;
    return 0;
}

/* ---- solver ------------------------------------------------------------------------------- */
typedef struct {
    double key;
    int id;
    int tie; /* 0 sorts first among equal keys */
} hent_t;

typedef struct {
    hent_t *a;
    int64_t size, cap;
} heap_t;

static int hless(const hent_t *x, const hent_t *y) { return x->key < y->key || (x->key == y->key && x->tie < y->tie); }

static int hpush(heap_t *h, double key, int id, int tie) {
    if (h->size == h->cap) {
        int64_t cap = h->cap ? 2 * h->cap : 1024;
        hent_t *a = realloc(h->a, sizeof(hent_t) * (size_t)cap);
        if (!a) return 1;
        h->a = a;
        h->cap = cap;
    }
    hent_t e = {key, id, tie};
    int64_t q = h->size++;
    while (q > 0) {
        int64_t parent = (q - 1) / 2;
        if (!hless(&e, &h->a[parent])) break;
        h->a[q] = h->a[parent];
        q = parent;
    }
    h->a[q] = e;
    return 0;
}

static hent_t hpop(heap_t *h) {
    hent_t top = h->a[0], e = h->a[--h->size];
    int64_t q = 0, m = h->size;
    for (;;) {
        int64_t c = 2 * q + 1;
        if (c >= m) break;
        if (c + 1 < m && hless(&h->a[c + 1], &h->a[c])) c++;
        if (!hless(&h->a[c], &e)) break;
        h->a[q] = h->a[c];
        q = c;
    }
    if (m > 0) h->a[q] = e;
    return top;
}

/* ---- auction (single precision) ------------------------------------------------------------ */
#define EPS_FACTOR 6.0    /* eps reduction per phase */
#define LIST_EPS 10.0     /* list threshold: row minimum + LIST_EPS * eps */
#define LIST_SPAN 0.01    /* phases with lists once LIST_EPS * eps <= LIST_SPAN * span */

/* Row i's list: pidx/pval[ofs[i] .. ofs[i] + len[i]) hold the columns j with x[i][j] <= bnd[i]
   when it was built, and their costs; len[i] < 0: no list. Shared by both phases: the auction's
   (float) lists and the exact phase's (double) lists each live in such a pool. */
#define POOL(NAME, VT)                                                                              \
    typedef struct {                                                                                \
        int *ofs, *len, *cap, *pidx;                                                                \
        VT *pval, *bnd;                                                                             \
        size_t used, size;                                                                          \
        int n, lmax;                                                                                \
    } NAME;                                                                                         \
    static int NAME##_init(NAME *L, int n, int lmax) {                                              \
        memset(L, 0, sizeof *L);                                                                    \
        L->n = n;                                                                                   \
        L->lmax = lmax;                                                                             \
        L->ofs = malloc(sizeof(int) * (size_t)n);                                                   \
        L->len = malloc(sizeof(int) * (size_t)n);                                                   \
        L->cap = malloc(sizeof(int) * (size_t)n);                                                   \
        L->bnd = malloc(sizeof(VT) * (size_t)n);                                                    \
        if (!L->ofs || !L->len || !L->cap || !L->bnd) return 1;                                     \
        for (int i = 0; i < n; i++) { L->len[i] = -1; L->cap[i] = 0; L->ofs[i] = 0; }               \
        return 0;                                                                                   \
    }                                                                                               \
    static void NAME##_free(NAME *L) {                                                              \
        free(L->ofs); free(L->len); free(L->cap); free(L->bnd); free(L->pidx); free(L->pval);       \
        memset(L, 0, sizeof *L);                                                                    \
    }                                                                                               \
    /* room for cap entries at the end of the pool; returns 1 when out of memory */                \
    static int NAME##_room(NAME *L, int cap) {                                                      \
        if (L->used + (size_t)cap <= L->size) return 0;                                             \
        size_t size = L->size ? 2 * L->size : (size_t)L->n * 32;                                    \
        while (size < L->used + (size_t)cap) size *= 2;                                             \
        int *ni = realloc(L->pidx, sizeof(int) * size);                                             \
        if (!ni) return 1;                                                                          \
        L->pidx = ni;                                                                               \
        VT *nv = realloc(L->pval, sizeof(VT) * size);                                               \
        if (!nv) return 1;                                                                          \
        L->pval = nv;                                                                               \
        L->size = size;                                                                             \
        return 0;                                                                                   \
    }                                                                                               \
    /* make the list just written at the end of the pool row i's, keeping room to grow */          \
    static void NAME##_take(NAME *L, int i, int cnt) {                                              \
        int keep = cnt + cnt / 2 + 16;                                                              \
        if (keep > L->lmax) keep = L->lmax;                                                         \
        L->ofs[i] = (int)L->used;                                                                   \
        L->cap[i] = keep;                                                                           \
        L->len[i] = cnt;                                                                            \
        L->used += (size_t)keep;                                                                    \
    }
POOL(flist_t, float)
POOL(dlist_t, double)

typedef struct {
    const float *a; /* the float32 matrix the auction runs on */
    float *p;
    int n;
    const kernels_t *kn;
    flist_t L;
    int64_t *stats;
} auction_t;

/* List row i afresh: the columns with a + p <= thr (thr NAN: the row's minimum + delta). Returns 1
   when out of memory; a list longer than lmax is dropped (len = -1: the row bids on its row). */
static int alist_row(auction_t *A, int i, float thr, float delta) {
    flist_t *L = &A->L;
    const float *row = A->a + (size_t)i * A->n;
    if (thr != thr) thr = A->kn->rowmin(row, A->p, A->n) + delta;
    A->stats[1]++;
    int cnt = L->len[i] >= 0 ? A->kn->collect(row, A->p, A->n, thr, L->cap[i], L->pidx + L->ofs[i], L->pval + L->ofs[i])
                             : INT_MAX;
    if (cnt > L->cap[i] || L->len[i] < 0) {
        if (flist_t_room(L, L->lmax)) return 1;
        cnt = A->kn->collect(row, A->p, A->n, thr, L->lmax, L->pidx + L->used, L->pval + L->used);
        if (cnt > L->lmax) { L->len[i] = -1; return 0; }
        flist_t_take(L, i, cnt);
    }
    L->len[i] = cnt;
    L->bnd[i] = thr;
    return 0;
}

/* Smallest and second smallest a + p over row i's list (j1 = -1 for an empty list). */
static inline void alist_two_min(const auction_t *A, int i, float *pw1, int *pj1, float *pw2) {
    const int *li = A->L.pidx + A->L.ofs[i];
    const float *lv = A->L.pval + A->L.ofs[i];
    const float *p = A->p;
    float w1 = INFINITY, w2 = INFINITY;
    int k1 = -1;
    for (int k = 0, m = A->L.len[i]; k < m; k++) { /* branch-free: near ties make branches unpredictable */
        float x = lv[k] + p[li[k]];
        float hi = x < w1 ? w1 : x;
        w2 = hi < w2 ? hi : w2;
        k1 = x < w1 ? k : k1;
        w1 = x < w1 ? x : w1;
    }
    *pw1 = w1;
    *pj1 = k1 >= 0 ? li[k1] : -1;
    *pw2 = w2;
}

/* Filter row i's list down to the columns within delta of its minimum (when the list still
   holds the minimum; otherwise list the row afresh). */
static int alist_filter(auction_t *A, int i, float delta) {
    flist_t *L = &A->L;
    if (L->len[i] < 0) return alist_row(A, i, NAN, delta);
    int *li = L->pidx + L->ofs[i];
    float *lv = L->pval + L->ofs[i];
    float mn = INFINITY;
    for (int k = 0; k < L->len[i]; k++) { float x = lv[k] + A->p[li[k]]; if (x < mn) mn = x; }
    if (!(mn <= L->bnd[i])) return alist_row(A, i, mn < INFINITY ? mn + delta : NAN, delta);
    float thr = mn + delta < L->bnd[i] ? mn + delta : L->bnd[i];
    int m = 0;
    for (int k = 0; k < L->len[i]; k++)
        if (lv[k] + A->p[li[k]] <= thr) { li[m] = li[k]; lv[m++] = lv[k]; }
    L->len[i] = m;
    L->bnd[i] = thr;
    return 0;
}

/* Forward auction (Gauss-Seidel) with eps-scaling (Bertsekas, 1988) in single precision on the
   float32 matrix A->a: row i bids for the column minimising a[i][j] + p[j], raising its price by
   the difference to the second best plus eps. owner[j]: the row holding column j at the end; the
   lists of the last phase stay in A->L (see the file's comment). Only a warm start. Returns 1
   when out of memory. */
/* The first set bit after bit i, cyclically (bits: words 64-bit words, at least one set). */
static int next_set(const uint64_t *bits, int words, int i) {
    int w = (i + 1) >> 6;
    uint64_t b = (i + 1) & 63 ? bits[w % words] & (~(uint64_t)0 << ((i + 1) & 63)) : bits[w % words];
    if (w >= words) { w = 0; b = bits[0]; }
    while (!b) { w = w + 1 < words ? w + 1 : 0; b = bits[w]; }
    return (w << 6) + __builtin_ctzll(b);
}

static int auction(auction_t *A, int *owner, int *stack, int *colof, uint64_t *todo, double span, double eps_final,
                   int64_t max_bids) {
    int n = A->n;
    float *p = A->p;
    int64_t bids = 0;
    int listed = 0;
    for (double eps = span / 4; eps >= eps_final && bids < max_bids; eps /= EPS_FACTOR) {
        float e = (float)eps, delta = (float)(LIST_EPS * eps);
        int lists = LIST_EPS * eps <= LIST_SPAN * span;
        A->stats[7]++;
        if (lists) {
            for (int i = 0; i < n; i++) {
                /* first listing in one pass: the owned column's x bounds the row's minimum */
                int rc = listed ? alist_filter(A, i, delta)
                                : alist_row(A, i, colof[i] >= 0 ? A->a[(size_t)i * n + colof[i]] + p[colof[i]] + delta : NAN,
                                            delta);
                if (rc) return 1;
            }
            listed = 1;
        }
        for (int j = 0; j < n; j++) owner[j] = -1;
        for (int i = 0; i < n; i++) colof[i] = -1;
        if (!lists) { /* whole rows: sweep over the rows in order, fetching the next one meanwhile */
            int words = (n + 63) / 64, pending = n, i = 0;
            for (int w = 0; w < words; w++) todo[w] = ~(uint64_t)0;
            if (n % 64) todo[words - 1] = ((uint64_t)1 << (n % 64)) - 1;
            while (pending > 0 && bids < max_bids) {
                todo[i >> 6] &= ~((uint64_t)1 << (i & 63));
                pending--;
                int next = pending > 0 ? next_set(todo, words, i) : -1, j1;
                float w1, w2;
                A->kn->two_min(A->a + (size_t)i * n, p, n, next >= 0 ? A->a + (size_t)next * n : NULL, &w1, &j1, &w2);
                if (w2 == INFINITY) w2 = w1;
                p[j1] += (w2 - w1) + e;
                int k = owner[j1];
                if (k >= 0) {
                    todo[k >> 6] |= (uint64_t)1 << (k & 63);
                    pending++;
                    colof[k] = -1;
                    if (next < 0) next = k;
                }
                owner[j1] = i;
                colof[i] = j1;
                bids++;
                if (pending > 0) i = next_set(todo, words, i);
            }
            continue;
        }
        int top = 0; /* the row displaced last bids next */
        for (int i = n - 1; i >= 0; i--) stack[top++] = i;
        while (top > 0 && bids < max_bids) {
            int i = stack[--top], j1 = -1;
            float w1 = INFINITY, w2 = INFINITY;
            if (lists && A->L.len[i] >= 0) {
                alist_two_min(A, i, &w1, &j1, &w2);
                if (!(w2 <= A->L.bnd[i])) { /* the second best may lie outside: list again */
                    if (alist_row(A, i, j1 >= 0 ? w1 + delta : NAN, delta)) return 1;
                    if (A->L.len[i] >= 0) alist_two_min(A, i, &w1, &j1, &w2);
                    if (!(w2 <= A->L.bnd[i])) j1 = -1;
                }
            }
            if (j1 < 0) A->kn->two_min(A->a + (size_t)i * n, p, n, NULL, &w1, &j1, &w2);
            if (w2 == INFINITY) w2 = w1;
            p[j1] += (w2 - w1) + e;
            if (owner[j1] >= 0) { stack[top++] = owner[j1]; colof[owner[j1]] = -1; }
            owner[j1] = i;
            colof[i] = j1;
            bids++;
        }
    }
    A->stats[0] += bids;
    if (!listed) flist_t_free(&A->L);
    return 0;
}

/* ---- exact phase (double precision) ------------------------------------------------------- */
typedef struct {
    const float *cf;
    const double *cd;
    int n;
    const kernels_t *kn;
    double *p;
    dlist_t L;
    int64_t *stats;
} solver_t;

static inline double cost(const solver_t *s, int i, int j) {
    size_t q = (size_t)i * (size_t)s->n + (size_t)j;
    return s->cf ? (double)s->cf[q] : s->cd[q];
}

static double row_xmin(const solver_t *s, int i) {
    size_t off = (size_t)i * (size_t)s->n;
    return s->cf ? s->kn->xmin_f(s->cf + off, s->p, s->n) : s->kn->xmin_d(s->cd + off, s->p, s->n);
}

static int row_collect(const solver_t *s, int i, double thr, int cap, int *idx, double *val) {
    size_t off = (size_t)i * (size_t)s->n;
    return s->cf ? s->kn->xcollect_f(s->cf + off, s->p, s->n, thr, cap, idx, val)
                 : s->kn->xcollect_d(s->cd + off, s->p, s->n, thr, cap, idx, val);
}

/* List row i afresh with threshold thr (in its own slot when the list fits, else at the end of
   the pool; no list when longer than lmax). Returns 1 when out of memory. */
static int list_row(solver_t *s, int i, double thr) {
    dlist_t *L = &s->L;
    int cnt = L->len[i] >= 0 ? row_collect(s, i, thr, L->cap[i], L->pidx + L->ofs[i], L->pval + L->ofs[i]) : INT_MAX;
    if (cnt > L->cap[i] || L->len[i] < 0) {
        if (dlist_t_room(L, L->lmax)) return 1;
        cnt = row_collect(s, i, thr, L->lmax, L->pidx + L->used, L->pval + L->used);
        if (cnt > L->lmax) { L->len[i] = -1; L->bnd[i] = thr; return 0; }
        dlist_t_take(L, i, cnt);
    }
    L->len[i] = cnt;
    L->bnd[i] = thr;
    return 0;
}

/* State of one Dijkstra search. */
typedef struct {
    double *d;       /* tentative distance (+inf: not reached, -inf: settled) */
    int *pred;       /* row through which a column was reached */
    int *mark, sid;  /* mark[j] == sid: column touched in this search */
    int *touched, nt;
    int *out;        /* scratch for the dense kernel */
    heap_t cols;
    double dfree;    /* smallest tentative distance of a free column */
    const int *colsol;
    int64_t pushes;
} search_t;

static int reach(search_t *q, int j, double nd, int i) {
    q->d[j] = nd;
    q->pred[j] = i;
    if (q->mark[j] != q->sid) { q->mark[j] = q->sid; q->touched[q->nt++] = j; }
    int is_free = q->colsol[j] < 0;
    if (is_free && nd < q->dfree) q->dfree = nd;
    q->pushes++;
    return hpush(&q->cols, nd, j, !is_free);
}

/* Relax row i (distance offset h) over its list, or over the whole row when it has none. */
static int relax_row(const solver_t *s, search_t *q, int i, double h) {
    if (s->L.len[i] < 0) {
        s->stats[5]++;
        size_t off = (size_t)i * s->n;
        int cnt = s->cf ? s->kn->relax_f(s->cf + off, s->p, h, i, q->d, q->pred, s->n, q->dfree, q->out)
                        : s->kn->relax_d(s->cd + off, s->p, h, i, q->d, q->pred, s->n, q->dfree, q->out);
        /* first the nearest free column among those reached, then push only what is nearer: a column
           at or beyond it can never be settled before the search ends (rows with many tied
           columns would otherwise fill the heap) */
        int jfree = -1;
        for (int k = 0; k < cnt; k++) {
            int j = q->out[k];
            if (q->colsol[j] < 0 && q->d[j] < q->dfree) { q->dfree = q->d[j]; jfree = j; }
        }
        for (int k = 0; k < cnt; k++) {
            int j = q->out[k];
            if (q->d[j] < q->dfree || j == jfree) {
                if (reach(q, j, q->d[j], i)) return 1;
            } else if (q->mark[j] != q->sid) { /* reached but not worth a heap entry: reset it afterwards */
                q->mark[j] = q->sid;
                q->touched[q->nt++] = j;
            }
        }
        return 0;
    }
    const int *li = s->L.pidx + s->L.ofs[i];
    const double *lv = s->L.pval + s->L.ofs[i];
    for (int k = 0, m = s->L.len[i]; k < m; k++) {
        int j = li[k];
        double nd = (lv[k] + s->p[j]) - h;
        if (nd < q->d[j] && nd < q->dfree && reach(q, j, nd, i)) return 1;
    }
    return 0;
}

/* ---- the solver ----------------------------------------------------------------------------- */
/* Exact assignment. cost: n x n row-major, float32 (is_float = 1) or float64; col[i]: column of
   row i; v[j]: column potentials of the certificate. eps_rel: the auction stops at eps = span *
   eps_rel (span: largest minus smallest cost); max_bids: at most this many bids (0: no auction);
   list_rel: the exact phase lists the columns within span * list_rel of a row's minimum;
   stats (8 entries or NULL): bids, auction listings, rows left free by the hand-off, settled
   columns, exact-phase listings, full-row relaxations, heap pushes, auction phases.
   Returns 0, 1 (out of memory or n too large), 2 (a cost is not finite) or 3 (no augmenting
   path: cannot happen with finite costs). */
int cfm_assign(const void *cost_matrix, int is_float, int64_t n64, int64_t *col, double *v, double eps_rel,
               int64_t max_bids, double list_rel, int64_t *stats) {
    int64_t dummy[8];
    if (!stats) stats = dummy;
    for (int k = 0; k < 8; k++) stats[k] = 0;
    if (n64 <= 0) return n64 == 0 ? 0 : 1;
    if (n64 > (1 << 28)) return 1;
    int n = (int)n64, rc = 0;
    int lmax = n / 4 < 64 ? (n < 64 ? n : 64) : n / 4;
    solver_t s = {0};
    s.cf = is_float ? (const float *)cost_matrix : NULL;
    s.cd = is_float ? NULL : (const double *)cost_matrix;
    s.n = n;
    s.kn = kernels();
    s.stats = stats;
    auction_t A = {0};
    search_t q = {0};
    heap_t bounds = {0};
    float *ashift = NULL;
    int *rowsol = malloc((size_t)n * sizeof(int)), *colsol = malloc((size_t)n * sizeof(int));
    int *owner = malloc((size_t)n * sizeof(int)), *stack = malloc((size_t)n * sizeof(int));
    int *scol = malloc((size_t)n * sizeof(int));
    uint64_t *todo = malloc((size_t)(n + 63) / 64 * sizeof(uint64_t));
    double *u = malloc((size_t)n * sizeof(double)), *key = malloc((size_t)n * sizeof(double));
    double *slack = malloc((size_t)n * sizeof(double)), *sdist = malloc((size_t)n * sizeof(double));
    double *hrow = malloc((size_t)n * sizeof(double));
    s.p = calloc((size_t)n, sizeof(double));
    q.d = malloc((size_t)n * sizeof(double));
    q.pred = malloc((size_t)n * sizeof(int));
    q.mark = calloc((size_t)n, sizeof(int));
    q.touched = malloc((size_t)n * sizeof(int));
    q.out = malloc((size_t)n * sizeof(int));
    if (!rowsol || !colsol || !owner || !stack || !scol || !todo || !u || !key || !slack || !sdist || !hrow ||
        !s.p || !q.d || !q.pred || !q.mark || !q.touched || !q.out || dlist_t_init(&s.L, n, lmax)) {
        rc = 1;
        goto out;
    }
    q.colsol = colsol;

    /* finiteness and range */
    double lo, hi;
    if (s.cf ? s.kn->range_f(s.cf, (size_t)n * n, &lo, &hi) : s.kn->range_d(s.cd, (size_t)n * n, &lo, &hi)) {
        rc = 2;
        goto out;
    }
    double span = hi - lo;
    if (span == 0) { /* all costs equal: every permutation is optimal */
        for (int i = 0; i < n; i++) { col[i] = i; v[i] = 0.0; }
        goto out;
    }
    for (int j = 0; j < n; j++) { rowsol[j] = -1; colsol[j] = -1; owner[j] = -1; }
    int warm = n > 1 && max_bids > 0 && span > 0;
    double delta = span * list_rel;

    /* 1. auction warm start, single precision, on the costs shifted to start at 0 where needed
       (a large offset would leave float32 too few digits for the differences) */
    if (warm) {
        A.a = s.cf;
        if (!A.a || fabs(lo) > span) {
            size_t m = (size_t)n * n;
            ashift = malloc(sizeof(float) * m);
            if (!ashift) { rc = 1; goto out; }
            if (s.cf) for (size_t k = 0; k < m; k++) ashift[k] = (float)((double)s.cf[k] - lo);
            else for (size_t k = 0; k < m; k++) ashift[k] = (float)(s.cd[k] - lo);
            A.a = ashift;
        }
        A.p = calloc((size_t)n, sizeof(float));
        A.n = n;
        A.kn = s.kn;
        A.stats = stats;
        double eps_final = span * eps_rel;
        if (eps_final < span * 1e-6) eps_final = span * 1e-6; /* float32 resolution */
        if (!A.p || flist_t_init(&A.L, n, lmax) || auction(&A, owner, stack, rowsol, todo, span, eps_final, max_bids)) {
            rc = 1;
            goto out;
        }
        for (int j = 0; j < n; j++) { s.p[j] = (double)A.p[j]; rowsol[j] = -1; }
    }

    /* lists for the exact phase at the auction's prices; u[i]: each row's minimum. Where the auction
       ran on the caller's float32 matrix itself, its lists carry over: a + p in double is the
       exact sum, so a column outside a list, whose float sum exceeded the threshold, has
       x >= the threshold in double too. */
    for (int i = 0; i < n; i++) {
        if (A.L.len && A.L.len[i] >= 0 && A.a == s.cf) {
            int m = A.L.len[i];
            const int *li = A.L.pidx + A.L.ofs[i];
            const float *lv = A.L.pval + A.L.ofs[i];
            double mn = INFINITY;
            for (int k = 0; k < m; k++) { double x = (double)lv[k] + s.p[li[k]]; if (x < mn) mn = x; }
            if (mn <= (double)A.L.bnd[i] && m <= lmax) {
                if (dlist_t_room(&s.L, m)) { rc = 1; goto out; }
                for (int k = 0; k < m; k++) { s.L.pidx[s.L.used + k] = li[k]; s.L.pval[s.L.used + k] = (double)lv[k]; }
                dlist_t_take(&s.L, i, m);
                s.L.bnd[i] = (double)A.L.bnd[i];
                u[i] = mn;
                continue;
            }
        }
        u[i] = row_xmin(&s, i);
        if (list_row(&s, i, u[i] + delta)) { rc = 1; goto out; }
    }
    flist_t_free(&A.L);
    free(A.p);
    A.p = NULL;
    free(ashift);
    ashift = NULL;

    /* 2. hand-off to a dual feasible start: make each auction pair tight by lowering its column's
       price by its slack, where no other row's reduced cost would turn negative; pairs that
       cannot be made tight are dropped */
    if (warm) {
        double smax = 0.0;
        for (int j = 0; j < n; j++) {
            key[j] = INFINITY;
            int i = owner[j];
            if (i < 0) continue;
            slack[j] = (cost(&s, i, j) + s.p[j]) - u[i];
            if (slack[j] > smax) smax = slack[j];
        }
        for (int k = 0; k < n; k++) {
            if (s.L.len[k] >= 0 && s.L.bnd[k] - u[k] >= smax) { /* columns outside the list cannot limit */
                const int *li = s.L.pidx + s.L.ofs[k];
                const double *lv = s.L.pval + s.L.ofs[k];
                for (int m = 0; m < s.L.len[k]; m++) {
                    int j = li[m];
                    if (owner[j] == k) continue;
                    double r = (lv[m] + s.p[j]) - u[k];
                    if (r < key[j]) key[j] = r;
                }
            } else if (s.cf) {
                s.kn->colslack_f(s.cf + (size_t)k * n, s.p, u[k], owner, k, key, n);
            } else {
                s.kn->colslack_d(s.cd + (size_t)k * n, s.p, u[k], owner, k, key, n);
            }
        }
        double maxdrop = 0.0, pmax = 0.0;
        for (int j = 0; j < n; j++) {
            int i = owner[j];
            if (i >= 0) {
                double drop = slack[j] <= key[j] ? slack[j] : key[j];
                if (drop < 0) drop = 0;
                s.p[j] -= drop;
                if (drop > maxdrop) maxdrop = drop;
                if (slack[j] <= key[j]) { rowsol[i] = j; colsol[j] = i; }
            }
            if (fabs(s.p[j]) > pmax) pmax = fabs(s.p[j]);
        }
        /* prices fell by at most maxdrop: lower every threshold by that, and a margin for rounding */
        double margin = maxdrop * (1 + 1e-12) + 1e-13 * (fabs(lo) + fabs(hi) + pmax);
        for (int i = 0; i < n; i++) s.L.bnd[i] -= margin;
    }

    /* 3. shortest augmenting paths (Jonker and Volgenant, 1987) from every free row: Dijkstra on
       reduced costs. A scanned row relaxes its list and leaves the lower bound bnd - h for its
       other columns; when that bound is below the next distance to settle, the row is listed
       again with a threshold above it. */
    for (int j = 0; j < n; j++) q.d[j] = INFINITY;
    if (hpush(&bounds, 0, 0, 0)) { rc = 1; goto out; } /* allocate */
    for (int f = 0; f < n; f++) {
        if (rowsol[f] >= 0) continue;
        stats[2]++;
        q.sid++;
        q.nt = 0;
        q.cols.size = 0;
        bounds.size = 0;
        q.dfree = INFINITY;
        int nsc = 0, jend = -1;
        double dmin = 0;
        hrow[f] = 0.0;
        if (relax_row(&s, &q, f, 0.0)) { rc = 1; goto out; }
        if (s.L.len[f] >= 0 && s.L.bnd[f] < q.dfree && hpush(&bounds, s.L.bnd[f], f, 0)) { rc = 1; goto out; }
        for (;;) {
            while (q.cols.size > 0 && q.cols.a[0].key != q.d[q.cols.a[0].id]) hpop(&q.cols); /* stale */
            double best = q.cols.size > 0 ? q.cols.a[0].key : INFINITY;
            if (bounds.size > 0 && bounds.a[0].key < best) {
                /* a column outside this row's list may be nearer than best: list the row again */
                int i = hpop(&bounds).id;
                double h = hrow[i], front = best < q.dfree ? best : q.dfree, lb = s.L.bnd[i] - h;
                if (front == INFINITY) front = lb + delta;
                stats[4]++;
                if (list_row(&s, i, (front > lb ? front : lb) + h + delta) || relax_row(&s, &q, i, h)) { rc = 1; goto out; }
                if (s.L.len[i] >= 0 && s.L.bnd[i] - h < q.dfree && hpush(&bounds, s.L.bnd[i] - h, i, 0)) { rc = 1; goto out; }
                continue;
            }
            if (best == INFINITY) { rc = 3; goto out; }
            int js = hpop(&q.cols).id;
            q.d[js] = -INFINITY;
            scol[nsc] = js;
            sdist[nsc++] = best;
            stats[3]++;
            if (colsol[js] < 0) { jend = js; dmin = best; break; }
            int i = colsol[js];
            double h = (cost(&s, i, js) + s.p[js]) - best;
            hrow[i] = h;
            if (relax_row(&s, &q, i, h)) { rc = 1; goto out; }
            if (s.L.len[i] >= 0 && s.L.bnd[i] - h < q.dfree && hpush(&bounds, s.L.bnd[i] - h, i, 0)) { rc = 1; goto out; }
        }
        for (int k = 0; k < nsc; k++) s.p[scol[k]] += dmin - sdist[k];
        for (int k = 0; k < q.nt; k++) q.d[q.touched[k]] = INFINITY;
        for (int j = jend;;) {
            int i = q.pred[j];
            colsol[j] = i;
            int prev = rowsol[i];
            rowsol[i] = j;
            if (i == f) break;
            j = prev;
        }
    }
    stats[6] = q.pushes;
    for (int i = 0; i < n; i++) col[i] = rowsol[i];
    for (int j = 0; j < n; j++) v[j] = -s.p[j];
out:
    free(rowsol); free(colsol); free(owner); free(stack); free(scol); free(todo);
    free(u); free(key); free(slack); free(sdist); free(hrow);
    free(s.p); dlist_t_free(&s.L); flist_t_free(&A.L); free(A.p); free(ashift);
    free(q.d); free(q.pred); free(q.mark); free(q.touched); free(q.out); free(q.cols.a); free(bounds.a);
    return rc;
}
