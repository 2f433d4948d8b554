//! How fast one client may send frames (SPEC §5: `rate_limited`, then 1008 for sustained
//! abuse).
//!
//! A token bucket admits bursts up to `--message-burst` and `--message-rate` frames a second
//! on average. A refused frame is answered, not dropped silently, so a client learns to slow
//! down; only a client that keeps flooding after being told is closed. Time is tokio's, so
//! tests drive it with a paused clock.

/// A token bucket for client frames. Frames beyond it are refused; refusals fill an abuse
/// meter that drains at the allowed rate, and a full meter (a client that keeps flooding)
/// ends the connection.
pub(super) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    abuse: f64,
    at: tokio::time::Instant,
}

/// The abuse meter drains at the rate divided by this: a client that keeps sending faster
/// than the rate fills it sooner or later, however slightly faster.
const ABUSE_DRAIN_DIVISOR: f64 = 10.0;
/// Refusals the meter holds, in bursts, before the connection is closed with 1008.
const ABUSE_LIMIT_BURSTS: f64 = 2.0;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Allowed,
    Limited,
    Abusive,
}

impl RateLimit {
    pub(super) fn new(rate: u32, burst: u32) -> Self {
        let (rate, burst) = (f64::from(rate.max(1)), f64::from(burst.max(1)));
        Self { rate, burst, tokens: burst, abuse: 0.0, at: tokio::time::Instant::now() }
    }

    pub(super) fn take(&mut self) -> Verdict {
        let now = tokio::time::Instant::now();
        let elapsed = (now - self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.abuse = (self.abuse - elapsed * self.rate / ABUSE_DRAIN_DIVISOR).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        self.abuse += 1.0;
        if self.abuse > ABUSE_LIMIT_BURSTS * self.burst {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refuses_then_closes_a_flood_but_not_a_burst() {
        let mut limit = RateLimit::new(10, 5);
        for _ in 0..5 {
            assert_eq!(limit.take(), Verdict::Allowed);
        }
        assert_eq!(limit.take(), Verdict::Limited);
        tokio::time::advance(std::time::Duration::from_millis(1000)).await;
        for _ in 0..5 {
            assert_eq!(limit.take(), Verdict::Allowed, "refilled");
        }
        let verdicts: Vec<Verdict> = (0..20).map(|_| limit.take()).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Limited).count(), 10);
        assert_eq!(verdicts.last(), Some(&Verdict::Abusive));
    }
}
