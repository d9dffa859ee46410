//! Access tokens of the public API: their text form (`pvt_<id>_<secret>`), how a client
//! presents one (`authorization: Bearer …`) and what the pair keeps of it (the SHA-256 of
//! its secret, never the secret).

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key carrying a call's token.
pub const AUTHORIZATION: &str = "authorization";
/// Prefix of every token's text.
const PREFIX: &str = "pvt_";
/// Random bytes of a token's ID (shown in lists and logs).
const ID_BYTES: usize = 6;
/// Random bytes of a token's secret.
const SECRET_BYTES: usize = 32;

/// A token that is not of the form `pvt_<id>_<secret>`.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The text is not a token.
    #[error(
        "not a Pairvisor token (expected pvt_<12 hex digits>_<64 hex digits>, as `pvctl token-create` prints)"
    )]
    Malformed,
    /// The system's random source failed.
    #[error("drawing a token's random bytes: {0}")]
    Random(String),
}

/// A token: its public ID and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Public part: names the token in lists and the audit log.
    pub id: String,
    /// Secret part, hex.
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}_{}", self.id, self.secret)
    }
}

impl Token {
    /// A new token from the system's random source.
    pub fn generate() -> Result<Token, TokenError> {
        let mut bytes = [0u8; ID_BYTES + SECRET_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
        Ok(Token {
            id: hex(&bytes[..ID_BYTES]),
            secret: hex(&bytes[ID_BYTES..]),
        })
    }

    /// Parses a token's text (surrounding whitespace, as in a file, is ignored).
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed)?;
        let hex_of = |s: &str, bytes: usize| {
            s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex_of(id, ID_BYTES) || !hex_of(secret, SECRET_BYTES) {
            return Err(TokenError::Malformed);
        }
        Ok(Token {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// What the pair stores to check this token: the SHA-256 of its secret, hex.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether this token's secret hashes to `stored` (compared in constant time).
    pub fn matches(&self, stored: &str) -> bool {
        let ours = self.hash();
        ours.len() == stored.len()
            && ours
                .bytes()
                .zip(stored.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The token as a call's `authorization` value.
    pub fn bearer(&self) -> Bearer {
        Bearer {
            // A token's text is ASCII letters, digits and '_' by construction.
            value: format!("Bearer {self}").parse().ok(),
        }
    }
}

/// The token a call carries: `None` without an `authorization` header; an error for one
/// that is not `Bearer <token>`.
pub fn presented(metadata: &MetadataMap) -> Option<Result<Token, TokenError>> {
    let value = metadata.get(AUTHORIZATION)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(TokenError::Malformed)
            .and_then(Token::parse),
    )
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Every method.
    Admin,
    /// Only the methods that change nothing.
    ReadOnly,
}

impl Role {
    /// The role's name, as pvctl takes and prints it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    /// Whether this role may call a method that needs `needed`.
    pub fn may(self, needed: Role) -> bool {
        self == Role::Admin || needed == Role::ReadOnly
    }

    /// The role of the API's enum; `None` for an unspecified one.
    pub fn from_pb(role: crate::v1::Role) -> Option<Role> {
        match role {
            crate::v1::Role::Admin => Some(Role::Admin),
            crate::v1::Role::ReadOnly => Some(Role::ReadOnly),
            crate::v1::Role::Unspecified => None,
        }
    }

    /// The API's enum of this role.
    pub fn to_pb(self) -> crate::v1::Role {
        match self {
            Role::Admin => crate::v1::Role::Admin,
            Role::ReadOnly => crate::v1::Role::ReadOnly,
        }
    }
}

/// What the pair keeps of a token (in etcd, or in the controllers' token file): never its
/// secret, only the secret's SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// The token's public ID.
    pub id: String,
    /// Whose or what it is for.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of its secret, hex.
    pub sha256: String,
    /// When it was made.
    pub created_unix_ms: i64,
    /// The name of the token that made it ("install" for the first admin token).
    #[serde(default)]
    pub created_by: String,
}

impl TokenRecord {
    /// The record of `token`.
    pub fn of(token: &Token, name: &str, role: Role, created_by: &str, now_unix_ms: i64) -> Self {
        TokenRecord {
            id: token.id.clone(),
            name: name.to_string(),
            role,
            sha256: token.hash(),
            created_unix_ms: now_unix_ms,
            created_by: created_by.to_string(),
        }
    }
}

/// Adds a token to every call of a client (`PairvisorClient::with_interceptor`). The
/// default adds none: its calls are refused as unauthenticated unless the API runs without
/// tokens.
#[derive(Clone, Debug, Default)]
pub struct Bearer {
    value: Option<MetadataValue<Ascii>>,
}

impl Bearer {
    /// Adds the token to `request`.
    pub fn apply<T>(&self, request: &mut Request<T>) {
        if let Some(value) = &self.value {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.apply(&mut request);
        Ok(request)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_token_parses_back_and_matches_its_hash() {
        let token = Token::generate().unwrap();

        let parsed = Token::parse(&format!("  {token}\n")).unwrap();

        assert_eq!(parsed, token);
        assert!(parsed.matches(&token.hash()));
    }

    #[test]
    fn another_secret_does_not_match() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();

        assert!(!b.matches(&a.hash()));
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = Token::generate().unwrap().to_string();
        let upper = good.to_uppercase().replace("PVT_", "pvt_");
        let short = &good[..good.len() - 1];

        for bad in [
            "",
            "pvt_",
            "Bearer x",
            short,
            &upper,
            &good.replace("pvt_", "pvx_"),
        ] {
            assert!(
                matches!(Token::parse(bad), Err(TokenError::Malformed)),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn read_only_may_only_read() {
        assert!(Role::ReadOnly.may(Role::ReadOnly));
        assert!(!Role::ReadOnly.may(Role::Admin));
        assert!(Role::Admin.may(Role::Admin));
        assert!(Role::Admin.may(Role::ReadOnly));
    }

    #[test]
    fn bearer_header_is_read_back() {
        let token = Token::generate().unwrap();
        let mut request = Request::new(());

        token.bearer().apply(&mut request);

        assert_eq!(presented(request.metadata()).unwrap().unwrap(), token);
    }

    #[test]
    fn missing_or_foreign_authorization_is_told_apart() {
        let mut basic = Request::new(());
        basic
            .metadata_mut()
            .insert(AUTHORIZATION, MetadataValue::from_static("Basic YTpi"));

        assert!(presented(Request::new(()).metadata()).is_none());
        assert!(matches!(
            presented(basic.metadata()),
            Some(Err(TokenError::Malformed))
        ));
    }
}
