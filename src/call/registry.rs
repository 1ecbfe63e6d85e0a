//! The live calls, as the HTTP API and `/health` see them.
//!
//! [`CallRegistry`] is written by the call drivers (a call's entry is added when it is
//! answered, its language and state updated when they change, removed when it ends) and read
//! by the API. It holds no call state beyond what it shows: an admin's hang-up reaches the call
//! through the entry's cancellation token.

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the registry knows of a live call (for /health and the admin API).
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub call_id: String,
    pub caller: String,
    pub started: Instant,
    pub rtp_port: u16,
    pub language: String,
    /// The menu the caller is in, or what is happening (`filing`, `emergency`...).
    pub state: String,
    /// Cancelled by an admin to hang the call up.
    pub hangup: CancellationToken,
    /// Cancelled when the operator the caller is talking to sends them to 911.
    pub to_911: CancellationToken,
}

/// Live calls, shared with the HTTP API.
#[derive(Debug, Default)]
pub struct CallRegistry {
    calls: DashMap<u64, CallInfo>,
    next: AtomicU64,
    pub completed: AtomicU64,
    pub rejected: AtomicU64,
    /// RTP packets received from callers / sent to them, and keys heard, over finished calls.
    pub rtp_in: AtomicU64,
    pub rtp_out: AtomicU64,
    pub digits: AtomicU64,
}

impl CallRegistry {
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn snapshot(&self) -> Vec<CallInfo> {
        self.calls.iter().map(|c| c.value().clone()).collect()
    }

    pub(crate) fn insert(&self, info: CallInfo) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.calls.insert(id, info);
        id
    }

    /// Hang up the call with this Call-ID (admin). False if there is none.
    pub fn hangup(&self, call_id: &str) -> bool {
        match self.calls.iter().find(|c| c.value().call_id == call_id) {
            Some(c) => {
                c.value().hangup.cancel();
                true
            }
            None => false,
        }
    }

    /// Hang up the call the registry knows as `id` (the queue's caller id), e.g. for the
    /// operator it is connected to. False if there is none.
    pub fn hangup_id(&self, id: u64) -> bool {
        match self.calls.get(&id) {
            Some(c) => {
                c.hangup.cancel();
                true
            }
            None => false,
        }
    }

    /// Send the caller of call `id` (the queue's caller id), who is talking to an operator,
    /// to 911 the way the menu would. False if there is no such call.
    pub fn send_to_911(&self, id: u64) -> bool {
        match self.calls.get(&id) {
            Some(c) => {
                c.to_911.cancel();
                true
            }
            None => false,
        }
    }

    /// The token [`CallRegistry::send_to_911`] cancels for call `id`.
    pub(crate) fn to_911_token(&self, id: u64) -> CancellationToken {
        self.calls
            .get(&id)
            .map(|c| c.to_911.clone())
            .unwrap_or_default()
    }

    pub(crate) fn update(&self, id: u64, language: &str, state: &str) {
        if let Some(mut c) = self.calls.get_mut(&id) {
            if c.language != language {
                c.language = language.to_owned();
            }
            if c.state != state {
                c.state = state.to_owned();
            }
        }
    }

    /// The token that hangs call `id` up ([`CallRegistry::hangup`]).
    pub(crate) fn hangup_token(&self, id: u64) -> CancellationToken {
        self.calls
            .get(&id)
            .map(|c| c.hangup.clone())
            .unwrap_or_default()
    }

    pub(crate) fn remove(&self, id: u64) {
        if self.calls.remove(&id).is_some() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
