//! Many runs at once: a [`Scheduler`] holds any number of requests and advances them together.
//! Each [`Scheduler::step`] does one unit of work for every run that is not decoding (decoding
//! its image, the vision tower, its prefill, a map after generation) and then one batched decode
//! step for up to [`crate::backend::INVARIANT_ROWS`] decoding runs: one embedding, one decoder
//! forward over their rows, one lm_head product, and per row the token's choice and its map.
//! A run's items are the ones [`Engine::stream`] gives it alone, with the same ids and maps:
//! every row's arithmetic is independent of its batch-mates.
//!
//! Prefill is whole by default: a new run's prompt goes through the decoder in one step, and the
//! decoding runs wait for it. With [`Scheduler::set_prefill_chunk`] a prompt runs `rows` at a
//! time, and a step runs prompt chunks only until it has run `rows` prompt rows (one chunk at
//! least), so a step's cost stays bounded while new runs arrive; chunk boundaries depend only on
//! the prompt and the chunk size, never on the load, so a run's answer does not depend on what
//! else is running (it equals the whole prefill's to rounding).
//!
//! Admission: a run takes its KV pages (its prompt and every token it may generate) at its
//! prefill; when the pool has no room it waits, and is refused ([`Error::KvFull`]) only when
//! nothing else holds pages (it can never fit).

use std::collections::VecDeque;

use super::stream::Stream;
use super::{CancelToken, Engine, Item, Request, RunOptions};
use crate::backend::{Backend, INVARIANT_ROWS};
use crate::error::{Error, Result};
use crate::model::session::step_all;

/// A run's handle in its [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(u64);

struct Slot<'e, B: Backend> {
    id: SeqId,
    run: Stream<'e, B>,
    /// Items (and at most one error, last) not yet taken by [`Scheduler::events`].
    events: VecDeque<Result<Item>>,
    /// The other continuations of this run's prompt ([`Scheduler::submit_n`]) and their seeds:
    /// forked from it once its prompt is prefilled.
    forks: Vec<(SeqId, u64)>,
}

/// Runs advanced together, one token per decoding run per [`Scheduler::step`].
pub struct Scheduler<'e, B: Backend> {
    engine: &'e Engine<B>,
    slots: Vec<Slot<'e, B>>,
    next: u64,
    max_batch: usize,
    prefill_chunk: Option<usize>,
    prefill_units: u64,
}

impl<'e, B: Backend> Scheduler<'e, B> {
    pub(super) fn new(engine: &'e Engine<B>) -> Self {
        Scheduler {
            engine,
            slots: Vec::new(),
            next: 0,
            max_batch: INVARIANT_ROWS,
            prefill_chunk: None,
            prefill_units: 0,
        }
    }

    /// Decodes at most `rows` runs per step (1 ..= [`INVARIANT_ROWS`]); the others wait their
    /// turn (runs take turns in submission order).
    pub fn set_max_batch(&mut self, rows: usize) -> Result<()> {
        if !(1..=INVARIANT_ROWS).contains(&rows) {
            return Err(Error::input(format!(
                "a decode batch holds 1 to {INVARIANT_ROWS} rows, not {rows}"
            )));
        }
        self.max_batch = rows;
        Ok(())
    }

    /// Runs prompts through the decoder `rows` positions at a time (`None`, the default: whole),
    /// for the runs submitted from now on; a step runs prompt chunks until it has run `rows`
    /// prompt rows. At least one row.
    pub fn set_prefill_chunk(&mut self, rows: Option<usize>) -> Result<()> {
        if rows == Some(0) {
            return Err(Error::input("a prefill chunk holds at least one position"));
        }
        self.prefill_chunk = rows;
        Ok(())
    }

    /// Units of prefill work run so far: a whole prompt, or one chunk of it.
    pub fn prefill_units(&self) -> u64 {
        self.prefill_units
    }

    /// Adds a run; its work starts at the next [`Self::step`].
    pub fn submit(&mut self, req: Request, opts: RunOptions) -> SeqId {
        let id = SeqId(self.next);
        self.next += 1;
        let mut run = Stream::new(self.engine, req, opts, CancelToken::new());
        run.set_prefill_chunk(self.prefill_chunk);
        self.slots.push(Slot {
            id,
            run,
            events: VecDeque::new(),
            forks: Vec::new(),
        });
        id
    }

    /// The most continuations one prompt may have.
    pub const MAX_N: usize = 16;

    /// `n` continuations of one prompt (OpenAI's `n`): one prefill, whose full KV pages all of
    /// them share; continuation `i` samples with the request's seed plus `i` and gives exactly
    /// what that seed gives alone. Greedy continuations are all the same answer.
    pub fn submit_n(&mut self, req: Request, opts: RunOptions, n: usize) -> Result<Vec<SeqId>> {
        if !(1..=Self::MAX_N).contains(&n) {
            return Err(Error::input(format!(
                "n must be 1 to {}, not {n}",
                Self::MAX_N
            )));
        }
        let seed = opts.generate.sampling.seed;
        let first = self.submit(req, opts);
        let forks: Vec<(SeqId, u64)> = (1..n as u64)
            .map(|i| {
                let id = SeqId(self.next);
                self.next += 1;
                (id, seed.wrapping_add(i))
            })
            .collect();
        let mut ids = vec![first];
        ids.extend(forks.iter().map(|f| f.0));
        if let Some(slot) = self.slots.last_mut() {
            slot.forks = forks;
        }
        Ok(ids)
    }

    /// Ends a run now: its pages go back to the pool and its last event is
    /// [`Error::Cancelled`]. A run that already ended, or an unknown id, is left as it is.
    pub fn cancel(&mut self, id: SeqId) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            if !slot.run.is_finished() {
                slot.run.finish();
                slot.events.push_back(Err(Error::Cancelled));
            }
        } else if let Some(leader) = self
            .slots
            .iter_mut()
            .find(|s| s.forks.iter().any(|f| f.0 == id))
        {
            // A continuation not forked yet: it ends before it starts.
            leader.forks.retain(|f| f.0 != id);
            let mut events = VecDeque::new();
            events.push_back(Err(Error::Cancelled));
            let run = self.ended();
            self.slots.push(Slot {
                id,
                run,
                events,
                forks: Vec::new(),
            });
        }
        // A cancelled run's continuations end with it.
        self.fork_prefilled();
    }

    /// A run that has ended, standing in for one that never started.
    fn ended(&self) -> Stream<'e, B> {
        let mut r = Stream::new(
            self.engine,
            Request::Ids { n_text: 0, seed: 0 },
            RunOptions::default(),
            CancelToken::new(),
        );
        r.finish();
        r
    }

    /// The events of `id` since the last call: its items in order, then — when it failed or was
    /// cancelled — the error. A run's entry is dropped once it has ended and its events are taken.
    pub fn events(&mut self, id: SeqId) -> Vec<Result<Item>> {
        let Some(i) = self.slots.iter().position(|s| s.id == id) else {
            return Vec::new();
        };
        let slot = &mut self.slots[i];
        let out: Vec<_> = slot.events.drain(..).collect();
        if slot.run.is_finished() {
            self.slots.remove(i);
        }
        out
    }

    /// Runs that have not ended.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| !s.run.is_finished()).count()
    }

    /// Whether every run has ended.
    pub fn is_idle(&self) -> bool {
        self.active() == 0
    }

    /// One unit of work for each run that is not decoding, then one batched decode step; returns
    /// how many runs that step decoded. A run's failure ends that run (its error is its last
    /// event); an error of the batched step itself (the backend's) ends every run in it and is
    /// returned.
    pub fn step(&mut self) -> Result<usize> {
        let mut prompt_rows = 0;
        for slot in self.slots.iter_mut() {
            if slot.run.is_finished() || slot.run.is_decoding() {
                continue;
            }
            // With a chunk size, this step's prompt rows are bounded: later runs wait a step.
            if slot.run.is_prefilling() && self.prefill_chunk.is_some_and(|c| prompt_rows >= c) {
                continue;
            }
            let work = slot.run.work();
            if slot.run.prefilled_rows() > 0 {
                prompt_rows += slot.run.prefilled_rows();
                self.prefill_units += 1;
            }
            match work {
                Ok(()) => {}
                // Pages are held by runs that will end: wait for them. When none are held,
                // this run can never fit.
                Err(Error::KvFull(_)) if self.engine.model.kv.runs_hold_pages() => {}
                Err(e) => {
                    slot.run.finish();
                    slot.events.push_back(Err(e));
                }
            }
            slot.events.extend(slot.run.take_items().map(Ok));
        }
        self.fork_prefilled();
        let batch: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].run.is_decoding())
            .take(self.max_batch)
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let results = {
            let mut sessions: Vec<_> = self
                .slots
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| batch.contains(i))
                .filter_map(|(_, s)| s.run.decoding())
                .collect();
            step_all(&mut sessions)
        };
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                for &i in &batch {
                    let slot = &mut self.slots[i];
                    slot.run.finish();
                    slot.events.push_back(Err(Error::Backend(format!(
                        "the batched decode step failed: {e}"
                    ))));
                }
                return Err(e);
            }
        };
        for (&i, r) in batch.iter().zip(results) {
            let slot = &mut self.slots[i];
            if let Err(e) = slot.run.stepped_from_state(r) {
                slot.run.finish();
                slot.events.push_back(Err(e));
            }
            slot.events.extend(slot.run.take_items().map(Ok));
        }
        // Runs that decoded go to the back: with more runs than rows, everyone takes turns.
        if self.slots.iter().filter(|s| s.run.is_decoding()).count() > self.max_batch {
            let mut moved = Vec::new();
            for &i in batch.iter().rev() {
                moved.push(self.slots.remove(i));
            }
            moved.reverse();
            self.slots.extend(moved);
        }
        Ok(batch.len())
    }
}

impl<'e, B: Backend> Scheduler<'e, B> {
    /// Forks every run with continuations waiting whose prompt is now prefilled; a run that ended
    /// before (an error, a cancel) ends its continuations with its error.
    fn fork_prefilled(&mut self) {
        let mut born = Vec::new();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.forks.is_empty() {
                continue;
            }
            let failed = slot.run.is_finished();
            if !failed && !slot.run.is_decoding() {
                continue;
            }
            let forks = std::mem::take(&mut self.slots[i].forks);
            for (id, seed) in forks {
                let slot = &self.slots[i];
                let made = if failed {
                    Err(match slot.events.back() {
                        Some(Err(e)) => e.duplicate(),
                        _ => Error::Cancelled,
                    })
                } else {
                    slot.run.fork(seed)
                };
                let mut events = VecDeque::new();
                let run = match made {
                    Ok(mut r) => {
                        events.extend(r.take_items().map(Ok));
                        r
                    }
                    Err(e) => {
                        events.push_back(Err(e));
                        self.ended()
                    }
                };
                born.push(Slot {
                    id,
                    run,
                    events,
                    forks: Vec::new(),
                });
            }
        }
        self.slots.extend(born);
    }
}

impl<B: Backend> Engine<B> {
    /// A scheduler over this engine's model and KV pool: see [`Scheduler`].
    pub fn scheduler(&self) -> Scheduler<'_, B> {
        Scheduler::new(self)
    }
}
