//! Errors the public API returns, each with a message that says what to change.

use tonic::Status;

/// An API request failed; its `From` conversion into `tonic::Status` picks the gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A VM of that name exists already.
    #[error("a VM named {name} exists already; choose another name")]
    AlreadyExists {
        /// The name.
        name: String,
    },
    /// An ISO of that name is in the library already.
    #[error(
        "the ISO library has an ISO named {name} already; delete it first or choose another name"
    )]
    IsoExists {
        /// The name.
        name: String,
    },
    /// The library has no ISO of that name.
    #[error("the ISO library has no ISO named {name}; `pvctl iso-list` lists them")]
    IsoNotFound {
        /// The name asked for.
        name: String,
    },
    /// The VM has no snapshot with that ID.
    #[error("VM {vm} has no snapshot {id}; `pvctl vm-snapshot-list {vm}` lists them")]
    SnapshotNotFound {
        /// The VM.
        vm: String,
        /// The ID asked for.
        id: String,
    },
    /// The request conflicts with the VM's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A field of the request is invalid.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `vcpus` or `disks[2].size`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A failure inside the pair that the caller cannot fix by changing the request.
    #[error("{0}")]
    Internal(String),
    /// No VM has that name or UUID.
    #[error("no VM named {vm}; `pvctl vm-info` lists the VMs")]
    NotFound {
        /// The name or UUID asked for.
        vm: String,
    },
    /// The pair lacks a resource for the request.
    #[error(
        "not enough {resource}: the request needs {needed}{unit} but only {available}{unit} are free on the smaller node ({node}); {hint}"
    )]
    ResourceExhausted {
        /// The resource, e.g. "vCPUs".
        resource: String,
        /// What the request needs, overhead included.
        needed: u64,
        /// What is free.
        available: u64,
        /// Unit suffix, e.g. " MiB".
        unit: &'static str,
        /// The limiting node.
        node: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// No open alert has that ID.
    #[error("no open alert {0}; `pvctl alerts` lists them with their IDs")]
    AlertNotFound(String),
    /// No token has that ID (the message says so).
    #[error("{0}")]
    TokenNotFound(String),
    /// The pair cannot serve the request now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// An invalid-argument error.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        ApiError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::AlreadyExists { .. } | ApiError::IsoExists { .. } => {
                Status::already_exists(message)
            }
            ApiError::IsoNotFound { .. }
            | ApiError::SnapshotNotFound { .. }
            | ApiError::TokenNotFound(_)
            | ApiError::AlertNotFound(_) => Status::not_found(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::InvalidArgument { .. } => Status::invalid_argument(message),
            ApiError::Internal(_) => Status::internal(message),
            ApiError::NotFound { .. } => Status::not_found(message),
            ApiError::ResourceExhausted { .. } => Status::resource_exhausted(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
        }
    }
}

impl From<crate::agents::Error> for ApiError {
    /// An agent's refusal of a bad request is the caller's to fix; anything else is the pair's.
    fn from(e: crate::agents::Error) -> ApiError {
        let message = chain(&e);
        match e {
            crate::agents::Error::Call {
                code:
                    tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::AlreadyExists
                    | tonic::Code::NotFound
                    | tonic::Code::ResourceExhausted,
                ..
            } => ApiError::FailedPrecondition(message),
            _ => ApiError::Unavailable(message),
        }
    }
}

/// An error and its causes joined with ": ", for messages and logs.
pub use daemon::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_exhausted_names_resource_and_maps_code() {
        let err = ApiError::ResourceExhausted {
            resource: "memory".into(),
            needed: 1229,
            available: 1000,
            unit: " MiB",
            node: "n1".into(),
            hint: "stop or shrink another VM",
        };

        let status = Status::from(err);

        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "not enough memory: the request needs 1229 MiB but only 1000 MiB are free on the smaller node (n1); stop or shrink another VM"
        );
    }
}
