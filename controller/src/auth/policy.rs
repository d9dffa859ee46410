//! Which role each public API method needs. A method that is not listed as read-only needs
//! an admin: a method added later is closed until someone opens it here.

use super::Role;

/// The methods a read-only token may call: they change nothing and reveal no disk content
/// (ExportVm does) nor who holds access (ListTokens, ListAudit).
const READ_ONLY: [&str; 11] = [
    "GetVm",
    "ListVms",
    "ListNodes",
    "ListAlerts",
    "GetHealthConfig",
    "WatchEvents",
    "StreamConsole",
    "ScreenshotVm",
    "ListSnapshots",
    "ListIsos",
    "WhoAmI",
];

/// Plain HTTP paths of the API port that any token may read (`/health` needs none).
const READ_ONLY_PATHS: [&str; 1] = ["/metrics"];

/// The role method `method` (its gRPC name, e.g. "CreateVm", or an HTTP path) needs.
pub fn needs(method: &str) -> Role {
    if READ_ONLY.contains(&method) || READ_ONLY_PATHS.contains(&method) {
        Role::ReadOnly
    } else {
        Role::Admin
    }
}

/// The method of a gRPC request path (`/pairvisor.v1.Pairvisor/CreateVm` → `CreateVm`).
pub fn method_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const API: &str = include_str!("../../../proto/proto/pairvisor/v1/api.proto");

    #[test]
    fn every_read_only_method_exists_in_the_api() {
        for method in READ_ONLY {
            assert!(
                API.contains(&format!("rpc {method}(")),
                "{method} is not a method of pairvisor.v1"
            );
        }
    }

    #[test]
    fn mutating_and_unknown_methods_need_an_admin() {
        for method in [
            "CreateVm",
            "DeleteVm",
            "ExportVm",
            "CreateToken",
            "ListAudit",
            "/vnc",
            "Nope",
        ] {
            assert_eq!(needs(method), Role::Admin, "{method}");
        }
        assert_eq!(needs("ListVms"), Role::ReadOnly);
        assert_eq!(needs("/metrics"), Role::ReadOnly);
    }

    #[test]
    fn method_is_the_last_path_segment() {
        assert_eq!(method_of("/pairvisor.v1.Pairvisor/CreateVm"), "CreateVm");
        assert_eq!(method_of(""), "");
    }
}
