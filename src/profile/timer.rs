//! Phase timers. A profile run asks its [`PhaseClock`] for a mark before and after each phase and
//! for the seconds between the two: the backend's own clock ([`BackendClock`]). On the CPU the
//! marks are wall-clock instants; a device backend's marks are events recorded on its stream (CUDA:
//! `cuEventRecord` with `CU_EVENT_DEFAULT` flags — the default flags disable timing — then
//! `cuEventSynchronize` on the later mark and `cuEventElapsedTime`), so a phase's time is the
//! device's time for the work queued between the marks, not the host's time to queue it.

use crate::backend::{Backend, Mark};
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

/// A backend's own clock ([`Backend::mark`]): wall-clock instants on the CPU, events recorded on
/// the stream on a device.
pub struct BackendClock<'a, B: Backend>(pub &'a B);

impl<B: Backend> PhaseClock for BackendClock<'_, B> {
    type Mark = Mark;

    fn mark(&self) -> Result<Mark> {
        self.0.mark()
    }

    fn seconds(&self, start: &Mark, end: &Mark) -> Result<f64> {
        start.seconds_to(end)
    }

    fn describe(&self) -> &'static str {
        self.0.clock_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_clock_times_a_sleep() {
        let cpu = crate::backend::cpu::Cpu::default();
        let clock = BackendClock(&cpu);
        assert_eq!(clock.describe(), "wall clock");
        let ((), s) = clock
            .time(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                Ok(())
            })
            .unwrap();
        assert!((0.019..5.0).contains(&s), "{s}");
    }
}
