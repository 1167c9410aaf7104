//! L4 authorization: [`proto::rbac`], shared with the CA (which explains decisions with the same
//! code, see `ambientctl explain`).

pub use proto::rbac::*;
