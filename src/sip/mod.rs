//! SIP (RFC 3261): wire format, transports, transactions, dialogs and the UA core.
//!
//! Ground floor: imports nothing from `call`, `dispatch` or `api`.

pub mod dialog;
pub mod guard;
pub mod message;
pub mod registrar;
pub mod resolve;
pub(crate) mod session_timer;
pub mod transaction;
pub mod transport;
pub mod trunk;
pub mod ua;
