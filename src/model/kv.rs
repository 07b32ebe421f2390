//! The paged KV cache: one pool of key and value pages per model, shared by every sequence.
//!
//! A page holds [`PAGE`] positions of every layer's keys and values: per layer the pool is one
//! `[pages · PAGE, kv_heads · head_dim]` tensor for keys and one for values, and page `p` is its
//! rows `p · PAGE ..`. A sequence ([`SeqKv`]) holds a page table; position `j` of the sequence is
//! row `table[j / PAGE] · PAGE + j % PAGE`. Pages are taken when a sequence is admitted — all it can
//! use, its prompt and every token it may generate — so a running sequence never waits for pages,
//! and go back to the pool when the sequence is dropped (finished, failed or cancelled).
//!
//! Two ways to size the pool:
//! - a budget ([`KvPool::set_budget`], `--kv-memory`): the pool takes exactly that many bytes at
//!   its first use and never more; a sequence that does not fit gets [`Error::KvFull`];
//! - none (the default): the pool grows with demand, by doubling, up to [`DEFAULT_CONTEXTS`] full
//!   contexts, and gives its memory back whenever no sequence holds a page (so a single run takes
//!   what it needs, as a per-run cache would). Growing copies the pages in use into the larger
//!   storage (both exist for the copy's duration).

use std::sync::{Arc, Mutex, MutexGuard};

use super::prefix::{PageKey, Prefixes, Tok, ROOT};
use crate::backend::{page_slot, with_memory_tag, Backend, MemTag};
use crate::config::TextConfig;
use crate::error::{Error, Result};

/// Positions per page.
pub const PAGE: usize = 16;

/// Without a budget, the pool holds at most this many full contexts.
pub const DEFAULT_CONTEXTS: usize = 4;

/// Keys and values of every layer, in pages.
pub struct KvPool<B: Backend> {
    layers: usize,
    width: usize,
    context: usize,
    state: Mutex<PoolState<B>>,
}

struct PoolState<B: Backend> {
    /// Per layer `[allocated · PAGE, width]`; empty while nothing is allocated.
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    /// Pages the tensors hold.
    allocated: usize,
    /// Free page ids below `allocated`, the most recently freed last (reused first: its memory
    /// is the warmest).
    free: Vec<u32>,
    /// Per page, the sequences holding it (more than one for a prompt's full pages shared by
    /// its forks, [`SeqKv::fork`]); a page is free at 0.
    refs: Vec<u32>,
    /// A fixed size in pages, or `None` (grow with demand).
    budget: Option<usize>,
    /// Full pages kept for later runs with the same prefix; the cache holds one reference to each.
    prefixes: Prefixes<Cached<B>>,
}

/// What a cached page keeps beside its keys and values.
struct Cached<B: Backend> {
    /// The images its positions name (their addresses stay theirs while the node lives).
    _images: Vec<Arc<B::Tensor>>,
    /// The final-norm hidden states of its image positions, `[k, D]` (FastRM reads them), or
    /// `None` when it has none.
    image_hidden: Option<B::Tensor>,
}

/// A sequence admitted with the longest cached prefix of its prompt ([`KvPool::admit_prefix`]).
pub struct PrefixHit<'p, B: Backend> {
    /// Its pages, the cached ones first; `kv.len` is the number of positions they hold.
    pub kv: SeqKv<'p, B>,
    /// The cached pages' image-position hidden states, in order (one tensor per page that has
    /// image positions).
    pub image_hidden: Vec<B::Tensor>,
}

impl<B: Backend> KvPool<B> {
    pub fn new(cfg: &TextConfig) -> Self {
        KvPool {
            layers: cfg.num_hidden_layers,
            width: cfg.num_key_value_heads * cfg.head_dim,
            context: cfg.max_position_embeddings,
            state: Mutex::new(PoolState {
                k: Vec::new(),
                v: Vec::new(),
                allocated: 0,
                free: Vec::new(),
                refs: Vec::new(),
                budget: None,
                prefixes: Prefixes::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState<B>> {
        // A panic while the lock was held leaves page lists that are still consistent: every
        // change to them is a single push, pop or truncate.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes one page takes on `b` (keys and values of every layer).
    pub fn page_bytes(&self, b: &B) -> usize {
        PAGE * self.layers * 2 * self.width * b.storage_bytes()
    }

    /// Fixes the pool at `bytes` (whole pages; at least one) from its next allocation on, or
    /// returns it to growing with demand (`None`). Refused while sequences hold pages.
    pub fn set_budget(&self, b: &B, bytes: Option<u64>) -> Result<()> {
        let mut st = self.lock();
        if Self::runs_hold(&st) {
            return Err(Error::input(
                "the KV cache's size cannot change while sequences hold pages",
            ));
        }
        Self::clear_prefixes(&mut st);
        if Self::in_use(&st) > 0 {
            return Err(Error::input(
                "the KV cache's size cannot change while sequences hold pages",
            ));
        }
        let pages = match bytes {
            None => None,
            Some(bytes) => {
                let per = self.page_bytes(b) as u64;
                let pages = (bytes / per) as usize;
                if pages == 0 {
                    return Err(Error::input(format!(
                        "a KV cache of {bytes} bytes holds no page; one page ({PAGE} positions of \
                         every layer) takes {per} bytes"
                    )));
                }
                Some(pages)
            }
        };
        Self::release_storage(&mut st);
        st.budget = pages;
        Ok(())
    }

    /// `(pages in use, pages the pool may hold)`; pages in use include the prefix cache's.
    pub fn usage(&self) -> (usize, usize) {
        let st = self.lock();
        (Self::in_use(&st), self.limit(&st))
    }

    /// Pages the pool may hold at most.
    fn limit(&self, st: &PoolState<B>) -> usize {
        st.budget
            .unwrap_or_else(|| DEFAULT_CONTEXTS * self.context.div_ceil(PAGE))
    }

    fn in_use(st: &PoolState<B>) -> usize {
        st.allocated - st.free.len()
    }

    fn release_storage(st: &mut PoolState<B>) {
        st.k.clear();
        st.v.clear();
        st.free.clear();
        st.refs.clear();
        st.allocated = 0;
    }

    /// A sequence with room for `positions` positions, its pages taken now.
    pub fn admit(&self, b: &B, positions: usize) -> Result<SeqKv<'_, B>> {
        let need = positions.div_ceil(PAGE).max(1);
        let mut st = self.lock();
        let pages = self.take(b, &mut st, need, positions)?;
        Ok(SeqKv {
            pool: self,
            pages,
            len: 0,
            capacity: positions,
        })
    }

    /// `need` free pages (growing the storage when allowed), each held once, or
    /// [`Error::KvFull`] naming the `positions` they are for.
    fn take(
        &self,
        b: &B,
        st: &mut PoolState<B>,
        need: usize,
        positions: usize,
    ) -> Result<Vec<u32>> {
        let limit = self.limit(st);
        // Cached pages no run holds make room before a run is refused.
        while Self::in_use(st) + need > limit {
            let refs = &st.refs;
            let Some(p) = st.prefixes.evict(|p| refs[p as usize] == 1) else {
                break;
            };
            Self::drop_ref(st, p);
        }
        let in_use = Self::in_use(st);
        if in_use + need > limit {
            return Err(Error::KvFull(format!(
                "a sequence of {positions} positions needs {need} pages of {PAGE}; {} of the \
                 KV cache's {limit} are free",
                limit - in_use
            )));
        }
        if need > st.free.len() {
            let target = match st.budget {
                Some(pages) => pages,
                None => (in_use + need).max(2 * st.allocated).min(limit),
            };
            self.grow(b, st, target)?;
        }
        let at = st.free.len() - need;
        let mut pages = st.free.split_off(at);
        pages.reverse();
        for &p in &pages {
            st.refs[p as usize] = 1;
        }
        Ok(pages)
    }

    /// Storage for `target` pages with the pages in use copied over.
    fn grow(&self, b: &B, st: &mut PoolState<B>, target: usize) -> Result<()> {
        let rows = target * PAGE;
        let old = st.allocated;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        with_memory_tag(b, MemTag::KvCache, || -> Result<()> {
            for li in 0..self.layers {
                let (mut nk, mut nv) = (b.zeros(rows, self.width)?, b.zeros(rows, self.width)?);
                if old > 0 {
                    b.copy_rows_into(&mut nk, 0, &st.k[li])?;
                    b.copy_rows_into(&mut nv, 0, &st.v[li])?;
                }
                k.push(nk);
                v.push(nv);
            }
            Ok(())
        })?;
        st.k = k;
        st.v = v;
        // New pages go under the free ones, so pages freed earlier are still reused first.
        let mut free: Vec<u32> = (old as u32..target as u32).rev().collect();
        free.append(&mut st.free);
        st.free = free;
        st.refs.resize(target, 0);
        st.allocated = target;
        Ok(())
    }

    fn release(&self, pages: &[u32]) {
        let mut st = self.lock();
        for &p in pages.iter().rev() {
            Self::drop_ref(&mut st, p);
        }
        Self::release_if_idle(&mut st);
    }

    fn drop_ref(st: &mut PoolState<B>, p: u32) {
        let r = &mut st.refs[p as usize];
        *r -= 1;
        if *r == 0 {
            st.free.push(p);
        }
    }

    /// Without a budget, the storage goes when no page is held (by a run or the prefix cache).
    fn release_if_idle(st: &mut PoolState<B>) {
        if st.budget.is_none() && st.free.len() == st.allocated {
            Self::release_storage(st);
        }
    }

    fn clear_prefixes(st: &mut PoolState<B>) {
        for p in st.prefixes.clear() {
            Self::drop_ref(st, p);
        }
        Self::release_if_idle(st);
    }

    /// Keeps at most `pages` full pages of finished prompts and answers for later runs that
    /// start the same way ([`Self::admit_prefix`]); 0 (the default) keeps none and empties the
    /// cache. Cached pages count as used, but a run that needs room takes them (least recently
    /// used first) before it is refused, so the cache never turns a run away.
    pub fn set_prefix_cache(&self, pages: usize) {
        let mut st = self.lock();
        st.prefixes.max_pages = pages;
        Self::trim_prefixes(&mut st);
    }

    /// Pages the prefix cache holds.
    pub fn prefix_pages(&self) -> usize {
        self.lock().prefixes.len()
    }

    /// Whether any run (not only the prefix cache) holds a page: a run refused for room can wait
    /// for them.
    pub fn runs_hold_pages(&self) -> bool {
        Self::runs_hold(&self.lock())
    }

    fn runs_hold(st: &PoolState<B>) -> bool {
        let refs: usize = st.refs.iter().map(|&r| r as usize).sum();
        refs > st.prefixes.len()
    }

    fn trim_prefixes(st: &mut PoolState<B>) {
        while st.prefixes.len() > st.prefixes.max_pages {
            let Some(p) = st.prefixes.evict(|_| true) else {
                break;
            };
            Self::drop_ref(st, p);
        }
        Self::release_if_idle(st);
    }

    /// [`Self::admit`] with the longest cached prefix of `keys` (the prompt's full pages that may
    /// come from the cache) already in place: the sequence's length is the positions found.
    pub fn admit_prefix(
        &self,
        b: &B,
        positions: usize,
        keys: &[PageKey],
    ) -> Result<PrefixHit<'_, B>> {
        let need = positions.div_ceil(PAGE).max(1);
        let mut st = self.lock();
        let st = &mut *st;
        let found = st.prefixes.lookup(&keys[..keys.len().min(need)]);
        // Copied before any page is taken, so a failed copy leaves nothing held.
        let mut image_hidden = Vec::new();
        for &(id, _) in &found {
            if let Some(h) = &st.prefixes.payload(id).image_hidden {
                image_hidden.push(b.slice_rows(h, 0, b.dims(h).0)?);
            }
        }
        // Held before taking the rest, so making room cannot evict them.
        for &(_, p) in &found {
            st.refs[p as usize] += 1;
        }
        let own = match self.take(b, st, need - found.len(), positions) {
            Ok(own) => own,
            Err(e) => {
                for &(_, p) in &found {
                    Self::drop_ref(st, p);
                }
                Self::release_if_idle(st);
                return Err(e);
            }
        };
        let mut pages: Vec<u32> = found.iter().map(|&(_, p)| p).collect();
        pages.extend(own);
        Ok(PrefixHit {
            kv: SeqKv {
                pool: self,
                pages,
                len: found.len() * PAGE,
                capacity: positions,
            },
            image_hidden,
        })
    }

    /// Caches `seq`'s full pages whose positions are `keys` (from the first page on; pages
    /// already cached are skipped). A page with image positions is cached only with their hidden
    /// states, `image_hidden(i)` for page `i` (`None` when they are not at hand: the chain stops
    /// there). `images` are the features the keys' image positions name.
    pub fn remember(
        &self,
        seq: &SeqKv<'_, B>,
        keys: &[PageKey],
        images: &[Arc<B::Tensor>],
        mut image_hidden: impl FnMut(usize) -> Result<Option<B::Tensor>>,
    ) -> Result<()> {
        let mut st = self.lock();
        let st = &mut *st;
        if st.prefixes.max_pages == 0 {
            return Ok(());
        }
        let full = (seq.len / PAGE).min(keys.len());
        let mut parent = ROOT;
        for (i, key) in keys[..full].iter().enumerate() {
            if let Some(id) = st.prefixes.child(parent, key) {
                parent = id;
                continue;
            }
            let mut named: Vec<usize> = key
                .iter()
                .filter_map(|t| match t {
                    Tok::Image { image, .. } => Some(*image),
                    Tok::Text(_) => None,
                })
                .collect();
            named.sort_unstable();
            named.dedup();
            let hidden = if named.is_empty() {
                None
            } else {
                match image_hidden(i)? {
                    Some(h) => Some(h),
                    None => break,
                }
            };
            // One clone per address (a prompt may hold the same picture twice).
            let pinned: Vec<Arc<B::Tensor>> = named
                .iter()
                .filter_map(|&at| images.iter().find(|a| Arc::as_ptr(a) as usize == at))
                .cloned()
                .collect();
            if pinned.len() != named.len() {
                // An address no node keeps alive could be another image's later.
                return Err(Error::input(
                    "a cached page names an image whose features were not given",
                ));
            }
            let page = seq.pages[i];
            st.refs[page as usize] += 1;
            parent = st.prefixes.insert(
                parent,
                *key,
                page,
                Cached {
                    _images: pinned,
                    image_hidden: hidden,
                },
            );
        }
        Self::trim_prefixes(st);
        Ok(())
    }

    /// Runs `f` on the pool's per-layer key and value tensors.
    pub fn with_layers<R>(&self, f: impl FnOnce(&mut [B::Tensor], &mut [B::Tensor]) -> R) -> R {
        let mut st = self.lock();
        let st = &mut *st;
        f(&mut st.k, &mut st.v)
    }
}

/// One sequence's pages: positions `0 .. len` filled, room for `capacity`.
pub struct SeqKv<'p, B: Backend> {
    pool: &'p KvPool<B>,
    pages: Vec<u32>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> Drop for SeqKv<'_, B> {
    fn drop(&mut self) {
        self.pool.release(&self.pages);
    }
}

impl<'p, B: Backend> SeqKv<'p, B> {
    pub fn pool(&self) -> &'p KvPool<B> {
        self.pool
    }

    /// The page table.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Pool rows of positions `range`.
    pub fn slots(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        range
            .map(|j| page_slot(&self.pages, PAGE, j) as u32)
            .collect()
    }

    /// A second sequence continuing from this one's positions, with room for `capacity`: the
    /// pages entirely filled are shared (no sequence writes below its length, so neither can
    /// change them for the other), the partly filled one is copied, the rest are its own.
    /// Several continuations of one prompt (`n`) hold its pages once.
    pub fn fork(&self, b: &B, capacity: usize) -> Result<SeqKv<'p, B>> {
        if capacity < self.len {
            return Err(Error::input(format!(
                "a fork with room for {capacity} positions of a sequence holding {}",
                self.len
            )));
        }
        let full = self.len / PAGE;
        let need = capacity.div_ceil(PAGE).max(1) - full;
        let pool = self.pool;
        let mut st = pool.lock();
        let own = pool.take(b, &mut st, need, capacity)?;
        for &p in &self.pages[..full] {
            st.refs[p as usize] += 1;
        }
        let mut pages = self.pages[..full].to_vec();
        pages.extend(&own);
        let fork = SeqKv {
            pool,
            pages,
            len: self.len,
            capacity,
        };
        drop(st);
        if self.len > full * PAGE {
            // The partly filled page: its rows copied into the fork's first own page.
            let from = self.slots(full * PAGE..self.len);
            let to = fork.slots(full * PAGE..self.len);
            pool.with_layers(|k, v| -> Result<()> {
                for t in k.iter_mut().chain(v.iter_mut()) {
                    let rows = b.embedding(t, &from)?;
                    b.scatter_rows(t, &to, &rows)?;
                }
                Ok(())
            })?;
        }
        Ok(fork)
    }

    /// Layer `li`'s keys and values of positions `0 .. n`, gathered in order `[n, width]`.
    pub fn layer(&self, b: &B, li: usize, n: usize) -> Result<(B::Tensor, B::Tensor)> {
        if n > self.len {
            return Err(Error::input(format!(
                "{n} cached positions asked of a sequence holding {}",
                self.len
            )));
        }
        let slots = self.slots(0..n);
        self.pool
            .with_layers(|k, v| Ok((b.embedding(&k[li], &slots)?, b.embedding(&v[li], &slots)?)))
    }
}
