use super::*;
use crate::storage;

#[test]
fn uuid_invalid_accepts_canonical_uuid() {
    let invalid = uuid_invalid("6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11");

    assert!(!invalid);
}

#[test]
fn plain_name_rejects_parent_directory() {
    let plain = plain_name("..");

    assert!(!plain);
}

#[test]
fn uuid_invalid_rejects_path_characters() {
    let invalid = uuid_invalid("../../../../etc/passwd-aaaaaaaaaaaaa");

    assert!(invalid);
}

#[test]
fn status_from_unknown_group_is_invalid_argument() {
    let err = Error::Storage(storage::Error::UnknownGroup {
        name: "x".into(),
        known: "sg0".into(),
    });

    let status = Status::from(err);

    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn status_without_replica_service_is_failed_precondition() {
    let err = Error::NoReplicaService {
        op: "export-replica",
    };

    let status = Status::from(err);

    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

#[test]
fn status_from_running_domain_is_failed_precondition() {
    let err = Error::Libvirt(libvirt::Error::DomainRunning { uuid: "u".into() });

    let status = Status::from(err);

    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}
