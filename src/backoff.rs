//! How long to wait before trying again to reach something that went away (the database, a
//! server).
//!
//! Waits grow exponentially to a cap and are jittered, so that the clients of a restarted
//! server do not all come back at the same instant. A [`Backoff`] never gives up: deciding
//! which failures are definite is the caller's business. It starts over after
//! [`Backoff::reset`], which callers use once a connection proved healthy.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff with jitter: the nominal delay starts at `first`, doubles per attempt up
/// to `max`, and each wait is drawn from [delay/2, delay), so `max` is the longest wait.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        // backon's jitter adds up to the whole delay on top of it: halving its bounds turns
        // that into [delay/2, delay).
        let builder = ExponentialBuilder::new()
            .with_min_delay(first.min(max) / 2)
            .with_max_delay(max / 2)
            .with_jitter()
            .without_max_times();
        Self { builder, delays: builder.build(), max }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Without a maximum number of attempts the delays do not run out.
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts over from the first delay.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// The first and the longest wait of [`patiently`]: short at first (a database that is just
/// starting), never longer than the publisher's default reconnect cap.
const PATIENT_FIRST: Duration = Duration::from_millis(200);
const PATIENT_MAX: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds or fails for good, waiting between transient failures
/// (what `transient` says) and saying what it waits for, once per distinct error: a database
/// that is still starting is waited for, visibly, instead of ending the program.
pub async fn patiently<T, E: std::fmt::Display>(
    what: &str,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut backoff = Backoff::new(PATIENT_FIRST, PATIENT_MAX);
    let mut said = String::new();
    loop {
        match attempt().await {
            Err(err) if transient(&err) => {
                let error = err.to_string();
                if error != said {
                    tracing::warn!(error = %error, "waiting for {what}");
                    said = error;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(100);

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(FIRST, Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= FIRST, "{delays:?}");
        assert!(delays[3] >= Duration::from_millis(400), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)), "{delays:?}");
        assert!(delays[7] >= Duration::from_secs(1), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST);
    }

    #[test]
    fn never_gives_up_and_never_waits_past_the_cap() {
        let mut backoff = Backoff::new(FIRST, Duration::from_secs(30));
        for _ in 0..10_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
        let mut short = Backoff::new(FIRST, Duration::from_millis(10));
        assert!(short.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn jitter_differs_between_backoffs() {
        // A fixed seed would bring every client of a restarted server back at once.
        let waits = |_| {
            let mut backoff = Backoff::new(FIRST, Duration::from_secs(30));
            (0..8).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        let first = waits(0);
        assert!((1..5).map(waits).any(|w| w != first));
    }
}
