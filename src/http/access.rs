//! Bearer-token access (docs/api.md, "Access"). Ingest tokens may POST /data and POST
//! /consents; read tokens may GET /data. No or unknown token: 401 with
//! `WWW-Authenticate: Bearer`; a token of the other role: 403. With no tokens configured
//! the service is open. Tokens are compared in constant time and never logged.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::Tokens;

/// Which role a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Read,
}

/// The configured tokens, as bytes ready for comparison.
#[derive(Clone)]
pub struct Access {
    ingest: Arc<[Vec<u8>]>,
    read: Arc<[Vec<u8>]>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("ingest", &self.ingest.len())
            .field("read", &self.read.len())
            .finish()
    }
}

impl Access {
    pub fn new(tokens: &Tokens) -> Self {
        let bytes = |list: &[String]| list.iter().map(|t| t.as_bytes().to_vec()).collect::<Arc<[_]>>();
        Self {
            ingest: bytes(&tokens.ingest),
            read: bytes(&tokens.read),
        }
    }

    pub fn is_open(&self) -> bool {
        self.ingest.is_empty() && self.read.is_empty()
    }

    /// Decides whether `authorization` (the header's value) may act as `role`.
    pub fn check(&self, role: Role, authorization: Option<&[u8]>) -> Result<(), ApiError> {
        if self.is_open() {
            return Ok(());
        }
        let token = authorization.and_then(bearer_token).ok_or(ApiError::Unauthorized)?;
        // Compare against every token, whatever matches early, so the time taken says
        // nothing about which token (or how much of one) matched.
        let matches = |tokens: &[Vec<u8>]| {
            tokens
                .iter()
                .fold(subtle::Choice::from(0), |hit, t| hit | t.as_slice().ct_eq(token))
        };
        let (is_ingest, is_read) = (bool::from(matches(&self.ingest)), bool::from(matches(&self.read)));
        match (role, is_ingest, is_read) {
            (Role::Ingest, true, _) | (Role::Read, _, true) => Ok(()),
            (_, false, false) => Err(ApiError::Unauthorized),
            _ => Err(ApiError::Forbidden),
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
        })
    }

    #[test]
    fn roles_are_checked_per_token() {
        let a = access();
        assert!(a.check(Role::Ingest, Some(b"Bearer in-2")).is_ok());
        assert!(a.check(Role::Read, Some(b"bearer rd")).is_ok());
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
