//! What every client of a remote service shares (embedders, verifiers, upstream LLMs): a
//! circuit breaker, so a dead service costs nothing per request, and the API key read from a
//! mounted Secret or a variable into a `SecretString` that never reaches a log line.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use secrecy::SecretString;

/// Closed → open after `threshold` consecutive failures → after `cooldown`, calls go through
/// again; one more failure reopens it at once, a success closes it.
pub struct Breaker {
    failures: AtomicU32,
    opened_at: Mutex<Option<Instant>>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            opened_at: Mutex::new(None),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    pub fn allows(&self) -> bool {
        self.opened_at
            .lock()
            .is_none_or(|t| t.elapsed() >= self.cooldown)
    }

    pub fn is_open(&self) -> bool {
        !self.allows()
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.opened_at.lock() = None;
    }

    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            *self.opened_at.lock() = Some(Instant::now());
        }
    }
}

/// The API key from `file` (a mounted Secret), else from the variable `env`; `None` when
/// neither is set. A failure names where it looked: `(where, why)`.
pub fn api_key(
    file: Option<&str>,
    env: Option<&str>,
) -> Result<Option<SecretString>, (String, String)> {
    if let Some(path) = file {
        let key = std::fs::read_to_string(path).map_err(|e| {
            (
                path.to_owned(),
                format!("failed to read the API key file: {e}"),
            )
        })?;
        return Ok(Some(SecretString::from(key.trim().to_owned())));
    }
    if let Some(var) = env {
        let key = std::env::var(var).map_err(|_| {
            (
                format!("${var}"),
                "the API key variable is not set".to_owned(),
            )
        })?;
        return Ok(Some(SecretString::from(key.trim().to_owned())));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_secs(60));
        b.failure();
        b.failure();
        assert!(b.allows());
        b.success();
        b.failure();
        b.failure();
        assert!(b.allows(), "a success resets the count");
        b.failure();
        assert!(b.is_open());
        let quick = Breaker::new(1, Duration::ZERO);
        quick.failure();
        assert!(
            quick.allows(),
            "after the cool-down a trial call goes through"
        );
    }
}
