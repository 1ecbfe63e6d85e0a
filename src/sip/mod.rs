//! SIP (RFC 3261): wire format, transports, transactions, dialogs and the UA core.
//!
//! Ground floor: imports nothing from `call`, `dispatch`, `api`, `server` or `config`; each
//! module owns its settings types (`registrar:`, `trunks:`, `dns:`), which `config` aggregates.
//! Besides the modules below, `session_timer` (crate-private) reads and writes RFC 4028
//! session timers for the UA core.

pub mod dialog;
pub mod guard;
pub mod message;
pub(crate) mod refer;
pub mod registrar;
pub mod resolve;
pub(crate) mod session_timer;
pub mod transaction;
pub mod transport;
pub mod trunk;
pub mod ua;
