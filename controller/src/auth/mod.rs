//! Who may call the public API. Every call carries a token ([`proto::auth::Token`]); the
//! pair keeps only hashes of tokens, in etcd (made through the API) and in the controllers'
//! token file (the install's first admin token). [`policy`] says which role each method
//! needs, [`tokens`] checks a token, and [`guard`] refuses a call before it reaches the API.

pub mod guard;
pub mod policy;
pub mod tokens;

pub use proto::auth::Role;

/// The caller of an admitted call, as the guard found it (in the call's extensions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's ID ("" without authentication).
    pub token_id: String,
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The gRPC method called, e.g. "CreateVm".
    pub method: String,
}

impl Caller {
    /// The caller of every call when the API runs without tokens (tests only).
    pub fn anonymous(method: &str) -> Caller {
        Caller {
            token_id: String::new(),
            name: "anonymous".to_string(),
            role: Role::Admin,
            method: method.to_string(),
        }
    }

    /// Whether the call goes into the audit log: every call that needs an admin.
    pub fn audited(&self) -> bool {
        policy::needs(&self.method) == Role::Admin
    }
}
