//! Calls: where a SIP dialog, its media, the menu engine and dispatch meet.
//!
//! A call is a sans-IO core driven by a thin async task, like the protocol cores below it
//! (the SIP transactions, the menu engine, the queue):
//!
//! ```text
//!  UA core ──AppEvent::Invite──▶ setup ──answered──▶ driver ◀──▶ core
//!  (sip::ua)                     limits, SDP, port,  owns IO     decides: menu, queue,
//!                                180/200             feeds now   operator leg, 911
//! ```
//!
//! | file | owns | must not touch |
//! | --- | --- | --- |
//! | `setup` | accepting an INVITE: who is calling ([`CallerIdentity`], the trust model), limits, SDP offer/answer, an RTP port, 180 and 200, the delayed offer's ACK | anything after the answer |
//! | `core` | the caller's call: `CallCore` takes inputs (dialog, legs, queue, media notes, results of work done elsewhere, timeouts) with `now` and gives actions; the menu engine inside; timers in one table | sockets, handles, channels, tokio, the clock |
//! | `emergency` | the 911 redirect state machine (audit first; refer → bridge at each address of each route → announce) | the caller's dialog and media (it asks the core) |
//! | `operator_leg` | one operator's leg: offer, ring deadline, answer, re-offers and ACK, hold, the silent-phone probe, BYE | the caller's side, the queue |
//! | `leg` | what every placed leg shares: its id, our SDP on it, the request that places it, how the caller is bridged to it | IO |
//! | `driver` | the call's task: the [`DialogHandle`](crate::sip::ua::DialogHandle), the media clock slot, the legs' dialogs and RTP ports, the queue channel, the recording file, database tasks; carries out the core's actions in order | decisions |
//! | `transfer` | a transfer's state machine (REFER, admin, or a consultation's target): claim an agent, ring a line or agent, or 911 through `emergency`; NOTIFY progress; connected or failed | where the caller goes after a failure (the core decides) |
//! | `dialplan` | the operators' dial plan as a pure function, the `transfers:` config and its checks | calls |
//! | `consult` | an operator's own call from their phone (a consultation, 911 for the caller they hold): routed by the dial plan, its target rung by a `transfer`, handed to the held caller's call on an attended transfer | the held caller's call (it asks through the registry) |
//! | `monitor` | a supervisor's call to listen, whisper or barge on an operator's call (feature codes, `monitor:` config, the audit); the mixing itself is the media clock's ([`crate::media::mix`]) | the caller's call (it asks through the registry) |
//! | `callback` | call-backs that keep the caller's place: their own small core and driver, reusing `operator_leg` and the driver's leg placing | a live call's state |
//! | `facts` | what a call did, noted by the driver as it happens, and the call's row in the call history ([`crate::history`]) | decisions, the clock |
//! | `registry` | [`CallRegistry`], [`CallInfo`]: what `/admin/calls` and `/health` read, and the admin's hang-up | call state beyond what it shows |
//! | `menu_holder` | [`ActiveMenu`], [`MenuHolder`]: the menus and prompts calls start on, one per line, reloads | calls |
//! | `lines` | several lines on one server: the `lines:` config, the dialled number read from an INVITE (which header wins), number matching | menus, calls |
//!
//! Why a core and a driver: everything a call decides, the 911 path above all, is tested on
//! virtual time in milliseconds (`core`, `emergency`, `operator_leg`, `transfer`, `consult` and `callback` have their
//! unit tests), and the driver stays small enough to read in one sitting. The driver does no
//! per-packet work: while the caller is bridged the media clock relays both legs itself.
//! Work whose answer the core needs before anything else happens (a leg's INVITE, the queue's
//! answer, a call-back taking the place) is awaited in the driver and fed straight back, as an
//! input; database work runs in tasks on the server's tracker and reports back later.
//!
//! Why a task per call and not one task per core driving many cores: the per-call task also
//! owns the call's dialog handle, leg channels, media slot and database tasks, so one task
//! driving thousands of cores would need its own timer wheel and channel multiplexing (a second
//! scheduler beside tokio's), for a saving the profile puts at part of the 16.6% tokio spends
//! waking tasks. BENCHMARKS.md ("The call as a sans-IO core: before and after") has the figures.
//!
//! Leg ids (`LegId`) are unique on the server: the driver keys each leg's dialog, port and
//! events on them, and reads the events of the legs the core has not let go of. The core has
//! at most one operator leg and one transfer target, or one 911 leg; nothing in the driver
//! assumes so.

pub(crate) mod callback;
mod consult;
mod core;
pub mod dialplan;
pub(crate) mod driver;
mod emergency;
mod facts;
mod leg;
pub mod lines;
mod menu_holder;
pub mod monitor;
mod operator_leg;
mod registry;
mod setup;
pub(crate) mod transfer;

use crate::media::g711::Codec;
use std::time::Duration;

pub use self::core::EndReason;
pub(crate) use driver::CallContext;
pub use menu_holder::{
    load_active_menu, load_menus, ActiveMenu, LineChoice, MenuHolder, MenuLoadError, DEFAULT_LINE,
};
pub use registry::{CallInfo, CallRegistry};
pub(crate) use setup::accept_calls;
pub use setup::{CallMeta, CallerIdentity};
pub(crate) use transfer::Via as TransferVia;

/// Codecs we offer/accept, in our order of preference when the caller has none.
pub const SUPPORTED_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];
/// Packet time.
pub const PTIME: Duration = Duration::from_millis(20);
