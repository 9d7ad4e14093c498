/* Dense row kernels of the assignment solver in _assign.c (chapter 8 of the book).
 *
 * Included once per instruction set and cost type, with these macros set by the includer:
 *   KVB    vector width in bytes (16, 32 or 64)
 *   KATTR  function attributes selecting the instruction set (may be empty)
 *   KT     suffix naming this (instruction set, cost type) pair
 *   CT     the cost matrix's element type, float or double
 *   CT_FLOAT  1 when CT is float
 * Every kernel works on one row of the n x n cost matrix, in double precision, on
 * x[j] = c[j] + p[j] (cost plus column price). GNU C vector extensions, no intrinsics. */

#define KN2_(a, b) a##_##b
#define KN_(a, b) KN2_(a, b)
#define KN(name) KN_(name, KT)
#define KVL (KVB / 8) /* doubles per vector */

typedef double KN(vd) __attribute__((vector_size(KVB)));
typedef long long KN(vl) __attribute__((vector_size(KVB)));
typedef float KN(vh) __attribute__((vector_size(KVB / 2))); /* KVL floats */

static inline KATTR __attribute__((always_inline)) KN(vd) KN(loadc)(const CT *x) {
#if CT_FLOAT
    KN(vh) h;
    memcpy(&h, x, sizeof h);
    return __builtin_convertvector(h, KN(vd));
#else
    KN(vd) d;
    memcpy(&d, x, sizeof d);
    return d;
#endif
}
static inline KATTR __attribute__((always_inline)) KN(vd) KN(loadd)(const double *x) {
    KN(vd) d;
    memcpy(&d, x, sizeof d);
    return d;
}
static inline KATTR __attribute__((always_inline)) KN(vd) KN(splat)(double x) {
    KN(vd) r;
    for (int l = 0; l < KVL; l++) r[l] = x;
    return r;
}
static inline KATTR __attribute__((always_inline)) KN(vd) KN(sel)(KN(vl) m, KN(vd) a, KN(vd) b) {
    return (KN(vd))((m & (KN(vl))a) | (~m & (KN(vl))b));
}
/* whether any lane of a comparison mask is set: halve the vector down to 16 bytes, then 2 words */
typedef long long KN(vq) __attribute__((vector_size(16)));
static inline KATTR __attribute__((always_inline)) int KN(any)(KN(vl) m) {
#if KVB == 64
    typedef long long h32 __attribute__((vector_size(32)));
    h32 a, b;
    memcpy(&a, &m, 32);
    memcpy(&b, (const char *)&m + 32, 32);
    a |= b;
    KN(vq) c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (const char *)&a + 16, 16);
    c |= d;
#elif KVB == 32
    KN(vq) c, d;
    memcpy(&c, &m, 16);
    memcpy(&d, (const char *)&m + 16, 16);
    c |= d;
#else
    KN(vq) c = m;
#endif
    return (c[0] | c[1]) != 0;
}

/* min_j c[j] + p[j] of one row, in double precision */
static KATTR double KN(xmin)(const CT *c, const double *p, int n) {
    KN(vd) m0 = KN(splat)(INFINITY), m1 = m0;
    int j = 0;
    for (; j + 2 * KVL <= n; j += 2 * KVL) {
        KN(vd) x0 = KN(loadc)(c + j) + KN(loadd)(p + j);
        KN(vd) x1 = KN(loadc)(c + j + KVL) + KN(loadd)(p + j + KVL);
        m0 = KN(sel)(x0 < m0, x0, m0);
        m1 = KN(sel)(x1 < m1, x1, m1);
    }
    m0 = KN(sel)(m1 < m0, m1, m0);
    double mn = INFINITY;
    for (int l = 0; l < KVL; l++) if (m0[l] < mn) mn = m0[l];
    for (; j < n; j++) { double x = (double)c[j] + p[j]; if (x < mn) mn = x; }
    return mn;
}

/* The columns with c[j] + p[j] <= thr (double precision): their indices and costs in idx/val, at
   most cap; returns how many there are (cap + 1 when more). */
static KATTR int KN(xcollect)(const CT *c, const double *p, int n, double thr, int cap, int *idx, double *val) {
    KN(vd) vt = KN(splat)(thr);
    int cnt = 0, j = 0;
#if KVB == 64 && CFM_X86 /* compress in registers, as in collect below */
    __m256i jv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
    for (; j + 8 <= n && cnt + 8 <= cap; j += 8, jv = _mm256_add_epi32(jv, eight)) {
        KN(vd) cv = KN(loadc)(c + j);
        __mmask8 m = _mm512_cmp_pd_mask((__m512d)(cv + KN(loadd)(p + j)), (__m512d)vt, _CMP_LE_OQ);
        if (m) {
            _mm256_storeu_si256((__m256i *)(idx + cnt), _mm256_maskz_compress_epi32(m, jv));
            _mm512_storeu_pd(val + cnt, _mm512_maskz_compress_pd(m, (__m512d)cv));
            cnt += __builtin_popcount(m);
        }
    }
#endif
    for (; j + 2 * KVL <= n; j += 2 * KVL) {
        KN(vd) c0 = KN(loadc)(c + j), c1 = KN(loadc)(c + j + KVL);
        KN(vl) m0 = (c0 + KN(loadd)(p + j)) <= vt, m1 = (c1 + KN(loadd)(p + j + KVL)) <= vt;
        if (KN(any)(m0 | m1)) {
            if (cnt + 2 * KVL > cap) {
                for (int l = 0; l < KVL; l++)
                    if (m0[l]) { if (cnt >= cap) return cap + 1; idx[cnt] = j + l; val[cnt++] = c0[l]; }
                for (int l = 0; l < KVL; l++)
                    if (m1[l]) { if (cnt >= cap) return cap + 1; idx[cnt] = j + KVL + l; val[cnt++] = c1[l]; }
            } else {
                for (int l = 0; l < KVL; l++) { idx[cnt] = j + l; val[cnt] = c0[l]; cnt -= (int)m0[l]; }
                for (int l = 0; l < KVL; l++) { idx[cnt] = j + KVL + l; val[cnt] = c1[l]; cnt -= (int)m1[l]; }
            }
        }
    }
    for (; j < n; j++) {
        double x = (double)c[j] + p[j];
        if (x <= thr) {
            if (cnt >= cap) return cap + 1;
            idx[cnt] = j;
            val[cnt++] = (double)c[j];
        }
    }
    return cnt;
}

/* Dijkstra relaxation of a whole row: nd = c[j] + p[j] - h; where nd < d[j] and nd < cut, set
   d[j] = nd, pred[j] = i and append j to out. Returns how many were appended. */
static KATTR int KN(relax)(const CT *c, const double *p, double h, int i, double *d, int *pred, int n, double cut,
                           int *out) {
    KN(vd) vh = KN(splat)(h), vcut = KN(splat)(cut);
    int cnt = 0, j = 0;
    for (; j + KVL <= n; j += KVL) {
        KN(vd) nd = (KN(loadc)(c + j) + KN(loadd)(p + j)) - vh;
        KN(vl) mk = (nd < KN(loadd)(d + j)) & (nd < vcut);
        if (KN(any)(mk))
            for (int l = 0; l < KVL; l++)
                if (mk[l]) { d[j + l] = nd[l]; pred[j + l] = i; out[cnt++] = j + l; }
    }
    for (; j < n; j++) {
        double nd = ((double)c[j] + p[j]) - h;
        if (nd < d[j] && nd < cut) { d[j] = nd; pred[j] = i; out[cnt++] = j; }
    }
    return cnt;
}

/* key[j] = min(key[j], c[j] + p[j] - u) over the columns whose owner is not k. */
static KATTR void KN(colslack)(const CT *c, const double *p, double u, const int *own, int k, double *key, int n) {
    KN(vd) vu = KN(splat)(u);
    int j = 0;
    for (; j + KVL <= n; j += KVL) {
        KN(vd) r = (KN(loadc)(c + j) + KN(loadd)(p + j)) - vu, old = KN(loadd)(key + j);
        KN(vl) ok;
        for (int l = 0; l < KVL; l++) ok[l] = own[j + l] != k ? -1 : 0;
        r = KN(sel)((r < old) & ok, r, old);
        memcpy(key + j, &r, sizeof r);
    }
    for (; j < n; j++) {
        double r = ((double)c[j] + p[j]) - u;
        if (r < key[j] && own[j] != k) key[j] = r;
    }
}


/* lo, hi = min, max of c[0..m); returns 1 when some c is NaN or infinite */
static KATTR int KN(range)(const CT *c, size_t m, double *plo, double *phi) {
    KN(vd) lo = KN(splat)(INFINITY), hi = KN(splat)(-INFINITY);
    KN(vl) bad = {0};
    size_t q = 0;
    for (; q + KVL <= m; q += KVL) {
        KN(vd) a = KN(loadc)(c + q);
        bad |= (a - a) != 0;
        lo = KN(sel)(a < lo, a, lo);
        hi = KN(sel)(a > hi, a, hi);
    }
    double l0 = INFINITY, h0 = -INFINITY;
    int b = 0;
    for (int l = 0; l < KVL; l++) { b |= bad[l] != 0; if (lo[l] < l0) l0 = lo[l]; if (hi[l] > h0) h0 = hi[l]; }
    for (; q < m; q++) { double a = c[q]; if (a - a != 0) b = 1; if (a < l0) l0 = a; if (a > h0) h0 = a; }
    *plo = l0;
    *phi = h0;
    return b;
}

#if CT_FLOAT
#define KFL (KVB / 4) /* floats per vector */
typedef float KN(vf) __attribute__((vector_size(KVB)));
typedef int KN(vi) __attribute__((vector_size(KVB)));
static inline KATTR __attribute__((always_inline)) KN(vf) KN(loadf)(const float *x) {
    KN(vf) r;
    memcpy(&r, x, sizeof r);
    return r;
}
static inline KATTR __attribute__((always_inline)) KN(vf) KN(self)(KN(vi) m, KN(vf) a, KN(vf) b) {
    return (KN(vf))((m & (KN(vi))a) | (~m & (KN(vi))b));
}
static inline KATTR __attribute__((always_inline)) KN(vi) KN(seli)(KN(vi) m, KN(vi) a, KN(vi) b) {
    return (m & a) | (~m & b);
}

/* Auction bid on a float32 row: smallest a[j] + p[j], its index (lowest among ties) and the second
   smallest (a tie counts twice). next (may be NULL): the row to bid next, fetched into the cache
   meanwhile (the processor's own prefetcher does not guess a jump to another row). */
#define KUA 4
static KATTR void KN(two_min)(const float *a, const float *p, int n, const float *next, float *pw1, int *pj1,
                              float *pw2) {
    KN(vf) m1[KUA], m2[KUA];
    KN(vi) id[KUA], jv[KUA], step;
    for (int u = 0; u < KUA; u++)
        for (int l = 0; l < KFL; l++) { m1[u][l] = INFINITY; m2[u][l] = INFINITY; id[u][l] = 0; jv[u][l] = u * KFL + l; }
    for (int l = 0; l < KFL; l++) step[l] = KUA * KFL;
    int j = 0;
    for (; j + KUA * KFL <= n; j += KUA * KFL) {
        if (next)
            for (int q = 0; q < KUA * KFL; q += 16) __builtin_prefetch(next + j + q, 0, 3);
        for (int u = 0; u < KUA; u++) {
            KN(vf) x = KN(loadf)(a + j + u * KFL) + KN(loadf)(p + j + u * KFL);
            KN(vi) lt = x < m1[u];
            KN(vf) hi = KN(self)(lt, m1[u], x);
            m2[u] = KN(self)(hi < m2[u], hi, m2[u]);
            id[u] = KN(seli)(lt, jv[u], id[u]);
            m1[u] = KN(self)(lt, x, m1[u]);
            jv[u] += step;
        }
    }
    for (int u = 1; u < KUA; u++) {
        KN(vi) lt = (m1[u] < m1[0]) | ((m1[u] == m1[0]) & (id[u] < id[0]));
        KN(vf) lose = KN(self)(lt, m1[0], m1[u]);
        m1[0] = KN(self)(lt, m1[u], m1[0]);
        id[0] = KN(seli)(lt, id[u], id[0]);
        KN(vf) m2u = KN(self)(m2[u] < m2[0], m2[u], m2[0]);
        m2[0] = KN(self)(lose < m2u, lose, m2u);
    }
    float w1 = INFINITY, w2 = INFINITY;
    int j1 = -1, sl = -1;
    if (j > 0) {
        for (int l = 0; l < KFL; l++)
            if (m1[0][l] < w1 || (m1[0][l] == w1 && id[0][l] < j1)) { w1 = m1[0][l]; j1 = id[0][l]; sl = l; }
        for (int l = 0; l < KFL; l++) {
            if (m2[0][l] < w2) w2 = m2[0][l];
            if (l != sl && m1[0][l] < w2) w2 = m1[0][l];
        }
    }
    for (; j < n; j++) {
        float x = a[j] + p[j];
        if (x < w1) { w2 = w1; w1 = x; j1 = j; } else if (x < w2) w2 = x;
    }
    *pw1 = w1;
    *pj1 = j1 < 0 ? 0 : j1;
    *pw2 = w2;
}

/* The columns of a float32 row with a[j] + p[j] <= thr: their indices and costs a[j] in idx/val
   (at most cap); returns how many there are (cap + 1 when more). */
static KATTR int KN(collect)(const float *a, const float *p, int n, float thr, int cap, int *idx, float *val) {
    KN(vf) vt;
    for (int l = 0; l < KFL; l++) vt[l] = thr;
    int cnt = 0, j = 0;
#if KVB == 64 && CFM_X86
    /* AVX-512: compress the selected lanes in registers, then store whole vectors (the memory form
       of compress is slow on some processors) */
    __m512i jv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), sixteen = _mm512_set1_epi32(16);
    __m512 t = _mm512_set1_ps(thr);
    for (; j + 16 <= n && cnt + 16 <= cap; j += 16, jv = _mm512_add_epi32(jv, sixteen)) {
        __m512 av = _mm512_loadu_ps(a + j);
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_add_ps(av, _mm512_loadu_ps(p + j)), t, _CMP_LE_OQ);
        if (m) {
            _mm512_storeu_si512((void *)(idx + cnt), _mm512_maskz_compress_epi32(m, jv));
            _mm512_storeu_ps(val + cnt, _mm512_maskz_compress_ps(m, av));
            cnt += __builtin_popcount(m);
        }
    }
#endif
    for (; j + 2 * KFL <= n; j += 2 * KFL) {
        KN(vf) a0 = KN(loadf)(a + j), a1 = KN(loadf)(a + j + KFL);
        KN(vf) x0 = a0 + KN(loadf)(p + j), x1 = a1 + KN(loadf)(p + j + KFL);
        KN(vi) m0 = x0 <= vt, m1 = x1 <= vt;
        if (KN(any)((KN(vl))(m0 | m1))) {
            if (cnt + 2 * KFL > cap) { /* may not fit: go lane by lane */
                for (int l = 0; l < KFL; l++)
                    if (m0[l]) { if (cnt >= cap) return cap + 1; idx[cnt] = j + l; val[cnt++] = a0[l]; }
                for (int l = 0; l < KFL; l++)
                    if (m1[l]) { if (cnt >= cap) return cap + 1; idx[cnt] = j + KFL + l; val[cnt++] = a1[l]; }
            } else {
                for (int l = 0; l < KFL; l++) { idx[cnt] = j + l; val[cnt] = a0[l]; cnt -= m0[l]; }
                for (int l = 0; l < KFL; l++) { idx[cnt] = j + KFL + l; val[cnt] = a1[l]; cnt -= m1[l]; }
            }
        }
    }
    for (; j < n; j++) {
        float x = a[j] + p[j];
        if (x <= thr) {
            if (cnt >= cap) return cap + 1;
            idx[cnt] = j;
            val[cnt++] = a[j];
        }
    }
    return cnt;
}

/* min_j a[j] + p[j] of a float32 row */
static KATTR float KN(rowmin)(const float *a, const float *p, int n) {
    KN(vf) m0, m1;
    for (int l = 0; l < KFL; l++) { m0[l] = INFINITY; m1[l] = INFINITY; }
    int j = 0;
    for (; j + 2 * KFL <= n; j += 2 * KFL) {
        KN(vf) x0 = KN(loadf)(a + j) + KN(loadf)(p + j), x1 = KN(loadf)(a + j + KFL) + KN(loadf)(p + j + KFL);
        m0 = KN(self)(x0 < m0, x0, m0);
        m1 = KN(self)(x1 < m1, x1, m1);
    }
    m0 = KN(self)(m1 < m0, m1, m0);
    float mn = INFINITY;
    for (int l = 0; l < KFL; l++) if (m0[l] < mn) mn = m0[l];
    for (; j < n; j++) { float x = a[j] + p[j]; if (x < mn) mn = x; }
    return mn;
}
#undef KFL
#undef KUA
#endif

#undef KN2_
#undef KN_
#undef KN
#undef KVL
