//! The simulated device (feature `sim`): the same launchers, shapes and kernel sources as on a GPU,
//! run on the host by `kernels/sim/` (every CUDA thread a fiber, barriers and warp shuffles
//! honoured, GEMMs with cuBLAS's column-major semantics). Device addresses are host addresses of
//! guarded allocations (an inaccessible page right after each buffer), so a kernel that writes past
//! its output faults instead of passing. It checks what a GPU run cannot show cheaply: argument
//! counts and widths against each kernel's signature, block and grid limits, shared-memory sizes.
//! Its speed means nothing.

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Gemm;
use crate::error::{Error, Result};

extern "C" {
    fn fastrm_sim_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem_bytes: u32,
        args: *const *const c_void,
        sizes: *const usize,
        n_args: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn fastrm_sim_alloc(bytes: usize) -> *mut c_void;
    fn fastrm_sim_free(p: *mut c_void, bytes: usize);
    fn fastrm_sim_gemm(
        ta: i32,
        tb: i32,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const c_void,
        a_type: i32,
        lda: i64,
        sa: i64,
        b: *const c_void,
        b_type: i32,
        ldb: i64,
        sb: i64,
        beta: f32,
        c: *mut c_void,
        c_type: i32,
        ldc: i64,
        sc: i64,
        batch: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The simulated device's memory: the bytes allocated on it and how many it may hold, so a test
/// can make an allocation fail as it does on a full GPU.
pub struct Pool {
    budget: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
}

impl Pool {
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Pool {
            budget,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    /// `(bytes allocated now, most allocated at once)`.
    pub fn usage(&self) -> (usize, usize) {
        (
            self.used.load(Ordering::Relaxed),
            self.peak.load(Ordering::Relaxed),
        )
    }
}

/// One simulated device allocation.
pub struct HostMem {
    ptr: *mut c_void,
    bytes: usize,
    pool: Option<Arc<Pool>>,
}

// SAFETY: the allocation is owned by this value alone; like device memory it is only touched
// through the backend, one operation at a time.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    /// An allocation outside any pool (the simulator's self-tests).
    #[cfg(test)]
    pub fn new(bytes: usize) -> Result<Self> {
        Self::alloc(None, bytes).ok_or_else(|| {
            Error::Backend(format!(
                "simulated device: could not allocate {bytes} bytes"
            ))
        })
    }

    /// `bytes` charged to `pool`, or `None` where `cuMemAlloc` would answer out of memory: the
    /// pool's budget would be exceeded, or the host refused the pages.
    pub fn alloc(pool: Option<&Arc<Pool>>, bytes: usize) -> Option<Self> {
        let bytes = bytes.max(1);
        if let Some(p) = pool {
            let before = p.used.fetch_add(bytes, Ordering::Relaxed);
            if before.saturating_add(bytes) > p.budget {
                p.used.fetch_sub(bytes, Ordering::Relaxed);
                return None;
            }
            p.peak.fetch_max(before + bytes, Ordering::Relaxed);
        }
        // SAFETY: plain allocation; null is handled.
        let ptr = unsafe { fastrm_sim_alloc(bytes) };
        let mem = HostMem {
            ptr,
            bytes,
            pool: pool.cloned(),
        };
        // Dropping `mem` when the host refused returns the pool's charge and frees nothing.
        (!ptr.is_null()).then_some(mem)
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
        // SAFETY: ptr/bytes are exactly what fastrm_sim_alloc returned and was asked for (the
        // simulator's free ignores null).
        unsafe { fastrm_sim_free(self.ptr, self.bytes) }
    }
}

/// Calls into the simulator with a message buffer; a non-zero return becomes an error carrying
/// its message.
fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0u8; 512];
    if call(err.as_mut_ptr() as *mut c_char, err.len()) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(Error::Backend(format!(
        "{what}: {}",
        String::from_utf8_lossy(&err[..end])
    )))
}

/// Runs kernel `name` (with its storage suffix) over the grid.
pub fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem_bytes: u32,
    args: &[*const c_void],
    sizes: &[usize],
) -> Result<()> {
    let cname = CString::new(name).map_err(|_| Error::Backend(format!("kernel name {name:?}")))?;
    let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
    // SAFETY: args[i] points at a live value of sizes[i] bytes (checked against the kernel's
    // parameter list before any is read); the pointers inside them are addresses of live
    // HostMem allocations that the launcher sized from checked shapes.
    checked("simulated launch failed", |err, len| unsafe {
        fastrm_sim_launch(
            cname.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            smem_bytes,
            args.as_ptr(),
            sizes.as_ptr(),
            args.len(),
            err,
            len,
        )
    })
}

/// Storage type code of the simulator's GEMM.
fn code(name: &str) -> i32 {
    match name {
        "f32" => 0,
        "f16" => 1,
        _ => 2,
    }
}

pub fn gemm(g: &Gemm, storage: &str) -> Result<()> {
    let t = code(storage);
    let c_type = if g.c_f32 { 0 } else { t };
    // SAFETY: as for cuBLAS: the callers derive every dimension, leading dimension and stride from
    // checked tensor shapes; the simulator refuses leading dimensions smaller than the matrices.
    checked("simulated cuBLAS", |err, len| unsafe {
        fastrm_sim_gemm(
            g.ta as i32,
            g.tb as i32,
            g.m as i64,
            g.n as i64,
            g.k as i64,
            g.alpha,
            g.a as *const c_void,
            t,
            g.lda as i64,
            g.sa as i64,
            g.b as *const c_void,
            t,
            g.ldb as i64,
            g.sb as i64,
            g.beta,
            g.c as *mut c_void,
            c_type,
            g.ldc as i64,
            g.sc as i64,
            g.batch as i64,
            err,
            len,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    extern "C" {
        fn fastrm_sim_to_f16(x: f32) -> u16;
        fn fastrm_sim_to_bf16(x: f32) -> u16;
        fn fastrm_sim_from_f16(b: u16) -> f32;
        fn fastrm_sim_from_bf16(b: u16) -> f32;
    }

    /// Launches a self-test kernel (`kernels/sim/selftest.cpp`) on `threads` threads with an
    /// f32 output of `n_out` values.
    fn selftest(name: &str, threads: u32, n_out: usize) -> Result<Vec<f32>> {
        let out = HostMem::new(n_out * 4)?;
        let (p, unused) = (out.addr(), 0i32);
        launch(
            name,
            (1, 1, 1),
            (threads, 1, 1),
            0,
            &[
                &p as *const u64 as *const c_void,
                &unused as *const i32 as *const c_void,
            ],
            &[8, 4],
        )?;
        let mut host = vec![0f32; n_out];
        // SAFETY: `out` holds n_out f32 values.
        unsafe {
            std::ptr::copy_nonoverlapping(out.addr() as *const f32, host.as_mut_ptr(), n_out)
        };
        Ok(host)
    }

    #[test]
    fn block_reductions_reach_every_thread() {
        for threads in [32u32, 96, 256, 1024] {
            let got = selftest("sim_selftest_reduce_f32", threads, 2 * threads as usize).unwrap();
            let sum = (threads * (threads - 1) / 2) as f32;
            for t in 0..threads as usize {
                assert_eq!(got[2 * t], sum, "block_sum, thread {t} of {threads}");
                assert_eq!(
                    got[2 * t + 1],
                    (threads - 1) as f32,
                    "block_max, thread {t}"
                );
            }
        }
    }

    #[test]
    fn divergent_barriers_are_errors_not_hangs() {
        let e = selftest("sim_selftest_divergent_f32", 64, 64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("barrier never completes") && e.contains("__syncthreads"),
            "{e}"
        );
        // A full-mask shuffle in a 16-lane last warp.
        let e = selftest("sim_selftest_shuffle_f32", 48, 48)
            .unwrap_err()
            .to_string();
        assert!(e.contains("warp shuffle"), "{e}");
        // The same kernel in whole warps is fine: every lane sums 32 ones.
        assert!(selftest("sim_selftest_shuffle_f32", 64, 64)
            .unwrap()
            .iter()
            .all(|&v| v == 32.0));
    }

    #[test]
    fn launches_are_checked_like_the_driver_and_the_signature() {
        let out = HostMem::new(4096).unwrap();
        let p = out.addr();
        let (i, l) = (0i32, 0i64);
        let ptr = |v: &dyn std::any::Any| v as *const dyn std::any::Any as *const c_void;
        struct Case<'a> {
            name: &'a str,
            block: (u32, u32, u32),
            smem: u32,
            args: Vec<*const c_void>,
            sizes: Vec<usize>,
            want: &'a str,
        }
        let reduce = "sim_selftest_reduce_f32";
        let two = || vec![ptr(&p), ptr(&i)];
        let cases = [
            Case {
                name: "no_such_kernel_f32",
                block: (32, 1, 1),
                smem: 0,
                args: vec![],
                sizes: vec![],
                want: "no kernel named",
            },
            Case {
                name: reduce,
                block: (32, 1, 1),
                smem: 0,
                args: vec![ptr(&p)],
                sizes: vec![8],
                want: "takes 2 arguments",
            },
            Case {
                name: reduce,
                block: (32, 1, 1),
                smem: 0,
                args: vec![ptr(&p), ptr(&l)],
                sizes: vec![8, 8],
                want: "argument 1 is 4 bytes wide",
            },
            Case {
                name: reduce,
                block: (2048, 1, 1),
                smem: 0,
                args: two(),
                sizes: vec![8, 4],
                want: "outside the hardware's limits",
            },
            Case {
                name: reduce,
                block: (32, 1, 1),
                smem: 64 * 1024,
                args: two(),
                sizes: vec![8, 4],
                want: "exceed the default 48 KB",
            },
        ];
        for c in cases {
            let e = launch(c.name, (1, 1, 1), c.block, c.smem, &c.args, &c.sizes)
                .unwrap_err()
                .to_string();
            assert!(e.contains(c.want), "{}: {e}", c.name);
        }
    }

    #[test]
    fn gemm_refuses_short_leading_dimensions() {
        let m = HostMem::new(1024).unwrap();
        let g = Gemm {
            ta: false,
            tb: false,
            m: 8,
            n: 2,
            k: 3,
            a: m.addr(),
            lda: 7, // < m
            sa: 0,
            b: m.addr(),
            ldb: 3,
            sb: 0,
            c: m.addr(),
            ldc: 8,
            sc: 0,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            c_f32: true,
        };
        let e = gemm(&g, "f32").unwrap_err().to_string();
        assert!(e.contains("invalid value"), "{e}");
    }

    /// The kernels' f16/bf16 conversions (round to nearest even, subnormals, overflow to
    /// infinity) against the `half` crate: every 16-bit pattern one way, a dense sweep of f32
    /// bit patterns (every exponent, ties included) the other.
    #[test]
    fn storage_conversions_match_the_half_crate() {
        for b in 0..=u16::MAX {
            // SAFETY: pure functions.
            let (g16, gb16) = unsafe { (fastrm_sim_from_f16(b), fastrm_sim_from_bf16(b)) };
            let (w16, wb16) = (f16::from_bits(b).to_f32(), bf16::from_bits(b).to_f32());
            assert!(
                g16.to_bits() == w16.to_bits() || (g16.is_nan() && w16.is_nan()),
                "f16 {b:#x}"
            );
            assert!(
                gb16.to_bits() == wb16.to_bits() || (gb16.is_nan() && wb16.is_nan()),
                "bf16 {b:#x}"
            );
        }
        let ties = (0..=u16::MAX).flat_map(|b| {
            let x = f16::from_bits(b).to_f32().to_bits();
            [
                x.wrapping_add(0x1000),
                x.wrapping_add(0x0fff),
                x.wrapping_add(0x1001),
            ]
        });
        for bits in (0..=u32::MAX).step_by(997).chain(ties) {
            let x = f32::from_bits(bits);
            // SAFETY: pure functions.
            let (g16, gb16) = unsafe { (fastrm_sim_to_f16(x), fastrm_sim_to_bf16(x)) };
            let (w16, wb16) = (f16::from_f32(x), bf16::from_f32(x));
            assert!(
                g16 == w16.to_bits() || (x.is_nan() && w16.is_nan()),
                "f16 of {x:e} ({bits:#x}): {g16:#x} vs {:#x}",
                w16.to_bits()
            );
            assert!(
                gb16 == wb16.to_bits() || (x.is_nan() && wb16.is_nan()),
                "bf16 of {x:e} ({bits:#x})"
            );
        }
    }
}
