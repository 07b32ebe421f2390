//! Phase timers. A profile run asks its [`PhaseClock`] for a mark before and after each phase and
//! for the seconds between the two. On the CPU the marks are wall-clock instants ([`WallClock`]);
//! a device backend supplies its own clock whose marks are events recorded on its stream (CUDA:
//! `cuEventRecord` with `CU_EVENT_DEFAULT` flags — the default flags disable timing — then
//! `cuEventSynchronize` on the later mark and `cuEventElapsedTime`), so a phase's time is the
//! device's time for the work queued between the marks, not the host's time to queue it.

use std::time::Instant;

use crate::error::Result;

pub trait PhaseClock {
    /// What a mark is: an instant, a recorded device event.
    type Mark;

    /// Marks "now" in the clock's timeline (for a device: after all work queued so far).
    fn mark(&self) -> Result<Self::Mark>;

    /// Seconds from `start` to `end`; waits for `end` to complete on a device.
    fn seconds(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64>;

    /// Shown in reports: what the times are (`"wall clock"`, `"CUDA events"`).
    fn describe(&self) -> &'static str;

    /// Times `f` from a mark before it to a mark after it.
    fn time<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        let a = self.mark()?;
        let out = f()?;
        let b = self.mark()?;
        Ok((out, self.seconds(&a, &b)?))
    }
}

/// Wall-clock time: right for the CPU backend, whose ops finish before they return.
#[derive(Debug, Default, Clone, Copy)]
pub struct WallClock;

impl PhaseClock for WallClock {
    type Mark = Instant;

    fn mark(&self) -> Result<Instant> {
        Ok(Instant::now())
    }

    fn seconds(&self, start: &Instant, end: &Instant) -> Result<f64> {
        Ok(end.saturating_duration_since(*start).as_secs_f64())
    }

    fn describe(&self) -> &'static str {
        "wall clock"
    }
}

#[cfg(any(feature = "cuda", feature = "sim"))]
/// Device time between CUDA events recorded on the backend's stream (created with
/// `CU_EVENT_DEFAULT`: the default flags of cudarc disable timing).
pub struct CudaEventClock<'a, T: crate::backend::cuda::Elem> {
    backend: &'a crate::backend::cuda::Cuda<T>,
}

#[cfg(any(feature = "cuda", feature = "sim"))]
impl<'a, T: crate::backend::cuda::Elem> CudaEventClock<'a, T> {
    pub fn new(backend: &'a crate::backend::cuda::Cuda<T>) -> Self {
        CudaEventClock { backend }
    }
}

#[cfg(any(feature = "cuda", feature = "sim"))]
impl<T: crate::backend::cuda::Elem> PhaseClock for CudaEventClock<'_, T> {
    type Mark = crate::backend::cuda::Event;

    fn mark(&self) -> Result<Self::Mark> {
        self.backend.record_event()
    }

    fn seconds(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64> {
        start.seconds_to(end)
    }

    fn describe(&self) -> &'static str {
        "CUDA events"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_times_a_sleep() {
        let ((), s) = WallClock
            .time(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                Ok(())
            })
            .unwrap();
        assert!((0.019..5.0).contains(&s), "{s}");
    }
}
