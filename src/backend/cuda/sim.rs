//! The simulated device (feature `sim`): the same launchers, shapes and kernel sources as on a GPU,
//! run on the host by `kernels/sim/` (every CUDA thread a fiber, barriers and warp shuffles
//! honoured, GEMMs with cuBLAS's column-major semantics). Device addresses are host addresses of
//! guarded allocations (an inaccessible page right after each buffer), so a kernel that writes past
//! its output faults instead of passing. It checks what a GPU run cannot show cheaply: argument
//! counts and widths against each kernel's signature, block and grid limits, shared-memory sizes.
//! Its speed means nothing.

use std::ffi::{c_char, c_void, CString};

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

/// One simulated device allocation.
pub struct HostMem {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: the allocation is owned by this value alone; like device memory it is only touched
// through the backend, one operation at a time.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    pub fn new(bytes: usize) -> Result<Self> {
        let bytes = bytes.max(1);
        // SAFETY: plain allocation; null is handled.
        let ptr = unsafe { fastrm_sim_alloc(bytes) };
        if ptr.is_null() {
            return Err(Error::Backend(format!(
                "simulated device: could not allocate {bytes} bytes"
            )));
        }
        Ok(HostMem { ptr, bytes })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly what fastrm_sim_alloc returned and was asked for.
        unsafe { fastrm_sim_free(self.ptr, self.bytes) }
    }
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
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
    let mut err = vec![0u8; 512];
    // SAFETY: args[i] points at a live value of sizes[i] bytes (checked against the kernel's
    // parameter list before any is read); the pointers inside them are addresses of live
    // HostMem allocations that the launcher sized from checked shapes.
    let rc = unsafe {
        fastrm_sim_launch(
            cname.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            smem_bytes,
            args.as_ptr(),
            sizes.as_ptr(),
            args.len(),
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    if rc != 0 {
        return Err(Error::Backend(format!(
            "simulated launch failed: {}",
            message(&err)
        )));
    }
    Ok(())
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
    let mut err = vec![0u8; 512];
    // SAFETY: as for cuBLAS: the callers derive every dimension, leading dimension and stride from
    // checked tensor shapes; the simulator refuses leading dimensions smaller than the matrices.
    let rc = unsafe {
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
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    if rc != 0 {
        return Err(Error::Backend(format!(
            "simulated cuBLAS: {}",
            message(&err)
        )));
    }
    Ok(())
}
