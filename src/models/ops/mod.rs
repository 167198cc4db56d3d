//! Fused f32 CPU kernels with backward passes for the training hot paths of
//! the DiT blocks (issue 10: at small widths a step is per-op overhead, not
//! GEMM). Each op replaces a chain of candle ops that would otherwise each
//! allocate, make a pass over memory and add a graph node whose backward
//! allocates a zero gradient and adds into it:
//!
//! * [`attention_qkv`]: 2D rope on q and k, softmax(q k^T / sqrt(dh)) v,
//!   straight from the fused qkv projection `[B, N, 3C]` to merged heads
//!   `[B, N, C]` (no permute, no contiguous copies, no head merge), threaded
//!   over (batch, head); the probabilities are kept for the backward pass
//!   when the input is tracked.
//! * [`norm_modulate`]: RMSNorm (learned scale) or LayerNorm (no affine),
//!   then adaLN `* (1 + scale) + shift`.
//! * [`gated_residual`]: `x + y * gate`.
//! * [`swiglu`]: `silu(x1) * x2` on the halves of `w12`'s output.
//! * [`linear`]: `x W^T + b` with the bias folded into the GEMM and a backward
//!   that computes dx, dW and db directly.
//!
//! They run only for f32 tensors on the CPU; every caller keeps the multi-op
//! composition for other devices and dtypes, and `RAE_FUSED_CPU=0` forces it
//! everywhere (A/B timing, debugging). The backward passes are tested against
//! that composition (values and gradients) in the tests below. The
//! element-wise kernels are compiled twice, plain and with AVX2 + FMA, and
//! picked at run time.

use std::cell::RefCell;
use std::sync::{Mutex, OnceLock};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor, bail,
};
use gemm::Parallelism;

/// Whether the fused CPU kernels are enabled (`RAE_FUSED_CPU=0` turns them off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("RAE_FUSED_CPU").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// True when the fused kernels apply to all of `ts`: enabled, CPU, f32.
pub fn applies(ts: &[&Tensor]) -> bool {
    let ok = enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if ok {
        tune_allocator();
    }
    ok
}

/// glibc malloc: keep freed memory in the heap instead of returning large
/// blocks to the kernel after every op (a training step allocates and frees
/// the same activation-sized buffers each time; with the defaults, blocks
/// over the dynamic mmap threshold are unmapped on free and page-faulted back
/// in on the next step: ~10% of a small model's step). Done once, the first
/// time a fused CPU kernel runs; `RAE_MALLOC_TUNE=0` leaves malloc alone.
/// (Threads other than the main one still map blocks their arena cannot
/// hold: glibc falls back to mmap there.)
fn tune_allocator() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if matches!(std::env::var("RAE_MALLOC_TUNE").as_deref(), Ok("0")) {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            unsafe extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            const M_MMAP_MAX: i32 = -4;
            // 32 MiB is glibc's largest mmap threshold on 64-bit, and larger
            // blocks (a ViT MLP activation, a DiT-DH-S gradient) would still
            // be mapped and unmapped per op: no mmap at all for the heap of
            // the thread that allocates tensors (DiT-DH-S sampling, 1
            // thread: system time 7.9 -> 2.7 s, 4% faster, peak RSS +8%).
            // Nor trimming: a step that frees more than any threshold at its
            // end (LPIPS at 256 px: gigabytes) would page-fault all of it
            // back in on the next one (a quarter of a decoder training
            // step zeroing pages). The process keeps its peak heap.
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, -1);
        }
    });
}

// ------------------------------------------------------------------ helpers

/// A raw pointer that parallel tasks may share: every task writes a disjoint
/// part of the buffer behind it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    #[inline(always)]
    fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }

    /// `len` floats from element `i`. Callers guarantee disjoint ranges.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    fn slice<'a>(self, i: usize, len: usize) -> &'a mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i), len) }
    }
}

/// A vector every element of which the caller overwrites before reading.
#[allow(clippy::uninit_vec)]
fn output_vec(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every element is written
    // (GEMM without read_dst, or an explicit loop) before anything reads it.
    unsafe { v.set_len(len) };
    v
}

fn slice_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused cpu op: non-contiguous input"),
    }
}

/// A `[B, T, K]` view whose last dim is contiguous (e.g. a narrow of a wider
/// adaLN output): its data from the view's start, the batch stride and the
/// token stride (0 when T == 1: one row per sample, broadcast over tokens).
#[derive(Clone, Copy)]
struct Rows3<'a> {
    data: &'a [f32],
    sb: usize,
    st: usize,
}

impl<'a> Rows3<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let data = s.as_slice::<f32>()?;
        let dims = l.dims();
        let st = l.stride();
        if dims.len() != 3 || (st[2] != 1 && dims[2] > 1) {
            bail!("fused cpu op: expected a [B, T, K] view with a contiguous last dim");
        }
        Ok(Self {
            data: &data[l.start_offset()..],
            sb: st[0],
            st: if dims[1] == 1 { 0 } else { st[1] },
        })
    }

    /// Contiguous `[B, T, K]` data.
    fn contiguous(data: &'a [f32], t: usize, k: usize) -> Self {
        Self {
            data,
            sb: t * k,
            st: if t == 1 { 0 } else { k },
        }
    }

    /// The row for batch `b`, token `n` (the same row for every n when T == 1).
    #[inline(always)]
    fn row(&self, b: usize, n: usize, k: usize) -> &'a [f32] {
        let o = b * self.sb + n * self.st;
        &self.data[o..o + k]
    }
}

/// Run `f` on the contiguous f32 CPU data of `t`.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.detach().contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice_of(c, l)?),
        _ => bail!("fused cpu op: not a CPU tensor"),
    }
}

fn cpu_tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A kernel compiled twice: as written, and with AVX2 + FMA enabled (the
/// body and the `#[inline(always)]` helpers it calls are inlined into the
/// AVX2 copy), picked at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($a: $t),*) {
                    body($($a),*)
                }
                if has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    return unsafe { fast($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// exp(x) for f32, Cephes-style: x = n ln2 + r, a degree-6 polynomial in r,
/// 2^n from the exponent bits. Relative error ~2e-7 (1-2 ulp); branch-free
/// so the loops around it vectorise. Inputs are clamped to [-87.3, 88].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let p = p * r2 + r + 1.0;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Lanes of the reductions below: independent accumulators, so that the
/// loops vectorise (a single f32 accumulator pins the summation order).
const LANES: usize = 16;

#[inline(always)]
fn lanes_sum(acc: [f32; LANES]) -> f32 {
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s
}

/// sum_i f(a_i, b_i) with LANES accumulators.
#[inline(always)]
fn reduce2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    let mut s = lanes_sum(acc);
    for (x, y) in ar.iter().zip(br) {
        s += f(*x, *y);
    }
    s
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce2(a, b, |x, y| x * y)
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    reduce2(a, a, |x, _| x)
}

#[inline(always)]
fn max_of(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = a.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for i in 0..LANES {
            acc[i] = acc[i].max(x[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(r) {
        m = m.max(*v);
    }
    m
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// A GEMM operand: its first element and its row and column strides (in
/// elements), so a transpose is a swap of strides.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

impl Operand {
    #[inline(always)]
    fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }
}

/// A GEMM destination (unit column stride): its first element, its row
/// stride, and whether the product is added to what it holds.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rs: usize,
    accumulate: bool,
}

impl Dst {
    #[inline(always)]
    fn new(ptr: *mut f32, rs: usize, accumulate: bool) -> Self {
        Self {
            ptr,
            rs,
            accumulate,
        }
    }
}

/// dst[m, n] = (accumulate ? dst : 0) + beta * lhs[m, k] rhs[k, n].
#[inline]
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: Dst,
    lhs: Operand,
    rhs: Operand,
    beta: f32,
    par: Parallelism,
) {
    #[cfg(feature = "mkl")]
    if unsafe { mkl::sgemm((m, n, k), dst, lhs, rhs, beta, par) } {
        return;
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs as isize,
            dst.accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            if dst.accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// oneMKL's sgemm for the fused kernels' products (`--features mkl`).
#[cfg(feature = "mkl")]
mod mkl {
    use super::{Dst, Operand, Parallelism};

    unsafe extern "C" {
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn MKL_Set_Num_Threads_Local(n: i32) -> i32;
    }

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    /// A row-major operand of `cols` columns as (transpose flag, leading
    /// dimension); `None` when neither stride is 1.
    fn layout(op: Operand, rows: usize, cols: usize) -> Option<(i32, i32)> {
        let ld = |v: usize, min: usize| i32::try_from(v.max(min).max(1)).ok();
        if op.cs == 1 && (op.rs >= cols || rows == 1) {
            Some((NO_TRANS, ld(op.rs, cols)?))
        } else if op.rs == 1 && (op.cs >= rows || cols == 1) {
            Some((TRANS, ld(op.cs, rows)?))
        } else {
            None
        }
    }

    /// [`super::sgemm`] through cblas; false (nothing done) for a layout
    /// cblas cannot take. Inside a parallel task (`Parallelism::None`) MKL
    /// runs on the calling thread only, so the tasks do not oversubscribe.
    pub(super) unsafe fn sgemm(
        (m, n, k): (usize, usize, usize),
        dst: Dst,
        lhs: Operand,
        rhs: Operand,
        beta: f32,
        par: Parallelism,
    ) -> bool {
        let (Some((ta, lda)), Some((tb, ldb))) = (layout(lhs, m, k), layout(rhs, k, n)) else {
            return false;
        };
        if dst.rs < n && m > 1 {
            return false;
        }
        let (Ok(mi), Ok(ni), Ok(ki), Ok(ldc)) = (
            i32::try_from(m),
            i32::try_from(n),
            i32::try_from(k),
            i32::try_from(dst.rs.max(n).max(1)),
        ) else {
            return false;
        };
        let c_beta = if dst.accumulate { 1.0 } else { 0.0 };
        unsafe {
            let prev = matches!(par, Parallelism::None).then(|| MKL_Set_Num_Threads_Local(1));
            cblas_sgemm(
                ROW_MAJOR, ta, tb, mi, ni, ki, beta, lhs.ptr, lda, rhs.ptr, ldb, c_beta, dst.ptr,
                ldc,
            );
            if let Some(p) = prev {
                MKL_Set_Num_Threads_Local(p);
            }
        }
        true
    }
}

/// `dst[m, n]` (row stride `dst_rs`, starting at `dst[0]`) = `lhs[m, k]`
/// (row-major, contiguous) x `rhs[k, n]` (row stride `rhs_rs`), on the
/// calling thread: a building block for kernels that parallelise over their
/// own blocks (other modules' CPU convolutions).
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    (rhs, rhs_rs): (&[f32], usize),
    (m, n, k): (usize, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lhs.len() >= m * k
            && (k == 0 || rhs.len() >= (k - 1) * rhs_rs + n)
            && dst.len() >= (m - 1) * dst_rs + n,
        "matmul_into: operands too short for {m}x{n}x{k}"
    );
    // SAFETY: the bounds above cover every element the GEMM touches.
    unsafe {
        sgemm(
            (m, n, k),
            Dst::new(dst.as_mut_ptr(), dst_rs, false),
            Operand::new(lhs.as_ptr(), k, 1),
            Operand::new(rhs.as_ptr(), rhs_rs, 1),
            1.0,
            Parallelism::None,
        )
    }
}

/// Threads of candle's CPU worker pool: its workers and the calling thread.
fn pool_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// `f(i)` for `i` in `0..n` on candle's CPU worker pool: the threads its own
/// element-wise ops use, which spin between ops and pick work up in well
/// under a microsecond. (With rayon for these kernels the two pools' idle
/// threads spun against each other: a 2-thread step burnt ~50% more CPU
/// than a 1-thread one.) Nested calls run inline.
pub(crate) fn par_for(n: usize, f: impl Fn(usize) + Sync) {
    match n {
        0 => {}
        1 => f(0),
        _ => candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f)),
    }
}

/// `f(chunk index, chunk)` over consecutive `chunk_len`-float chunks of `out`
/// (the last one may be shorter), in parallel.
pub(crate) fn par_chunks(out: &mut [f32], chunk_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let len = out.len();
    let p = SendPtr(out.as_mut_ptr());
    par_for(len.div_ceil(chunk_len.max(1)), |i| {
        let s = i * chunk_len;
        f(i, p.slice(s, chunk_len.min(len - s)))
    });
}

/// The sum over tasks `0..n` of the `len`-float vectors `f` adds into
/// (zeroed per task), in parallel; summed in task order (deterministic).
fn par_sum(n: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut parts = vec![0f32; n * len];
    par_chunks(&mut parts, len, f);
    let mut total = vec![0f32; len];
    for part in parts.chunks_exact(len.max(1)) {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

/// Split `len` into about `parts` blocks of a multiple of `align`:
/// (block length, block count).
fn blocks(len: usize, parts: usize, align: usize) -> (usize, usize) {
    let per = len.div_ceil(parts.max(1)).div_ceil(align) * align;
    let per = per.max(align).min(len.max(1));
    (per, len.div_ceil(per))
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_P: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn scratch_in<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// A per-thread scratch buffer of at least `len` floats (contents undefined).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SCRATCH, len, f)
}

/// A second per-thread scratch (the probabilities when they are not kept).
fn with_scratch_p<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SCRATCH_P, len, f)
}

// ---------------------------------------------------------------- attention

/// Rotary tables `[N, dh]` (`x * cos + rotate_pairs(x) * sin`, rotate_pairs:
/// (x0, x1) -> (-x1, x0)), as [`super::embed::Rope2d`] applies them.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// cos of each position's angles, `[N, dh]` row-major.
    pub cos: std::sync::Arc<Vec<f32>>,
    /// sin of each position's angles, `[N, dh]` row-major.
    pub sin: std::sync::Arc<Vec<f32>>,
}

/// Copy q or k of one head out of qkv (`row_stride` apart) into `dst`
/// `[n, dh]`, rotated.
#[inline(always)]
fn gather_rope(
    src: &[f32],
    row_stride: usize,
    n: usize,
    dh: usize,
    rope: Option<&RopeTables>,
    dst: &mut [f32],
) {
    for i in 0..n {
        let s = &src[i * row_stride..i * row_stride + dh];
        let d = &mut dst[i * dh..(i + 1) * dh];
        match rope {
            None => d.copy_from_slice(s),
            Some(r) => {
                let c = &r.cos[i * dh..(i + 1) * dh];
                let sn = &r.sin[i * dh..(i + 1) * dh];
                for p in 0..dh / 2 {
                    let (x0, x1) = (s[2 * p], s[2 * p + 1]);
                    d[2 * p] = x0 * c[2 * p] + (-x1) * sn[2 * p];
                    d[2 * p + 1] = x1 * c[2 * p + 1] + x0 * sn[2 * p + 1];
                }
            }
        }
    }
}

/// The transpose of the rotation: the gradient w.r.t. the unrotated input,
/// written `row_stride` apart.
#[inline(always)]
fn scatter_unrope(
    src: &[f32],
    n: usize,
    dh: usize,
    rope: Option<&RopeTables>,
    dst: SendPtr,
    row_stride: usize,
) {
    for i in 0..n {
        let s = &src[i * dh..(i + 1) * dh];
        let d = dst.slice(i * row_stride, dh);
        match rope {
            None => d.copy_from_slice(s),
            Some(r) => {
                let c = &r.cos[i * dh..(i + 1) * dh];
                let sn = &r.sin[i * dh..(i + 1) * dh];
                for p in 0..dh / 2 {
                    let (g0, g1) = (s[2 * p], s[2 * p + 1]);
                    d[2 * p] = g0 * c[2 * p] + g1 * sn[2 * p + 1];
                    d[2 * p + 1] = g1 * c[2 * p + 1] - g0 * sn[2 * p];
                }
            }
        }
    }
}

/// Shapes of one attention call: tokens, model width, head dim.
#[derive(Clone, Copy)]
struct AttnDims {
    n: usize,
    c: usize,
    dh: usize,
}

/// One attention head: sample `bi`, head `h`, the sizes and the rope tables.
#[derive(Clone, Copy)]
struct Head<'a> {
    bi: usize,
    h: usize,
    dims: AttnDims,
    rope: Option<&'a RopeTables>,
}

/// What the backward of a head reads from its forward: the probabilities
/// `p` `[n, n]` and the rotated q and k `[n, dh]`.
#[derive(Clone, Copy)]
struct HeadFwd<'a> {
    p: &'a [f32],
    qb: &'a [f32],
    kb: &'a [f32],
}

/// Scratch of a head's backward: dS `[n, n]`, dq and dk `[n, dh]`, D `[n]`.
struct HeadScratch<'a> {
    ds: &'a mut [f32],
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dd: &'a mut [f32],
}

multiversion! {
    /// Probabilities of head (bi, h) into `p` `[n, n]`; q and k rotated into
    /// `qb`, `kb` `[n, dh]`.
    fn attn_probs(qkv: &[f32], head: Head<'_>, p: &mut [f32], qb: &mut [f32], kb: &mut [f32]) {
        let Head { bi, h, dims, rope } = head;
        let AttnDims { n, c, dh } = dims;
        let base = bi * n * 3 * c;
        gather_rope(&qkv[base + h * dh..], 3 * c, n, dh, rope, qb);
        gather_rope(&qkv[base + c + h * dh..], 3 * c, n, dh, rope, kb);
        let scale = 1.0 / (dh as f32).sqrt();
        // S = scale * q k^T
        unsafe {
            sgemm((n, n, dh), Dst::new(p.as_mut_ptr(), n, false), Operand::new(qb.as_ptr(), dh, 1), Operand::new(kb.as_ptr(), 1, dh), scale, Parallelism::None)
        };
        for row in p.chunks_exact_mut(n) {
            let max = max_of(row);
            for v in row.iter_mut() {
                *v = exp_f32(*v - max);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Gradients of head (bi, h) into `dqkv` given its probabilities `p`,
    /// the rotated q and k in `qb`, `kb`; `ds`, `dq`, `dk`, `dd` are scratch.
    fn attn_bwd_head(
        qkv: &[f32],
        o: &[f32],
        g: &[f32],
        head: Head<'_>,
        fwd: HeadFwd<'_>,
        scratch: HeadScratch<'_>,
        dqkv: SendPtr,
    ) {
        let Head { bi, h, dims, rope } = head;
        let HeadFwd { p, qb, kb } = fwd;
        let HeadScratch { ds, dq, dk, dd } = scratch;
        let AttnDims { n, c, dh } = dims;
        let scale = 1.0 / (dh as f32).sqrt();
        let ob = bi * n * c + h * dh; // head (b, h) in o / grad [B, N, C]
        let qkv_b = bi * n * 3 * c;
        let v = &qkv[qkv_b + 2 * c + h * dh..];
        // D_i = sum_d dO * O
        for i in 0..n {
            let r = ob + i * c;
            dd[i] = dot(&g[r..r + dh], &o[r..r + dh]);
        }
        unsafe {
            // dV = P^T dO  -> v slot of dqkv
            sgemm((n, dh, n), Dst::new(dqkv.at(qkv_b + 2 * c + h * dh), 3 * c, false), Operand::new(p.as_ptr(), 1, n), Operand::new(g[ob..].as_ptr(), c, 1), 1.0, Parallelism::None);
            // dP = dO V^T
            sgemm((n, n, dh), Dst::new(ds.as_mut_ptr(), n, false), Operand::new(g[ob..].as_ptr(), c, 1), Operand::new(v.as_ptr(), 1, 3 * c), 1.0, Parallelism::None);
        }
        // dS = P * (dP - D)
        for i in 0..n {
            let di = dd[i];
            let (pr, sr) = (&p[i * n..(i + 1) * n], &mut ds[i * n..(i + 1) * n]);
            for (s, &pv) in sr.iter_mut().zip(pr) {
                *s = pv * (*s - di);
            }
        }
        unsafe {
            // d(rotated q) = scale * dS k ; d(rotated k) = scale * dS^T q
            sgemm((n, dh, n), Dst::new(dq.as_mut_ptr(), dh, false), Operand::new(ds.as_ptr(), n, 1), Operand::new(kb.as_ptr(), dh, 1), scale, Parallelism::None);
            sgemm((n, dh, n), Dst::new(dk.as_mut_ptr(), dh, false), Operand::new(ds.as_ptr(), 1, n), Operand::new(qb.as_ptr(), dh, 1), scale, Parallelism::None);
        }
        scatter_unrope(dq, n, dh, rope, SendPtr(dqkv.at(qkv_b + h * dh)), 3 * c);
        scatter_unrope(dk, n, dh, rope, SendPtr(dqkv.at(qkv_b + c + h * dh)), 3 * c);
    }
}

struct Attention {
    heads: usize,
    rope: Option<RopeTables>,
    /// Keep the probabilities `[B, H, N, N]` for the backward pass.
    save: bool,
    probs: Mutex<Option<Vec<f32>>>,
}

impl Attention {
    fn dims(&self, dims: &[usize]) -> Result<(usize, AttnDims)> {
        let &[b, n, c3] = dims else {
            bail!("attention_qkv: expected [B, N, 3C], got {dims:?}");
        };
        let c = c3 / 3;
        if c3 % 3 != 0 || c % self.heads != 0 {
            bail!("attention_qkv: last dim {c3} is not 3 x heads x dh");
        }
        let dh = c / self.heads;
        if let Some(r) = &self.rope {
            if r.cos.len() != n * dh || r.sin.len() != n * dh {
                bail!(
                    "attention_qkv: rope table of {} for {n} tokens x {dh}",
                    r.cos.len()
                );
            }
        }
        Ok((b, AttnDims { n, c, dh }))
    }
}

/// Heads whose probabilities a backward pass had to recompute (tests).
#[cfg(test)]
static RECOMPUTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice_of(s, l)?;
        let (b, dims) = self.dims(l.dims())?;
        let AttnDims { n, c, dh } = dims;
        let hs = self.heads;
        let rope = self.rope.as_ref();
        let mut out = output_vec(b * n * c);
        let outp = SendPtr(out.as_mut_ptr());
        let task = |bh: usize, p: &mut [f32]| {
            let (bi, h) = (bh / hs, bh % hs);
            with_scratch(2 * n * dh, |qk| {
                let (qb, kb) = qk.split_at_mut(n * dh);
                attn_probs(qkv, Head { bi, h, dims, rope }, p, qb, kb);
            });
            // O = P V, written into the merged-heads output
            let v = &qkv[bi * n * 3 * c + 2 * c + h * dh..];
            unsafe {
                sgemm(
                    (n, dh, n),
                    Dst::new(outp.at(bi * n * c + h * dh), c, false),
                    Operand::new(p.as_ptr(), n, 1),
                    Operand::new(v.as_ptr(), 3 * c, 1),
                    1.0,
                    Parallelism::None,
                )
            };
        };
        if self.save {
            let mut probs = output_vec(b * hs * n * n);
            par_chunks(&mut probs, n * n, task);
            *self.probs.lock().unwrap() = Some(probs);
        } else {
            par_for(b * hs, |bh| with_scratch_p(n * n, |p| task(bh, p)));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, dims) = self.dims(arg.dims())?;
        let AttnDims { n, c, dh } = dims;
        let hs = self.heads;
        let rope = self.rope.as_ref();
        let saved = self.probs.lock().unwrap();
        let mut dqkv = output_vec(b * n * 3 * c);
        let dp = SendPtr(dqkv.as_mut_ptr());
        with_data(arg, |qkv| {
            with_data(res, |o| {
                with_data(grad, |g| {
                    par_for(b * hs, |bh| {
                        let (bi, h) = (bh / hs, bh % hs);
                        // scratch: [P (if not saved) | dS | qb | kb | dq | dk | D]
                        let own_p = if saved.is_some() { 0 } else { n * n };
                        with_scratch(own_p + n * n + 4 * n * dh + n, |buf| {
                            let (pbuf, rest) = buf.split_at_mut(own_p);
                            let (ds, rest) = rest.split_at_mut(n * n);
                            let (qb, rest) = rest.split_at_mut(n * dh);
                            let (kb, rest) = rest.split_at_mut(n * dh);
                            let (dq, rest) = rest.split_at_mut(n * dh);
                            let (dk, dd) = rest.split_at_mut(n * dh);
                            let p: &[f32] = match saved.as_ref() {
                                Some(all) => {
                                    let base = bi * n * 3 * c;
                                    gather_rope(&qkv[base + h * dh..], 3 * c, n, dh, rope, qb);
                                    gather_rope(&qkv[base + c + h * dh..], 3 * c, n, dh, rope, kb);
                                    &all[bh * n * n..(bh + 1) * n * n]
                                }
                                None => {
                                    #[cfg(test)]
                                    RECOMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    attn_probs(qkv, Head { bi, h, dims, rope }, pbuf, qb, kb);
                                    pbuf
                                }
                            };
                            attn_bwd_head(
                                qkv,
                                o,
                                g,
                                Head { bi, h, dims, rope },
                                HeadFwd { p, qb, kb },
                                HeadScratch { ds, dq, dk, dd },
                                dp,
                            );
                        });
                    });
                    Ok(())
                })
            })
        })?;
        cpu_tensor(dqkv, (b, n, 3 * c)).map(Some)
    }
}

/// Multi-head self-attention from the fused qkv projection: `qkv`
/// `[B, N, 3C]` laid out (3, heads, dh) per token as the reference's
/// `qkv.reshape(B, N, 3, H, dh)`; 2D rope on q and k when given; returns
/// the merged heads `[B, N, C]`. f32 CPU only (see [`applies`]).
pub fn attention_qkv(qkv: &Tensor, heads: usize, rope: Option<&RopeTables>) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let save = qkv.track_op();
    qkv.apply_op1(Attention {
        heads,
        rope: rope.cloned(),
        save,
        probs: Mutex::new(None),
    })
}

// ------------------------------------------------------- norm + modulation

/// The normalisation inside [`norm_modulate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// x * rsqrt(mean(x^2) + eps) * weight
    Rms,
    /// (x - mean) * rsqrt(var + eps), no affine (the weight input is ignored)
    Layer,
}

/// Normalise one row into `nrm` (no weight); returns the reciprocal std.
#[inline(always)]
fn normalize_row(kind: NormKind, eps: f32, x: &[f32], nrm: &mut [f32]) -> f32 {
    let d = x.len() as f32;
    match kind {
        NormKind::Rms => {
            let r = 1.0 / (dot(x, x) / d + eps).sqrt();
            for (o, v) in nrm.iter_mut().zip(x) {
                *o = v * r;
            }
            r
        }
        NormKind::Layer => {
            let mean = sum(x) / d;
            let var = reduce2(x, x, |v, _| (v - mean) * (v - mean)) / d;
            let r = 1.0 / (var + eps).sqrt();
            for (o, v) in nrm.iter_mut().zip(x) {
                *o = (v - mean) * r;
            }
            r
        }
    }
}

/// Settings of one norm + modulation call.
#[derive(Clone, Copy)]
struct NormSpec {
    kind: NormKind,
    eps: f32,
    shift: bool,
    /// tokens per sample
    n: usize,
    d: usize,
}

/// Rows `r0..r1` of a `[B * N, D]` backward task; `per_token`: the
/// modulation (or gate) has a row per token, else one per sample.
#[derive(Clone, Copy)]
struct RowBlock {
    r0: usize,
    r1: usize,
    per_token: bool,
}

/// The inputs of the norm + modulation backward: x, weight, modulation and
/// the output's gradient.
#[derive(Clone, Copy)]
struct NormModInputs<'a> {
    x: &'a [f32],
    w: &'a [f32],
    m: Rows3<'a>,
    g: &'a [f32],
}

/// Where the norm + modulation backward writes: dx and dm rows (disjoint per
/// task) and this task's share of dw.
struct NormModGrads<'a> {
    dx: SendPtr,
    dm: SendPtr,
    dw: &'a mut [f32],
}

multiversion! {
    /// Rows `r0..` of the forward into `out` (whole rows).
    fn norm_mod_fwd_rows(spec: NormSpec, r0: usize, x: &[f32], w: &[f32], m: Rows3, out: &mut [f32]) {
        let NormSpec { kind, eps, shift, n, d } = spec;
        let k = if shift { 2 * d } else { d };
        for (j, orow) in out.chunks_exact_mut(d).enumerate() {
            let r = r0 + j;
            normalize_row(kind, eps, &x[r * d..(r + 1) * d], orow);
            let mr = m.row(r / n, r % n, k);
            let (sh, sc) = if shift { mr.split_at(d) } else { (&mr[..0], mr) };
            if kind == NormKind::Rms {
                for i in 0..d {
                    orow[i] *= w[i];
                }
            }
            if shift {
                for i in 0..d {
                    orow[i] = orow[i] * (1.0 + sc[i]) + sh[i];
                }
            } else {
                for i in 0..d {
                    orow[i] *= 1.0 + sc[i];
                }
            }
        }
    }
}

multiversion! {
    /// Rows `r0..r1` of the backward: dx rows (written), dm rows (added to:
    /// per token, or per sample when the modulation is broadcast), dw
    /// (added to).
    fn norm_mod_bwd_rows(
        spec: NormSpec,
        rows: RowBlock,
        inp: NormModInputs<'_>,
        out: NormModGrads<'_>,
        nrm: &mut [f32],
        dn: &mut [f32],
    ) {
        let NormSpec { kind, eps, shift, n, d } = spec;
        let RowBlock { r0, r1, per_token } = rows;
        let NormModInputs { x, w, m, g } = inp;
        let NormModGrads { dx, dm, dw } = out;
        let k = if shift { 2 * d } else { d };
        let rms = kind == NormKind::Rms;
        for r in r0..r1 {
            let xr = &x[r * d..(r + 1) * d];
            let gr = &g[r * d..(r + 1) * d];
            let rinv = normalize_row(kind, eps, xr, nrm);
            let mrow = if per_token { r } else { r / n };
            let sc = &m.row(r / n, r % n, k)[k - d..];
            let dmr = dm.slice(mrow * k, k);
            let (dsh, dsc) = dmr.split_at_mut(k - d);
            if shift {
                for i in 0..d {
                    dsh[i] += gr[i];
                }
            }
            for i in 0..d {
                let wi = if rms { w[i] } else { 1.0 };
                dsc[i] += gr[i] * nrm[i] * wi;
                let da = gr[i] * (1.0 + sc[i]);
                dw[i] += da * nrm[i];
                dn[i] = da * wi;
            }
            let df = d as f32;
            let dotv = dot(dn, nrm) / df;
            let mean_dn = if rms { 0.0 } else { sum(dn) / df };
            let dxr = dx.slice(r * d, d);
            for i in 0..d {
                dxr[i] = rinv * (dn[i] - mean_dn - nrm[i] * dotv);
            }
        }
    }
}

struct NormModulate {
    kind: NormKind,
    eps: f32,
    shift: bool,
}

impl NormModulate {
    fn spec(&self, x: &[usize], w: &[usize], m: &[usize]) -> Result<(usize, usize, NormSpec)> {
        let (&[b, n, d], &[bm, t, k]) = (x, m) else {
            bail!("norm_modulate: x {x:?}, modulation {m:?}");
        };
        let want_k = if self.shift { 2 * d } else { d };
        if bm != b || !(t == 1 || t == n) || k != want_k || w.iter().product::<usize>() != d {
            bail!("norm_modulate: x {x:?}, weight {w:?}, modulation {m:?}");
        }
        let spec = NormSpec {
            kind: self.kind,
            eps: self.eps,
            shift: self.shift,
            n,
            d,
        };
        Ok((b, t, spec))
    }
}

impl CustomOp3 for NormModulate {
    fn name(&self) -> &'static str {
        "fused-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, _, spec) = self.spec(lx.dims(), lw.dims(), lm.dims())?;
        let (n, d) = (spec.n, spec.d);
        let x = slice_of(sx, lx)?;
        let w = slice_of(sw, lw)?;
        let m = Rows3::new(sm, lm)?;
        let mut out = output_vec(b * n * d);
        let rows_per = 64;
        par_chunks(&mut out, rows_per * d, |ci, oc| {
            norm_mod_fwd_rows(spec, ci * rows_per, x, w, m, oc)
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, spec) = self.spec(x.dims(), w.dims(), m.dims())?;
        let (n, d) = (spec.n, spec.d);
        let k = m.dim(2)?;
        let rms = self.kind == NormKind::Rms;
        let mut dx = output_vec(b * n * d);
        let mut dm = vec![0f32; b * t * k];
        let (dxp, dmp) = (SendPtr(dx.as_mut_ptr()), SendPtr(dm.as_mut_ptr()));
        let per_token = t != 1;
        // One task per sample when the modulation is per sample (its dm row
        // sums over the sample's tokens), else blocks of rows.
        let rows_per = if per_token { 64 } else { n };
        let tasks = (b * n).div_ceil(rows_per);
        let dw = with_data(x, |x| {
            with_data(w, |w| {
                with_data(m, |mm| {
                    with_data(grad, |g| {
                        let m = Rows3::contiguous(mm, t, k);
                        Ok(par_sum(tasks, d, |task, dw| {
                            let (mut nrm, mut dn) = (vec![0f32; d], vec![0f32; d]);
                            let r0 = task * rows_per;
                            let r1 = (r0 + rows_per).min(b * n);
                            let rows = RowBlock { r0, r1, per_token };
                            let inp = NormModInputs { x, w, m, g };
                            let out = NormModGrads {
                                dx: dxp,
                                dm: dmp,
                                dw,
                            };
                            norm_mod_bwd_rows(spec, rows, inp, out, &mut nrm, &mut dn);
                        }))
                    })
                })
            })
        })?;
        let dx = cpu_tensor(dx, (b, n, d))?;
        let dm = cpu_tensor(dm, (b, t, k))?;
        let dw = if rms {
            Some(cpu_tensor(dw, w.shape().clone())?)
        } else {
            None
        };
        Ok((Some(dx), dw, Some(dm)))
    }
}

/// `norm(x) * (1 + scale) + shift` with `mod_` = `[shift | scale]`
/// (`[B, T, 2D]`, T = 1 or N) or just `scale` (`[B, T, D]`, `shift` false).
/// `x`: `[B, N, D]`; `weight` `[D]` (RMSNorm's scale; any `[D]` tensor, e.g.
/// ones, for LayerNorm without affine, which gets no gradient).
pub fn norm_modulate(
    x: &Tensor,
    weight: &Tensor,
    mod_: &Tensor,
    kind: NormKind,
    eps: f64,
    shift: bool,
) -> Result<Tensor> {
    let m = if mod_.stride().last() == Some(&1) {
        mod_.clone()
    } else {
        mod_.contiguous()?
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &m,
        NormModulate {
            kind,
            eps: eps as f32,
            shift,
        },
    )
}

// --------------------------------------------------------- gated residual

multiversion! {
    fn gated_fwd_rows(r0: usize, n: usize, d: usize, x: &[f32], y: &[f32], gate: Rows3, out: &mut [f32]) {
        for (j, orow) in out.chunks_exact_mut(d).enumerate() {
            let r = r0 + j;
            let gr = gate.row(r / n, r % n, d);
            let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
            for i in 0..d {
                orow[i] = xr[i] + yr[i] * gr[i];
            }
        }
    }
}

multiversion! {
    /// dy = g * gate and dgate += g * y over `rows` (`[.., n, d]`).
    fn gated_bwd_rows(
        rows: RowBlock,
        nd: (usize, usize),
        y: &[f32],
        gate: &[f32],
        g: &[f32],
        out: (SendPtr, SendPtr),
    ) {
        let RowBlock { r0, r1, per_token } = rows;
        let ((n, d), (dy, dgate)) = (nd, out);
        for r in r0..r1 {
            let grow = if per_token { r } else { r / n };
            let gar = &gate[grow * d..(grow + 1) * d];
            let dgr = dgate.slice(grow * d, d);
            let dyr = dy.slice(r * d, d);
            let (gr, yr) = (&g[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
            for i in 0..d {
                dyr[i] = gr[i] * gar[i];
                dgr[i] += gr[i] * yr[i];
            }
        }
    }
}

struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "fused-gated-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = lx.shape().dims3()?;
        let (bg, t, dg) = lg.shape().dims3()?;
        if ly.dims() != lx.dims() || bg != b || dg != d || !(t == 1 || t == n) {
            bail!(
                "gated_residual: x {:?}, y {:?}, gate {:?}",
                lx.dims(),
                ly.dims(),
                lg.dims()
            );
        }
        let x = slice_of(sx, lx)?;
        let y = slice_of(sy, ly)?;
        let g = Rows3::new(sg, lg)?;
        let mut out = output_vec(b * n * d);
        let rows_per = 64;
        par_chunks(&mut out, rows_per * d, |ci, oc| {
            gated_fwd_rows(ci * rows_per, n, d, x, y, g, oc)
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = y.dims3()?;
        let t = gate.dim(1)?;
        let mut dy = output_vec(b * n * d);
        let mut dg = vec![0f32; b * t * d];
        let (dyp, dgp) = (SendPtr(dy.as_mut_ptr()), SendPtr(dg.as_mut_ptr()));
        let per_token = t != 1;
        let rows_per = if per_token { 64 } else { n };
        let tasks = (b * n).div_ceil(rows_per);
        with_data(y, |y| {
            with_data(gate, |ga| {
                with_data(grad, |g| {
                    par_for(tasks, |task| {
                        let r0 = task * rows_per;
                        let r1 = (r0 + rows_per).min(b * n);
                        let rows = RowBlock { r0, r1, per_token };
                        gated_bwd_rows(rows, (n, d), y, ga, g, (dyp, dgp));
                    });
                    Ok(())
                })
            })
        })?;
        Ok((
            Some(grad.clone()),
            Some(cpu_tensor(dy, (b, n, d))?),
            Some(cpu_tensor(dg, (b, t, d))?),
        ))
    }
}

/// `x + y * gate`; x, y `[B, N, D]`, gate `[B, T, D]` (T = 1 or N, last dim
/// contiguous: a narrow of the adaLN output is fine).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let g = if gate.stride().last() == Some(&1) {
        gate.clone()
    } else {
        gate.contiguous()?
    };
    x.contiguous()?
        .apply_op3(&y.contiguous()?, &g, GatedResidual)
}

// ------------------------------------------------------------------ SwiGLU

multiversion! {
    fn swiglu_fwd_rows(h: usize, x: &[f32], out: &mut [f32]) {
        for (xr, orow) in x.chunks_exact(2 * h).zip(out.chunks_exact_mut(h)) {
            let (x1, x2) = xr.split_at(h);
            for i in 0..h {
                orow[i] = x1[i] * sigmoid(x1[i]) * x2[i];
            }
        }
    }
}

multiversion! {
    fn swiglu_bwd_rows(h: usize, x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((xr, gr), drow) in x.chunks_exact(2 * h).zip(g.chunks_exact(h)).zip(dx.chunks_exact_mut(2 * h)) {
            let (x1, x2) = xr.split_at(h);
            let (d1, d2) = drow.split_at_mut(h);
            for i in 0..h {
                let s = sigmoid(x1[i]);
                d2[i] = gr[i] * x1[i] * s;
                d1[i] = gr[i] * x2[i] * (s * (1.0 + x1[i] * (1.0 - s)));
            }
        }
    }
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_of(s, l)?;
        let dims = l.dims();
        let h2 = *dims.last().unwrap_or(&0);
        if h2 % 2 != 0 || h2 == 0 {
            bail!("swiglu: odd last dim {h2}");
        }
        let h = h2 / 2;
        let rows = x.len() / h2;
        let mut out = output_vec(rows * h);
        let rows_per = 64;
        par_chunks(&mut out, rows_per * h, |ci, oc| {
            let r0 = ci * rows_per;
            swiglu_fwd_rows(h, &x[r0 * h2..(r0 * h2 + oc.len() * 2)], oc)
        });
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = h;
        Ok((CpuStorage::F32(out), Shape::from(od)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h2 = arg.dim(candle_core::D::Minus1)?;
        let h = h2 / 2;
        let mut dx = output_vec(arg.elem_count());
        let rows_per = 64;
        with_data(arg, |x| {
            with_data(grad, |g| {
                par_chunks(&mut dx, rows_per * h2, |ci, dc| {
                    let (r0, r1) = (ci * rows_per, ci * rows_per + dc.len() / h2);
                    swiglu_bwd_rows(h, &x[r0 * h2..r1 * h2], &g[r0 * h..r1 * h], dc)
                });
                Ok(())
            })
        })?;
        cpu_tensor(dx, arg.shape().clone()).map(Some)
    }
}

/// `silu(x1) * x2` where `[x1 | x2]` are the halves of the last dim.
pub fn swiglu(x12: &Tensor) -> Result<Tensor> {
    x12.contiguous()?.apply_op1(SwiGlu)
}

// -------------------------------------------------------------------- SiLU

multiversion! {
    fn silu_fwd_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * sigmoid(v);
        }
    }
}

multiversion! {
    fn silu_bwd_chunk(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &v), &gv) in dx.iter_mut().zip(x).zip(g) {
            let s = sigmoid(v);
            *d = gv * (s * (1.0 + v * (1.0 - s)));
        }
    }
}

struct Silu;

const SILU_CHUNK: usize = 16 * 1024;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_of(s, l)?;
        let mut out = output_vec(x.len());
        par_chunks(&mut out, SILU_CHUNK, |i, oc| {
            let o = i * SILU_CHUNK;
            silu_fwd_chunk(&x[o..o + oc.len()], oc)
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = output_vec(arg.elem_count());
        with_data(arg, |x| {
            with_data(grad, |g| {
                par_chunks(&mut dx, SILU_CHUNK, |i, dc| {
                    let o = i * SILU_CHUNK;
                    silu_bwd_chunk(&x[o..o + dc.len()], &g[o..o + dc.len()], dc)
                });
                Ok(())
            })
        })?;
        cpu_tensor(dx, arg.shape().clone()).map(Some)
    }
}

/// x * sigmoid(x) (f32 CPU only, see [`applies`]).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

/// SiLU from [`silu`] where it applies, else candle's.
pub fn silu_any(x: &Tensor) -> Result<Tensor> {
    if applies(&[x]) {
        silu(x)
    } else {
        candle_nn::ops::silu(x)
    }
}

// ------------------------------------------------------------------ Linear

multiversion! {
    fn add_rows_into(cols: usize, g: &[f32], acc: &mut [f32]) {
        for row in g.chunks_exact(cols) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// Sums over rows of a `[rows, cols]` matrix, threaded over row blocks.
fn column_sums(g: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let (per, nb) = blocks(rows, 2 * pool_threads(), 64);
    par_sum(nb, cols, |i, s| {
        let r0 = i * per;
        let r1 = (r0 + per).min(rows);
        add_rows_into(cols, &g[r0 * cols..r1 * cols], s)
    })
}

/// y[rows, out] = x[rows, in] w[out, in]^T (+ b), threaded GEMM.
fn linear_fwd(x: &[f32], w: &[f32], b: Option<&[f32]>, din: usize, dout: usize) -> Vec<f32> {
    let rows = x.len() / din.max(1);
    let mut y = output_vec(rows * dout);
    // row blocks, one GEMM each, on the worker pool
    let (per, nb) = blocks(rows, 2 * pool_threads(), 16);
    let yp = SendPtr(y.as_mut_ptr());
    par_for(nb, |i| {
        let r0 = i * per;
        let m = per.min(rows - r0);
        if let Some(b) = b {
            // the bias first, then the GEMM accumulates onto it
            for row in yp.slice(r0 * dout, m * dout).chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
        }
        unsafe {
            sgemm(
                (m, dout, din),
                Dst::new(yp.at(r0 * dout), dout, b.is_some()),
                Operand::new(x[r0 * din..].as_ptr(), din, 1),
                Operand::new(w.as_ptr(), 1, din),
                1.0,
                Parallelism::None,
            )
        }
    });
    y
}

/// dx = g w, dW = g^T x, db = column sums of g.
fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (dout, din) = w.dims2()?;
    let rows = x.elem_count() / din.max(1);
    let (dx, dw, db) = with_data(x, |xs| {
        with_data(w, |ws| {
            with_data(grad, |g| {
                let mut dx = output_vec(rows * din);
                let mut dw = output_vec(dout * din);
                let (dxp, dwp) = (SendPtr(dx.as_mut_ptr()), SendPtr(dw.as_mut_ptr()));
                // dx in row blocks, dW in blocks of its rows, all in one parallel loop
                let threads = pool_threads();
                let (xper, nx) = blocks(rows, 2 * threads, 16);
                let (wper, nw) = blocks(dout, 2 * threads, 16);
                par_for(nx + nw, |i| unsafe {
                    if i < nx {
                        let r0 = i * xper;
                        let m = xper.min(rows - r0);
                        // dx = g w
                        sgemm(
                            (m, din, dout),
                            Dst::new(dxp.at(r0 * din), din, false),
                            Operand::new(g[r0 * dout..].as_ptr(), dout, 1),
                            Operand::new(ws.as_ptr(), din, 1),
                            1.0,
                            Parallelism::None,
                        );
                    } else {
                        let o0 = (i - nx) * wper;
                        let m = wper.min(dout - o0);
                        // dW = g^T x
                        sgemm(
                            (m, din, rows),
                            Dst::new(dwp.at(o0 * din), din, false),
                            Operand::new(g[o0..].as_ptr(), 1, dout),
                            Operand::new(xs.as_ptr(), din, 1),
                            1.0,
                            Parallelism::None,
                        );
                    }
                });
                let db = bias.then(|| column_sums(g, rows, dout));
                Ok((dx, dw, db))
            })
        })
    })?;
    let dx = cpu_tensor(dx, x.shape().clone())?;
    let dw = cpu_tensor(dw, (dout, din))?;
    let db = match db {
        Some(v) => Some(cpu_tensor(v, dout)?),
        None => None,
    };
    Ok((dx, dw, db))
}

fn linear_shape(lx: &Layout, lw: &Layout) -> Result<(usize, usize, Vec<usize>)> {
    let (dout, din) = lw.shape().dims2()?;
    let dims = lx.dims();
    if dims.last() != Some(&din) {
        bail!("linear: x {:?} vs weight {:?}", dims, lw.dims());
    }
    let mut od = dims.to_vec();
    *od.last_mut().unwrap() = dout;
    Ok((din, dout, od))
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (din, dout, od) = linear_shape(lx, lw)?;
        let b = slice_of(sb, lb)?;
        if b.len() != dout {
            bail!("linear: bias {:?} for {dout} outputs", lb.dims());
        }
        let y = linear_fwd(slice_of(sx, lx)?, slice_of(sw, lw)?, Some(b), din, dout);
        Ok((CpuStorage::F32(y), Shape::from(od)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_bwd(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "fused-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (din, dout, od) = linear_shape(lx, lw)?;
        let y = linear_fwd(slice_of(sx, lx)?, slice_of(sw, lw)?, None, din, dout);
        Ok((CpuStorage::F32(y), Shape::from(od)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x W^T + b` over the last dim of `x` (any leading dims). `bias` None: no
/// bias. f32 CPU only (see [`applies`]).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, LinearNoBias),
    }
}

pub mod infer;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::embed::Rope2d;
    use crate::models::layers::{
        attention, layer_norm_diff, merge_heads, modulate, rms_norm_diff, split_heads,
    };
    use candle_core::{D, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // deterministic values without touching candle's global RNG
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let mut acc = 0f32;
                for _ in 0..3 {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                }
                acc * 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn scale_of(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0)
    }

    /// Values and gradients (w.r.t. `inputs`, of sum(out * r)) of `fused`
    /// and `slow` agree to `tol` relative to their size.
    fn check(
        what: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        slow: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let a = fused(&ts).unwrap();
        let b = slow(&ts).unwrap();
        let d = max_diff(&a, &b);
        assert!(d <= tol * scale_of(&b), "{what}: values differ by {d}");
        let r = randn(a.dims(), 99);
        let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
            match (x, y) {
                (Some(x), Some(y)) => {
                    let d = max_diff(x, y);
                    assert!(
                        d <= tol * scale_of(y),
                        "{what}: gradient of input {i} differs by {d} (scale {})",
                        scale_of(y)
                    );
                }
                (None, None) => {}
                (x, y) => panic!(
                    "{what}: input {i}: gradient {:?} vs {:?}",
                    x.is_some(),
                    y.is_some()
                ),
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (87.0 + 80.0) / 200_000.0;
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), exp_f32(-87.3));
    }

    #[test]
    fn attention_matches_composition() {
        for (rope, heads, grid, b) in [(true, 4, 4, 2), (false, 3, 3, 1), (true, 2, 5, 3)] {
            let dh = 8;
            let c = heads * dh;
            let n = grid * grid;
            let r = Rope2d::new(dh, grid, &Device::Cpu, DType::F32).unwrap();
            let qkv = randn(&[b, n, 3 * c], 1);
            let r2 = r.clone();
            check(
                &format!("attention rope={rope} heads={heads}"),
                &[qkv],
                |t| attention_qkv(&t[0], heads, if rope { r.host_tables() } else { None }),
                |t| {
                    let qkv = t[0]
                        .reshape((b, n, 3, heads, dh))?
                        .permute((2, 0, 3, 1, 4))?;
                    let (mut q, mut k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
                    if rope {
                        q = r2.apply(&q, false)?;
                        k = r2.apply(&k, false)?;
                    }
                    merge_heads(&attention(&q, &k, &v, false)?)
                },
                1e-5,
            );
        }
        // split_heads stays the inverse of merge_heads
        let x = randn(&[2, 5, 12], 3);
        assert_eq!(
            max_diff(&merge_heads(&split_heads(&x, 3).unwrap()).unwrap(), &x),
            0.0
        );
    }

    #[test]
    fn attention_without_saved_probabilities() {
        // A non-tracked input keeps no probabilities; the backward of a
        // tracked one recomputes nothing. Check the forward agrees either way.
        let (b, n, c, heads) = (2, 9, 16, 2);
        let qkv = randn(&[b, n, 3 * c], 5);
        let a = attention_qkv(&qkv, heads, None).unwrap();
        let v = Var::from_tensor(&qkv).unwrap();
        let bt = attention_qkv(v.as_tensor(), heads, None).unwrap();
        assert_eq!(max_diff(&a, &bt), 0.0);
        let before = RECOMPUTED.load(std::sync::atomic::Ordering::Relaxed);
        let lin = crate::models::layers::Linear::new(
            3 * c,
            3 * c,
            true,
            crate::models::layers::LinearInit::Xavier,
            candle_nn::VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &Device::Cpu),
        )
        .unwrap();
        let _ = lin;
        bt.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            RECOMPUTED.load(std::sync::atomic::Ordering::Relaxed),
            before
        );
    }

    #[test]
    fn norm_modulate_matches_composition() {
        let (b, n, d) = (3, 7, 24);
        for kind in [NormKind::Rms, NormKind::Layer] {
            for t in [1, n] {
                for shift in [true, false] {
                    let x = randn(&[b, n, d], 1);
                    let w = ((randn(&[d], 2) * 0.3).unwrap() + 1.0).unwrap();
                    let k = if shift { 2 * d } else { d };
                    let m = (randn(&[b, t, k], 3) * 0.5).unwrap();
                    let what = format!("norm_modulate {kind:?} t={t} shift={shift}");
                    let ins = [x, w, m];
                    check(
                        &what,
                        &ins,
                        |t| norm_modulate(&t[0], &t[1], &t[2], kind, 1e-6, shift),
                        |t| {
                            let y = match kind {
                                NormKind::Rms => rms_norm_diff(&t[0], &t[1], 1e-6)?,
                                // the weight takes no part in a LayerNorm without affine
                                NormKind::Layer => layer_norm_diff(&t[0], 1e-6)?,
                            };
                            if shift {
                                let sh = t[2].narrow(D::Minus1, 0, d)?;
                                let sc = t[2].narrow(D::Minus1, d, d)?;
                                modulate(&y, Some(&sh), &sc)
                            } else {
                                modulate(&y, None, &t[2])
                            }
                        },
                        1e-5,
                    );
                }
            }
        }
        // a strided modulation (a narrow of a wider adaLN output) reads right
        let x = randn(&[b, n, d], 4);
        let w = randn(&[d], 5);
        let wide = randn(&[b, 1, 5 * d], 6);
        let m = wide.narrow(D::Minus1, d, 2 * d).unwrap();
        let a = norm_modulate(&x, &w, &m, NormKind::Rms, 1e-6, true).unwrap();
        let c = norm_modulate(&x, &w, &m.contiguous().unwrap(), NormKind::Rms, 1e-6, true).unwrap();
        assert_eq!(max_diff(&a, &c), 0.0);
    }

    #[test]
    fn gated_residual_matches_composition() {
        let (b, n, d) = (3, 70, 20);
        for t in [1, n] {
            let ins = [
                randn(&[b, n, d], 1),
                randn(&[b, n, d], 2),
                randn(&[b, t, d], 3),
            ];
            check(
                &format!("gated_residual t={t}"),
                &ins,
                |t| gated_residual(&t[0], &t[1], &t[2]),
                |t| &t[0] + t[1].broadcast_mul(&t[2])?,
                1e-5,
            );
        }
    }

    #[test]
    fn swiglu_matches_composition() {
        let x = (randn(&[2, 37, 2 * 13], 1) * 3.0).unwrap();
        check(
            "swiglu",
            &[x],
            |t| swiglu(&t[0]),
            |t| {
                let (x1, x2) = (
                    t[0].narrow(D::Minus1, 0, 13)?,
                    t[0].narrow(D::Minus1, 13, 13)?,
                );
                candle_nn::ops::silu(&x1)? * x2
            },
            1e-5,
        );
    }

    #[test]
    fn silu_matches_composition() {
        let x = (randn(&[3, 50, 700], 4) * 4.0).unwrap();
        check(
            "silu",
            &[x],
            |t| silu(&t[0]),
            |t| candle_nn::ops::silu(&t[0]),
            1e-5,
        );
    }

    #[test]
    fn linear_matches_composition() {
        for bias in [true, false] {
            let x = randn(&[3, 300, 17], 1);
            let w = (randn(&[11, 17], 2) * 0.2).unwrap();
            let bb = randn(&[11], 3);
            check(
                &format!("linear bias={bias}"),
                &[x, w, bb],
                |t| linear(&t[0], &t[1], bias.then_some(&t[2])),
                |t| {
                    let y = t[0].broadcast_matmul(&t[1].t()?)?;
                    if bias { y.broadcast_add(&t[2]) } else { Ok(y) }
                },
                1e-5,
            );
        }
    }
}
