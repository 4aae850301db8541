/* Per-row symmetric int8 quantisation of float32 rows, bit for bit as
 * kernelhub.reference.int8_gemm.quantize_int8 (see kernelhub/kernels/int8_gemm/native.py, which
 * builds this file with the system C compiler and checks it against the reference before use):
 *
 *     scale[r] = max_k |x[r, k]| / 127          (IEEE float32 division; NaN if the row holds one)
 *     q[r, k]  = rint(x[r, k] / scale[r])       (IEEE division, rounded half to even)
 *                clamped to [-127, 127], and 0 throughout a row whose scale is not > 0 and finite
 *
 * in one read of each row from memory: the absmax pass brings the row into the cache, the second
 * pass reads it there. `kernelhub_quantize_channels` is the same quantisation along the other axis,
 * one scale per column (lowrank_keys' per-channel keys), and `kernelhub_dequantize_rows` is
 * int8_scaled_gemm's epilogue (its int32 product scaled back to float). Built without fast-math and
 * with floating-point contraction off, so the compiler may vectorise but not reassociate or fuse
 * (the epilogue's one fused multiply-add is an explicit fmaf).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>

/* The forms q is written in: the int8 values; the same plus 128 as uint8 (oneDNN's u8 input, zero
 * point 128); the same as float32 (fbgemm's float input, scale 1, zero point 128); or as float32
 * q * scale (fbgemm's float input with the row's own scale, which it quantises back to q). */
enum { FORM_INT8 = 0, FORM_UINT8 = 1, FORM_FLOAT = 2, FORM_FLOAT_SCALED = 3 };

/* The largest |x| of a row as its bit pattern: for non-negative floats the integer order of the
 * bits is the float order, and every NaN lies above +Inf (0x7f800000), so this max propagates NaN
 * where a float max would drop it, and it vectorises exactly. */
static uint32_t row_absmax_bits(const float *x, int64_t k, int64_t stride_k) {
    uint32_t largest = 0;
    if (stride_k == 1) {
        for (int64_t i = 0; i < k; i++) {
            uint32_t bits;
            memcpy(&bits, x + i, sizeof bits);
            bits &= 0x7fffffffu;
            largest = bits > largest ? bits : largest;
        }
    } else {
        for (int64_t i = 0; i < k; i++) {
            uint32_t bits;
            memcpy(&bits, x + i * stride_k, sizeof bits);
            bits &= 0x7fffffffu;
            largest = bits > largest ? bits : largest;
        }
    }
    return largest;
}

/* One row's quotients in `form`. `clamp` only where the scale is subnormal (its quotients reach
 * 191); a normal finite scale gives |x| / scale <= 127 (1 + 2^-24)^2 < 127.5, which rounds to at
 * most 127. */
#define QUANTISE_LOOP(STORE)                                                               \
    do {                                                                                   \
        if (stride_k == 1) {                                                               \
            for (int64_t i = 0; i < k; i++) {                                              \
                float v = rintf(x[i] / scale);                                             \
                if (clamp) v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);          \
                STORE;                                                                     \
            }                                                                              \
        } else {                                                                           \
            for (int64_t i = 0; i < k; i++) {                                              \
                float v = rintf(x[i * stride_k] / scale);                                  \
                if (clamp) v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);          \
                STORE;                                                                     \
            }                                                                              \
        }                                                                                  \
    } while (0)

static void quantise_row(const float *x, int64_t k, int64_t stride_k, void *q, int form, float *scale_out) {
    uint32_t bits = row_absmax_bits(x, k, stride_k);
    float absmax;
    memcpy(&absmax, &bits, sizeof absmax);
    float scale = absmax / 127.0f;
    *scale_out = scale;
    if (!(scale > 0.0f && bits < 0x7f800000u)) { /* zero, NaN or Inf: q = 0 throughout */
        switch (form) {
        case FORM_INT8: memset(q, 0, (size_t)k); break;
        case FORM_UINT8: memset(q, 128, (size_t)k); break;
        default: memset(q, 0, (size_t)k * sizeof(float)); break; /* all-zero bits are +0.0f */
        }
        return;
    }
    int clamp = scale < FLT_MIN;
    switch (form) {
    case FORM_INT8: { int8_t *out = q; QUANTISE_LOOP(out[i] = (int8_t)(int32_t)v); break; }
    case FORM_UINT8: { uint8_t *out = q; QUANTISE_LOOP(out[i] = (uint8_t)((int32_t)v + 128)); break; }
    case FORM_FLOAT: { float *out = q; QUANTISE_LOOP(out[i] = v); break; }
    default: { float *out = q; QUANTISE_LOOP(out[i] = v * scale); break; }
    }
}

/* What each thread of a call does: [first, last) of its rows (or heads). Every job struct below
 * begins with one. */
typedef struct {
    int64_t first, last;
} span;

#define MAX_THREADS 64

/* Where the threads come from. With an OpenMP runtime's entry points handed over (kernelhub_use_openmp:
 * native.py gives torch's own libgomp), a call's spans run on a team of that runtime: the workers
 * that ran torch's op just before (the GEMM whose product the epilogue reads) are still spinning,
 * take the work at once, and no second set of threads competes with them for the cores. Without,
 * each call starts threads of its own. */
typedef void (*team_entry)(void (*)(void *), void *, unsigned, unsigned); /* GOMP_parallel's ABI */
static team_entry run_team;
static int (*team_member)(void), (*team_size)(void); /* omp_get_thread_num, omp_get_num_threads */

/* Hands over (or, with NULLs, takes back) the runtime: GOMP_parallel, omp_get_thread_num and
 * omp_get_num_threads. Call it before any other entry, never while one runs. Returns 0. */
int kernelhub_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    int given = parallel && thread_num && num_threads;
    run_team = given ? (team_entry)parallel : NULL;
    team_member = given ? (int (*)(void))thread_num : NULL;
    team_size = given ? (int (*)(void))num_threads : NULL;
    return 0;
}

typedef struct {
    void *(*pass)(void *);
    char *jobs;
    size_t job_size;
    int count;
} team_work;

/* One team member's share: job s for every s = member (mod team size), so that every job runs
 * even where the runtime gives a smaller team than asked for. */
static void team_share(void *argument) {
    const team_work *work = argument;
    int size = team_size(), member = team_member();
    for (int s = member; s < work->count; s += size) work->pass(work->jobs + s * work->job_size);
}

/* Runs `pass` on `count` items split into `threads` spans: on a team of the handed-over runtime, or
 * on the caller's thread and threads - 1 started for the call. `jobs` is an array of MAX_THREADS
 * job structs of `job_size` bytes, each beginning with a span; jobs[0] is filled in by the caller
 * and copied to the others. Returns 0, or -1 where a thread could not be started (then its span is
 * run on the caller's thread: every item is still done). */
static int run_split(void *(*pass)(void *), void *jobs, size_t job_size, int64_t count, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > count) threads = (int)count;
    if (threads < 1) threads = 1;
    char *job = jobs;
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int status = 0;
    for (int t = 0; t < threads; t++) {
        if (t > 0) memcpy(job + t * job_size, job, job_size);
        span *range = (span *)(job + t * job_size);
        range->first = count * t / threads;
        range->last = count * (t + 1) / threads;
    }
    if (run_team && threads > 1) {
        team_work work = {pass, job, job_size, threads};
        run_team(team_share, &work, (unsigned)threads, 0);
        return 0;
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, pass, job + t * job_size) == 0;
        if (!started[t]) status = -1;
    }
    pass(job);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
        else pass(job + t * job_size);
    }
    return status;
}

typedef struct {
    span rows;
    const float *x;
    int64_t k, stride_m, stride_k;
    char *q;
    int64_t q_row_bytes;
    int form;
    float *scale;
} rows_job;

static void *quantise_rows_job(void *argument) {
    const rows_job *job = argument;
    for (int64_t r = job->rows.first; r < job->rows.last; r++)
        quantise_row(job->x + r * job->stride_m, job->k, job->stride_k, job->q + r * job->q_row_bytes,
                     job->form, job->scale + r);
    return NULL;
}

/* x float32 [m, k] with strides (stride_m, stride_k) in elements; q contiguous [m, k] in `form`;
 * scale float32 [m]. Rows are split over `threads` threads (the caller's, and threads - 1 more).
 * Returns 0, or -1 where a thread could not be started (then every row is still done). */
int kernelhub_quantize_rows(const float *x, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k,
                            void *q, int form, float *scale, int threads) {
    int64_t element = form == FORM_INT8 || form == FORM_UINT8 ? 1 : (int64_t)sizeof(float);
    rows_job jobs[MAX_THREADS];
    jobs[0] = (rows_job){{0, 0}, x, k, stride_m, stride_k, q, k * element, form, scale};
    return run_split(quantise_rows_job, jobs, sizeof jobs[0], m, threads);
}

/* One row x float32 [k] (stride_k) quantised, then multiplied back by its scale, into out [k]
 * (contiguous): fl(q * scale), for a GEMM that quantises its float input again with that scale.
 * Returns the scale. Where it is not a normal, finite float32 (zero, subnormal, NaN or Inf: rows
 * that need the clamp or q = 0), out is left unwritten, and the caller takes another path. */
float kernelhub_quantize_token_scaled(const float *x, int64_t k, int64_t stride_k, float *out) {
    uint32_t bits = row_absmax_bits(x, k, stride_k);
    float absmax;
    memcpy(&absmax, &bits, sizeof absmax);
    float scale = absmax / 127.0f;
    if (!(scale >= FLT_MIN && bits < 0x7f800000u)) return scale;
    int clamp = 0;
    QUANTISE_LOOP(out[i] = v * scale);
    return scale;
}


/* Per-channel quantisation (lowrank_keys' int8 Gram: one scale per channel of the merged keys, over
 * every token), the rows' rule along the other axis, in two calls: the caller takes the absmax of
 * every channel over all tokens (kernelhub_channel_absmax_bits, chunk by chunk), divides it by 127,
 * then quantises chunk by chunk (kernelhub_quantize_channels). Both read x float32
 * [heads, tokens, channels] with strides (stride_h, stride_t, stride_c), one [B, H_kv, S, D]
 * sequence's keys, along its rows. Each pass is inlined twice, once with stride_c = 1 (keys stored
 * [.., S, D]: the inner loop vectorises over the channels) and once with any stride. */
static inline void absmax_bits_pass(const float *x, int64_t tokens, int64_t channels, int64_t stride_t,
                                    int64_t stride_c, uint32_t *largest) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = x + t * stride_t;
        for (int64_t c = 0; c < channels; c++) {
            uint32_t bits;
            memcpy(&bits, row + c * stride_c, sizeof bits);
            bits &= 0x7fffffffu;
            largest[c] = bits > largest[c] ? bits : largest[c];
        }
    }
}

/* One call's heads, split over threads: each thread takes whole heads, so none writes what another
 * reads or writes (a head's channels of q, a head's absmax). */
typedef struct {
    span heads;
    const float *x;
    int64_t tokens, channels, stride_h, stride_t, stride_c;
    uint32_t *largest;                 /* the absmax pass */
    const float *scale;                /* the quantise pass */
    int8_t *q;
    int64_t q_stride_t;
} heads_job;

static void *absmax_heads(void *argument) {
    const heads_job *j = argument;
    for (int64_t h = j->heads.first; h < j->heads.last; h++) {
        const float *keys = j->x + h * j->stride_h;
        uint32_t *largest = j->largest + h * j->channels;
        if (j->stride_c == 1) absmax_bits_pass(keys, j->tokens, j->channels, j->stride_t, 1, largest);
        else absmax_bits_pass(keys, j->tokens, j->channels, j->stride_t, j->stride_c, largest);
    }
    return NULL;
}

/* largest[h * channels + c] = max(itself, max_t of |x[h, t, c]|'s bits): as row_absmax_bits, NaN
 * bits lie above every other. The caller zeroes `largest` before the first chunk. Heads are split
 * over `threads` threads; returns 0, or -1 where a thread could not be started (then every head is
 * still done). */
int kernelhub_channel_absmax_bits(const float *x, int64_t heads, int64_t tokens, int64_t channels,
                                  int64_t stride_h, int64_t stride_t, int64_t stride_c, uint32_t *largest,
                                  int threads) {
    heads_job jobs[MAX_THREADS];
    jobs[0] = (heads_job){{0, 0}, x, tokens, channels, stride_h, stride_t, stride_c, largest, NULL, NULL, 0};
    return run_split(absmax_heads, jobs, sizeof jobs[0], heads, threads);
}

/* One channel's rule is the rows': q = rint(x / s) clamped to [-127, 127], 0 where s is not > 0 and
 * finite. The clamp is applied to every channel: for a normal scale it changes nothing (see
 * QUANTISE_LOOP), and a branch-free loop vectorises. */
static inline void quantise_pass(const float *x, int64_t tokens, int64_t channels, int64_t stride_t,
                                 int64_t stride_c, const float *scale, int8_t *q, int64_t q_stride_t) {
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = x + t * stride_t;
        int8_t *out = q + t * q_stride_t;
        for (int64_t c = 0; c < channels; c++) {
            float s = scale[c];
            float v = rintf(row[c * stride_c] / s);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            out[c] = s > 0.0f && s <= FLT_MAX ? (int8_t)(int32_t)v : 0;
        }
    }
}

static void *quantise_heads(void *argument) {
    const heads_job *j = argument;
    for (int64_t h = j->heads.first; h < j->heads.last; h++) {
        const float *keys = j->x + h * j->stride_h;
        const float *s = j->scale + h * j->channels;
        int8_t *out = j->q + h * j->channels;
        if (j->stride_c == 1) quantise_pass(keys, j->tokens, j->channels, j->stride_t, 1, s, out, j->q_stride_t);
        else quantise_pass(keys, j->tokens, j->channels, j->stride_t, j->stride_c, s, out, j->q_stride_t);
    }
    return NULL;
}

/* q[t, h * channels + c] (int8, row stride q_stride_t) from x[h, t, c] and float32
 * scale[h * channels + c]: one chunk of tokens of the merged [S, H_kv * D] int8 keys. Heads are
 * split over `threads` threads; returns as kernelhub_channel_absmax_bits. */
int kernelhub_quantize_channels(const float *x, int64_t heads, int64_t tokens, int64_t channels,
                                int64_t stride_h, int64_t stride_t, int64_t stride_c, const float *scale,
                                int8_t *q, int64_t q_stride_t, int threads) {
    heads_job jobs[MAX_THREADS];
    jobs[0] = (heads_job){{0, 0}, x, tokens, channels, stride_h, stride_t, stride_c, NULL, scale, q, q_stride_t};
    return run_split(quantise_heads, jobs, sizeof jobs[0], heads, threads);
}

/* The dequantising epilogue of int8_scaled_gemm on the CPU, in one pass over the int32 product,
 * as torch's passes compute it (cpu.py, `cpu_int8_scaled_gemm`; torch's addcmul is a fused
 * multiply-add):
 *
 *     y[i, j] = fma(fl(float(acc[i, j]) * scale_a[i]), scale_b[j], bias[j])
 *     y[i, j] = fl(fl(float(acc[i, j]) * scale_a[i]) * scale_b[j])          (no bias)
 *
 * in float32 (the int32 rounded to nearest even), stored as float32 or as bfloat16 rounded to
 * nearest even (NaN as 0x7fc0). acc [m, n] contiguous; out [m, n] with row stride out_stride_m
 * (elements) and unit column stride, which may be acc's own memory (float32: each element is read
 * before it is written). Rows are split over `threads` threads. */
enum { EPILOGUE_FLOAT32 = 0, EPILOGUE_BFLOAT16 = 1 };

typedef struct {
    span rows;
    const int32_t *acc;
    int64_t n;
    const float *scale_a, *scale_b, *bias;
    void *out;
    int64_t out_stride_m;
    int out_form;
} epilogue_job;

static inline uint16_t bfloat16_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static void *epilogue_rows(void *argument) {
    const epilogue_job *j = argument;
    for (int64_t i = j->rows.first; i < j->rows.last; i++) {
        const int32_t *acc = j->acc + i * j->n;
        const float sa = j->scale_a[i];
        const float *sb = j->scale_b, *bias = j->bias;
        if (j->out_form == EPILOGUE_FLOAT32) {
            float *out = (float *)j->out + i * j->out_stride_m;
            if (bias)
                for (int64_t c = 0; c < j->n; c++) out[c] = fmaf((float)acc[c] * sa, sb[c], bias[c]);
            else
                for (int64_t c = 0; c < j->n; c++) out[c] = ((float)acc[c] * sa) * sb[c];
        } else {
            uint16_t *out = (uint16_t *)j->out + i * j->out_stride_m;
            if (bias)
                for (int64_t c = 0; c < j->n; c++) out[c] = bfloat16_bits(fmaf((float)acc[c] * sa, sb[c], bias[c]));
            else
                for (int64_t c = 0; c < j->n; c++) out[c] = bfloat16_bits(((float)acc[c] * sa) * sb[c]);
        }
    }
    return NULL;
}

/* Whether fmaf is one instruction here (the compiler's __FP_FAST_FMAF): elsewhere it is a libm call
 * per element, slower than torch's passes, and the caller keeps to those. */
int kernelhub_fast_fma(void) {
#ifdef __FP_FAST_FMAF
    return 1;
#else
    return 0;
#endif
}

/* Returns as kernelhub_quantize_rows. */
int kernelhub_dequantize_rows(const int32_t *acc, int64_t m, int64_t n, const float *scale_a,
                              const float *scale_b, const float *bias, void *out, int out_form, int64_t out_stride_m,
                              int threads) {
    epilogue_job jobs[MAX_THREADS];
    jobs[0] = (epilogue_job){{0, 0}, acc, n, scale_a, scale_b, bias, out, out_stride_m, out_form};
    return run_split(epilogue_rows, jobs, sizeof jobs[0], m, threads);
}
