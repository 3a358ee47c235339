//! The request path's decisions, beside the flusher: staging messages ([`stage()`]: asking
//! Redis, and PostgreSQL for the dialogs Redis does not know — new, forgotten, refused,
//! a retry of a stored messageId), and recording a consent decision ([`decide()`]:
//! reviving a dialog Redis forgot, erasing a refusal). `http` reads requests into the
//! domain's types, calls these, and maps their outcomes to statuses and problems.

mod consent;
mod recent;
mod stage;

pub use consent::{ConsentError, decide};
pub use recent::Recent;
pub use stage::{IngestPath, Offer, stage};
