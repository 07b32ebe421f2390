// The simulated device's runtime (see sim.h): kernel registry, the fiber scheduler that runs a
// launch block by block, guarded host allocations standing in for device memory, and a GEMM with
// cublasGemmStridedBatchedEx's column-major semantics. Everything the Rust side calls is
// `extern "C"` and reports failure as a non-zero return with a message, never by aborting.
#include "sim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the simulated device's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores the
// stack pointer in *from, and resumes the fiber whose saved stack pointer is `to`. ucontext's
// swapcontext would do the same plus a signal-mask system call per switch, which made the
// simulator several times slower.
extern "C" void fastrm_sim_switch(void** from, void* to);
asm(R"(
    .text
    .globl fastrm_sim_switch
    .hidden fastrm_sim_switch
    .type fastrm_sim_switch, @function
fastrm_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastrm_sim_switch, .-fastrm_sim_switch
)");

namespace fastrm_sim {

thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

struct Kernel {
    void (*fn)();
    Invoke invoke;
    const size_t* sizes;
    size_t n;
};

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

enum class Wait { None, Block, Warp };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    Wait wait = Wait::None;
    uint64_t gen = 0;  // the barrier generation this fiber waits to see pass
    bool done = false;
    unsigned shuffles = 0;  // shuffles done: picks the exchange buffer (see shfl_xor)
};

// State of the block being run on this OS thread.
struct Run {
    Kernel kernel;
    const void* const* args;
    int n_threads;
    std::vector<Fiber> fibers;
    void* scheduler = nullptr;
    int cur = 0;
    uint64_t block_gen = 0;
    int block_arrived = 0;
    std::vector<uint64_t> warp_gen;
    std::vector<int> warp_arrived;
    std::vector<float> lanes[2];  // shuffle exchange slots, one per thread, double-buffered
    std::vector<unsigned char> smem;
};

thread_local Run* run = nullptr;

constexpr size_t STACK_BYTES = 64 * 1024;

// Fiber stacks, kept per OS thread across launches: allocating (and faulting in) 64 KB per CUDA
// thread at every launch cost more than running the kernels.
struct Stack {
    std::unique_ptr<char[]> mem{new char[STACK_BYTES]};
};
thread_local std::vector<Stack> stacks;

void yield_to_scheduler() {
    Run& r = *run;
    fastrm_sim_switch(&r.fibers[r.cur].sp, r.scheduler);
}

// A fiber's first frame: runs its thread of the kernel, then hands control back for good.
void fiber_main() {
    Run& r = *run;
    r.kernel.invoke(r.kernel.fn, r.args);
    Fiber& f = r.fibers[r.cur];
    f.done = true;
    fastrm_sim_switch(&f.sp, r.scheduler);
    __builtin_unreachable();
}

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment (rsp = 8
// mod 16 at entry), zeroed callee-saved registers and the current SSE/x87 control words.
void* fresh_stack(Stack& stack) {
    uintptr_t top = (uintptr_t)(stack.mem.get() + STACK_BYTES) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                          // fiber_main's (never used) return address
    *--sp = (uint64_t)(&fiber_main);    // where the switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    uint32_t csr;
    uint16_t cw;
    asm volatile("stmxcsr %0" : "=m"(csr));
    asm volatile("fnstcw %0" : "=m"(cw));
    *--sp = (uint64_t)csr | ((uint64_t)cw << 32);
    return sp;
}

void set_thread_idx(int i) {
    const int bx = (int)block_dim.x, by = (int)block_dim.y;
    thread_idx = {(unsigned)(i % bx), (unsigned)((i / bx) % by), (unsigned)(i / (bx * by))};
}

bool released(const Run& r, const Fiber& f, int i) {
    switch (f.wait) {
        case Wait::None:
            return true;
        case Wait::Block:
            return r.block_gen != f.gen;
        case Wait::Warp:
            return r.warp_gen[i / 32] != f.gen;
    }
    return true;
}

// Runs every thread of the current block to completion; false (with `why` set) on a barrier that
// can never complete.
bool run_block(Run& r, std::string& why) {
    r.block_gen = 0;
    r.block_arrived = 0;
    std::fill(r.warp_gen.begin(), r.warp_gen.end(), 0);
    std::fill(r.warp_arrived.begin(), r.warp_arrived.end(), 0);
    std::fill(r.smem.begin(), r.smem.end(), 0xff);
    for (int i = 0; i < r.n_threads; ++i) {
        r.fibers[i] = Fiber{};
        r.fibers[i].sp = fresh_stack(stacks[i]);
    }
    int done = 0;
    while (done < r.n_threads) {
        bool progressed = false;
        for (int i = 0; i < r.n_threads; ++i) {
            Fiber& f = r.fibers[i];
            if (f.done || !released(r, f, i)) continue;
            f.wait = Wait::None;
            r.cur = i;
            set_thread_idx(i);
            fastrm_sim_switch(&r.scheduler, f.sp);
            progressed = true;
            if (f.done) ++done;
        }
        if (!progressed) {
            int at_block = 0, at_warp = 0;
            for (const Fiber& f : r.fibers) {
                at_block += !f.done && f.wait == Wait::Block;
                at_warp += !f.done && f.wait == Wait::Warp;
            }
            why = "barrier never completes: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
                  std::to_string(at_warp) + " at a warp shuffle, " + std::to_string(done) + " of " +
                  std::to_string(r.n_threads) + " have returned (divergent barrier or partial warp)";
            return false;
        }
    }
    return true;
}

void fail(char* err, size_t len, const char* fmt, ...) {
    if (!err || len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

}  // namespace

void register_kernel(const char* name, void (*fn)(), Invoke inv, const size_t* sizes, size_t n) {
    registry()[name] = Kernel{fn, inv, sizes, n};
}

// The calling fiber arrives at a barrier that releases once `needed` fibers have arrived; the
// last arrival moves the generation on and carries on, the others wait for the scheduler to see it.
static void arrive(uint64_t& gen, int& arrived, int needed, Wait kind) {
    Run& r = *run;
    if (++arrived == needed) {
        arrived = 0;
        ++gen;
        return;
    }
    Fiber& f = r.fibers[r.cur];
    f.wait = kind;
    f.gen = gen;
    yield_to_scheduler();
}

void sync_block() {
    Run& r = *run;
    arrive(r.block_gen, r.block_arrived, r.n_threads, Wait::Block);
}

// Always 32 lanes (the full mask our kernels pass): a partial warp never completes and is
// reported, where hardware would leave the result undefined.
static void sync_warp() {
    Run& r = *run;
    const int w = r.cur / 32;
    arrive(r.warp_gen[w], r.warp_arrived[w], 32, Wait::Warp);
}

// One barrier per shuffle: consecutive shuffles use alternate buffers, and a lane cannot reach
// the shuffle after next (which reuses this buffer) before every lane has passed the next one's
// barrier, that is, has read this one.
float shfl_xor(float v, int mask) {
    Run& r = *run;
    const int me = r.cur, src = (me & ~31) | ((me & 31) ^ mask);
    std::vector<float>& slots = r.lanes[r.fibers[me].shuffles++ & 1];
    slots[me] = v;
    sync_warp();
    return slots[src];
}

void* dynamic_smem() { return run->smem.data(); }

}  // namespace fastrm_sim

using namespace fastrm_sim;

extern "C" {

// Runs kernel `name` over the whole grid. Checks what the driver would refuse (unknown kernel,
// block and grid limits, shared memory beyond the default 48 KB) and what it could not see (the
// number and widths of the arguments). Returns 0, or 1 with a message in `err`.
int fastrm_sim_launch(const char* name, const uint32_t grid[3], const uint32_t block[3], uint32_t smem_bytes,
                      const void* const* args, const size_t* sizes, size_t n_args, char* err, size_t err_len) {
    auto it = registry().find(name);
    if (it == registry().end()) {
        fail(err, err_len, "no kernel named %s", name);
        return 1;
    }
    const Kernel& k = it->second;
    if (n_args != k.n) {
        fail(err, err_len, "%s takes %zu arguments, the launch passed %zu", name, k.n, n_args);
        return 1;
    }
    for (size_t i = 0; i < n_args; ++i) {
        if (sizes[i] != k.sizes[i]) {
            fail(err, err_len, "%s: argument %zu is %zu bytes wide, the launch passed %zu", name, i, k.sizes[i],
                 sizes[i]);
            return 1;
        }
    }
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[2] > 64) {
        fail(err, err_len, "%s: block (%u, %u, %u) outside the hardware's limits", name, block[0], block[1], block[2]);
        return 1;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        fail(err, err_len, "%s: grid (%u, %u, %u) outside the hardware's limits", name, grid[0], grid[1], grid[2]);
        return 1;
    }
    if (smem_bytes > 48 * 1024) {
        fail(err, err_len, "%s: %u bytes of dynamic shared memory exceed the default 48 KB", name, smem_bytes);
        return 1;
    }
    Run r;
    r.kernel = k;
    r.args = args;
    r.n_threads = (int)threads;
    r.fibers.resize(threads);
    if (stacks.size() < threads) stacks.resize(threads);
    const int n_warps = (int)((threads + 31) / 32);
    r.warp_gen.assign(n_warps, 0);
    r.warp_arrived.assign(n_warps, 0);
    r.lanes[0].assign(threads, 0.f);
    r.lanes[1].assign(threads, 0.f);
    r.smem.resize(smem_bytes);  // poisoned per block by run_block
    Run* outer = run;
    run = &r;
    block_dim = {block[0], block[1], block[2]};
    grid_dim = {grid[0], grid[1], grid[2]};
    std::string why;
    for (uint32_t z = 0; z < grid[2]; ++z)
        for (uint32_t y = 0; y < grid[1]; ++y)
            for (uint32_t x = 0; x < grid[0]; ++x) {
                block_idx = {x, y, z};
                if (!run_block(r, why)) {
                    run = outer;
                    fail(err, err_len, "%s, block (%u, %u, %u): %s", name, x, y, z, why.c_str());
                    return 1;
                }
            }
    run = outer;
    return 0;
}

// Device memory: `bytes` placed so that they end exactly at an inaccessible page, so a kernel
// reading or writing past the end of a buffer faults at once instead of corrupting a neighbour.
void* fastrm_sim_alloc(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t data_pages = (bytes + page - 1) / page;
    const size_t total = (data_pages + 1) * page;
    char* base = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    char* guard = base + data_pages * page;
    if (mprotect(guard, page, PROT_NONE) != 0) {
        munmap(base, total);
        return nullptr;
    }
    return guard - bytes;
}

void fastrm_sim_free(void* p, size_t bytes) {
    if (!p) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t data_pages = (bytes + page - 1) / page;
    char* guard = (char*)p + bytes;
    munmap(guard - data_pages * page, (data_pages + 1) * page);
}

}  // extern "C"

namespace {

// Storage type codes shared with src/backend/cuda/sim.rs.
enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };

float load(const void* base, int type, int64_t i) {
    switch (type) {
        case F32:
            return static_cast<const float*>(base)[i];
        case F16:
            return __half2float(static_cast<const __half*>(base)[i]);
        default:
            return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    }
}

void store(void* base, int type, int64_t i, float v) {
    switch (type) {
        case F32:
            static_cast<float*>(base)[i] = v;
            break;
        case F16:
            static_cast<__half*>(base)[i] = __float2half_rn(v);
            break;
        default:
            static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
    }
}

size_t elem_size(int type) { return type == F32 ? 4 : 2; }

}  // namespace

extern "C" {

// C = alpha op(A) op(B) + beta C per batch, column-major, f32 accumulation: the semantics of
// cublasGemmStridedBatchedEx with CUBLAS_COMPUTE_32F. As cuBLAS, beta == 0 never reads C (a
// poisoned output stays unread) and leading dimensions smaller than the matrices they hold are
// refused (CUBLAS_STATUS_INVALID_VALUE on hardware).
int fastrm_sim_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int a_type,
                    int64_t lda, int64_t sa, const void* b, int b_type, int64_t ldb, int64_t sb, float beta, void* c,
                    int c_type, int64_t ldc, int64_t sc, int64_t batch, char* err, size_t err_len) {
    const int64_t a_rows = ta ? k : m, b_rows = tb ? n : k;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < (a_rows > 1 ? a_rows : 1) ||
        ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
        fail(err, err_len, "gemm: invalid value (m %lld, n %lld, k %lld, lda %lld, ldb %lld, ldc %lld, ta %d, tb %d)",
             (long long)m, (long long)n, (long long)k, (long long)lda, (long long)ldb, (long long)ldc, ta, tb);
        return 1;
    }
    std::vector<float> col(k);
    for (int64_t bt = 0; bt < batch; ++bt) {
        const char* ab = static_cast<const char*>(a) + bt * sa * (int64_t)elem_size(a_type);
        const char* bb = static_cast<const char*>(b) + bt * sb * (int64_t)elem_size(b_type);
        char* cb = static_cast<char*>(c) + bt * sc * (int64_t)elem_size(c_type);
        for (int64_t j = 0; j < n; ++j) {
            for (int64_t p = 0; p < k; ++p) col[p] = load(bb, b_type, tb ? j + p * ldb : p + j * ldb);
            for (int64_t i = 0; i < m; ++i) {
                float acc = 0.f;
                for (int64_t p = 0; p < k; ++p) acc += load(ab, a_type, ta ? p + i * lda : i + p * lda) * col[p];
                const int64_t ci = i + j * ldc;
                const float prev = beta == 0.f ? 0.f : beta * load(cb, c_type, ci);
                store(cb, c_type, ci, alpha * acc + prev);
            }
        }
    }
    return 0;
}

}  // extern "C"
