//! Bounded polling: every wait in a test has a limit and a name, so a hang becomes a failure
//! that says what never happened.

use std::time::{Duration, Instant};

use anyhow::bail;

/// The default bound of a wait: long enough for a loaded CI machine, short enough that a
/// broken test fails in reasonable time.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` (blocking) every 100 ms until it holds, for at most [`WAIT`]; an error from
/// `cond` ends the wait at once.
pub fn wait(what: &str, mut cond: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `cond` (async) every 20 ms until it holds, for at most [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn eventually_names_what_never_happened() {
        let err = eventually("the moon", || false).await.err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("timed out waiting for the moon")
        );
        let mut polls = 0;
        assert!(eventually("three polls", || {
            polls += 1;
            polls == 3
        })
        .await
        .is_ok());
    }

    #[test]
    fn wait_stops_at_the_first_error() {
        let mut calls = 0;
        let out = wait("x", || {
            calls += 1;
            anyhow::bail!("broken")
        });
        assert!(out.is_err());
        assert_eq!(calls, 1);
    }
}
