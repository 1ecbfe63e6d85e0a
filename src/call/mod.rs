//! Calls: where a SIP dialog, its media, the menu engine and dispatch meet.

pub(crate) mod callback;
mod core;
pub(crate) mod driver;
mod emergency;
mod leg;
mod menu_holder;
mod operator_leg;
mod registry;
mod setup;

use crate::media::g711::Codec;
use std::time::Duration;

pub use self::core::EndReason;
pub(crate) use driver::CallContext;
pub use menu_holder::{load_active_menu, ActiveMenu, MenuHolder, MenuLoadError};
pub use registry::{CallInfo, CallRegistry};
pub(crate) use setup::accept_calls;
pub use setup::{CallMeta, CallerIdentity};

/// Codecs we offer/accept, in our order of preference when the caller has none.
pub const SUPPORTED_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];
/// Packet time.
pub const PTIME: Duration = Duration::from_millis(20);
