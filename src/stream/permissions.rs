//! Permission violations the server reported on this process's connections. A request the
//! server refuses gets no reply and times out like a slow server would; the violation arrives
//! on its own, as an error event. Requests that time out look here to tell "forbidden", which
//! retrying cannot fix, from "slow".

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many recent violations are remembered.
const KEEP: usize = 64;

static RECENT: Mutex<VecDeque<(Instant, String)>> = Mutex::new(VecDeque::new());

/// Records a server error if it is a permissions violation; returns whether it was one.
pub fn record(server_error: &str) -> bool {
    if !server_error
        .to_ascii_lowercase()
        .contains("permissions violation")
    {
        return false;
    }
    if let Ok(mut r) = RECENT.lock() {
        if r.len() == KEEP {
            r.pop_front();
        }
        r.push_back((Instant::now(), server_error.to_string()));
    }
    true
}

/// The newest violation within `within` whose text contains any of `needles`.
pub fn recent(needles: &[&str], within: Duration) -> Option<String> {
    let r = RECENT.lock().ok()?;
    r.iter()
        .rev()
        .take_while(|(t, _)| t.elapsed() <= within)
        .find(|(_, text)| needles.iter().any(|n| text.contains(n)))
        .map(|(_, text)| text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_are_remembered_and_matched_by_subject() {
        assert!(!record("nats: slow consumer"));
        assert!(record(
            "Permissions Violation for Publish to \"$JS.API.STREAM.INFO.OBJ_unit-test-bucket\""
        ));
        let hit = recent(&["OBJ_unit-test-bucket"], Duration::from_secs(60));
        assert!(hit.is_some_and(|t| t.contains("Publish to")));
        assert!(recent(&["OBJ_other-bucket"], Duration::from_secs(60)).is_none());
        assert!(recent(&["OBJ_unit-test-bucket"], Duration::ZERO).is_none());
    }
}
