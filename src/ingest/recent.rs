//! Which dialogs this process staged lately — and whether asking PostgreSQL *before*
//! Redis about the others pays off.
//!
//! A dialog's first message used to cost two script calls: the first answers 'unknown'
//! (Redis does not know the dialog), then PostgreSQL is asked whether it holds the dialog
//! as granted, then the second call creates it. A dialog this process has not staged
//! lately is most likely new, so [`super::stage()`] asks PostgreSQL first and hands the answer
//! to the one script call (which ignores it when Redis knows the dialog after all: the
//! same as when another process created it between the two calls). That saves the first
//! call, ~100k of Redis's instructions, for every new dialog (BENCHMARKS.md).
//!
//! It costs a lookup for a dialog that Redis knows but this process has not seen: after a
//! restart, or behind a load balancer that spreads a dialog's messages over processes.
//! So the outcome is counted, and when most lookups of the last [`WINDOW`] found the
//! dialog known, asking first stops for the next [`PAUSE`] requests (then it is tried
//! again). The counts are approximate under concurrency; only the choice depends on them,
//! never what is staged.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::domain::DialogId;

/// Dialogs remembered per generation; two generations are kept (the current one and the
/// one before), so a dialog is remembered for between one and two generations' worth of
/// other dialogs. Split over [`SHARDS`] locks, so that worker threads seldom meet.
const GENERATION: usize = 1 << 16;
const SHARDS: usize = 16;
/// Outcomes counted before deciding whether asking first pays off.
const WINDOW: u32 = 256;
/// Requests without asking first once it stopped paying off.
const PAUSE: u32 = 100_000;

#[derive(Debug, Default)]
pub struct Recent {
    seen: [Mutex<Generations>; SHARDS],
    paid_off: AtomicU32,
    wasted: AtomicU32,
    paused: AtomicU32,
}

#[derive(Debug, Default)]
struct Generations {
    current: HashSet<DialogId>,
    previous: HashSet<DialogId>,
}

impl Recent {
    /// Whether to ask PostgreSQL first for this request's unseen dialogs (counts a paused
    /// request down).
    pub fn ask_first(&self) -> bool {
        let mut left = self.paused.load(Ordering::Relaxed);
        while left > 0 {
            match self
                .paused
                .compare_exchange_weak(left, left - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return false,
                Err(now) => left = now,
            }
        }
        true
    }

    /// Remembers `dialog` as staged lately; true when it was not.
    pub fn first_sighting(&self, dialog: DialogId) -> bool {
        // Fibonacci hashing: ids with a common stride still spread over the shards.
        const _: () = assert!(SHARDS == 16);
        let shard = (dialog.get() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        let mut seen = self.seen[shard as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.current.contains(&dialog) {
            return false;
        }
        if seen.current.len() >= GENERATION / SHARDS {
            let full = std::mem::take(&mut seen.current);
            seen.previous = full;
        }
        let fresh = !seen.previous.contains(&dialog);
        seen.current.insert(dialog);
        fresh
    }

    /// Counts an asked-first dialog's outcome: `new` when the script created it (the lookup
    /// saved a call), not when Redis knew it (the lookup was wasted).
    pub fn record(&self, new: bool) {
        let (paid_off, wasted) = if new {
            (
                self.paid_off.fetch_add(1, Ordering::Relaxed) + 1,
                self.wasted.load(Ordering::Relaxed),
            )
        } else {
            (
                self.paid_off.load(Ordering::Relaxed),
                self.wasted.fetch_add(1, Ordering::Relaxed) + 1,
            )
        };
        if paid_off + wasted >= WINDOW {
            self.paid_off.store(0, Ordering::Relaxed);
            self.wasted.store(0, Ordering::Relaxed);
            if wasted > paid_off {
                self.paused.store(PAUSE, Ordering::Relaxed);
                tracing::debug!(paid_off, wasted, "asking PostgreSQL first stopped paying off: paused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog(n: i64) -> DialogId {
        DialogId::from_stored(n)
    }

    #[test]
    fn a_dialog_is_a_first_sighting_once_and_forgotten_after_two_generations() {
        let recent = Recent::default();
        assert!(recent.first_sighting(dialog(1)));
        assert!(!recent.first_sighting(dialog(1)));
        for n in 0..(GENERATION / 2) as i64 {
            assert!(recent.first_sighting(dialog(1_000_000 + n)));
        }
        assert!(
            !recent.first_sighting(dialog(1)),
            "half a generation later it is still seen"
        );
        for n in 0..(4 * GENERATION) as i64 {
            recent.first_sighting(dialog(2_000_000 + n));
        }
        assert!(recent.first_sighting(dialog(1)), "generations later it is forgotten");
    }

    #[test]
    fn asking_first_pauses_when_most_lookups_were_wasted_and_resumes_after() {
        let recent = Recent::default();
        for _ in 0..WINDOW {
            recent.record(true);
        }
        assert!(recent.ask_first(), "paying off: keeps asking");
        for n in 0..WINDOW {
            recent.record(n % 4 == 0);
        }
        for _ in 0..PAUSE {
            assert!(!recent.ask_first());
        }
        assert!(recent.ask_first(), "tried again after the pause");
    }
}
