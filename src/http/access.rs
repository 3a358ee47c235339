//! Bearer-token access (docs/api.md, "Access"). Ingest tokens may POST /data and POST
//! /consents; read tokens may GET /data; privacy tokens may erase customers and read
//! receipts and the audit trail, and nothing else; all three may ask where a dialog's
//! consent stands (a read token of granted dialogs only, which the handler checks). No
//! or unknown token: 401 with `WWW-Authenticate: Bearer`; a token of another role: 403.
//! With no tokens configured the service is open. Tokens are compared in constant time
//! and never logged.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::Tokens;

/// Which role a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Read,
    Privacy,
    /// `GET /consents/{dialogId}`: an ingest, a privacy or a read token.
    Status,
}

/// Whose token a request carries, for the handlers that answer differently by role
/// (`GET /consents/{dialogId}`: a read token sees granted dialogs only). The guard puts
/// it in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No tokens are configured: everyone may do everything.
    Open,
    Ingest,
    Read,
    Privacy,
}

/// The configured tokens, as bytes ready for comparison.
#[derive(Clone)]
pub struct Access {
    ingest: Arc<[Vec<u8>]>,
    read: Arc<[Vec<u8>]>,
    privacy: Arc<[Vec<u8>]>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("ingest", &self.ingest.len())
            .field("read", &self.read.len())
            .field("privacy", &self.privacy.len())
            .finish()
    }
}

impl Access {
    pub fn new(tokens: &Tokens) -> Self {
        let bytes = |list: &[String]| list.iter().map(|t| t.as_bytes().to_vec()).collect::<Arc<[_]>>();
        Self {
            ingest: bytes(&tokens.ingest),
            read: bytes(&tokens.read),
            privacy: bytes(&tokens.privacy),
        }
    }

    pub fn is_open(&self) -> bool {
        self.ingest.is_empty() && self.read.is_empty() && self.privacy.is_empty()
    }

    /// Decides whether `authorization` (the header's value) may act as `role`, and whose
    /// token it is.
    pub fn check(&self, role: Role, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let token = authorization.and_then(bearer_token).ok_or(ApiError::Unauthorized)?;
        // Compare against every token, whatever matches early, so the time taken says
        // nothing about which token (or how much of one) matched.
        let matches = |tokens: &[Vec<u8>]| {
            bool::from(
                tokens
                    .iter()
                    .fold(subtle::Choice::from(0), |hit, t| hit | t.as_slice().ct_eq(token)),
            )
        };
        let (ingest, read, privacy) = (matches(&self.ingest), matches(&self.read), matches(&self.privacy));
        match role {
            Role::Ingest if ingest => Ok(Caller::Ingest),
            Role::Read if read => Ok(Caller::Read),
            Role::Privacy if privacy => Ok(Caller::Privacy),
            Role::Status if ingest => Ok(Caller::Ingest),
            Role::Status if privacy => Ok(Caller::Privacy),
            Role::Status if read => Ok(Caller::Read),
            _ if ingest || read || privacy => Err(ApiError::Forbidden),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(&Tokens {
            ingest: vec!["in-1".into(), "in-2".into()],
            read: vec!["rd".into()],
            privacy: vec!["pv".into()],
        })
    }

    #[test]
    fn roles_are_checked_per_token() {
        let a = access();
        assert!(a.check(Role::Ingest, Some(b"Bearer in-2")).is_ok());
        assert!(a.check(Role::Read, Some(b"bearer rd")).is_ok());
        assert_eq!(a.check(Role::Privacy, Some(b"Bearer pv")).ok(), Some(Caller::Privacy));
        assert_eq!(a.check(Role::Status, Some(b"Bearer rd")).ok(), Some(Caller::Read));
        assert_eq!(a.check(Role::Status, Some(b"Bearer in-1")).ok(), Some(Caller::Ingest));
        assert_eq!(a.check(Role::Status, Some(b"Bearer pv")).ok(), Some(Caller::Privacy));
        for (role, token) in [
            (Role::Ingest, &b"Bearer pv"[..]),
            (Role::Read, b"Bearer pv"),
            (Role::Privacy, b"Bearer in-1"),
            (Role::Privacy, b"Bearer rd"),
        ] {
            assert!(
                matches!(a.check(role, Some(token)), Err(ApiError::Forbidden)),
                "{role:?}"
            );
        }
        assert!(matches!(
            a.check(Role::Read, Some(b"Bearer in-1")),
            Err(ApiError::Forbidden)
        ));
        assert!(matches!(
            a.check(Role::Ingest, Some(b"Bearer rd")),
            Err(ApiError::Forbidden)
        ));
        for bad in [
            None,
            Some(&b"Bearer "[..]),
            Some(b"Basic aW4tMQ=="),
            Some(b"in-1"),
            Some(b"Bearer in-3"),
        ] {
            assert!(
                matches!(a.check(Role::Ingest, bad), Err(ApiError::Unauthorized)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let open = Access::new(&Tokens::default());
        assert!(open.is_open());
        assert!(open.check(Role::Ingest, None).is_ok());
    }
}
