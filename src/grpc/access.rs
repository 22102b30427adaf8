//! Who may get tokens for which environment. By default anyone who can
//! reach a listener (guarded by socket permissions, network policy or mutual
//! TLS). An environment with allow-lists serves only Unix-socket callers
//! whose user, primary group or supplementary group is listed, as the kernel
//! reports them (SO_PEERCRED); TCP callers carry no such identity and are
//! refused for that environment.

use tonic::Request;
use tonic::transport::server::UdsConnectInfo;

use crate::connections::GuardedInfo;

/// The allow-lists of one environment; empty lists mean "open".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// What the broker knows about a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A Unix-socket peer, with the kernel's view of its identity.
    Unix { uid: u32, gid: u32, pid: Option<i32> },
    /// A TCP peer (or a Unix peer whose credentials could not be read).
    Anonymous,
}

impl Caller {
    pub fn of<T>(request: &Request<T>) -> Self {
        let extensions = request.extensions();
        let unix = extensions
            .get::<GuardedInfo<UdsConnectInfo>>()
            .map(|info| &info.inner)
            .or_else(|| extensions.get::<UdsConnectInfo>());
        match unix.and_then(|info| info.peer_cred) {
            Some(cred) => Caller::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            None => Caller::Anonymous,
        }
    }
}

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    pub fn allows(&self, caller: Caller) -> bool {
        if self.is_open() {
            return true;
        }
        match caller {
            Caller::Anonymous => false,
            Caller::Unix { uid, gid, pid } => {
                self.uids.contains(&uid)
                    || self.gids.contains(&gid)
                    || (!self.gids.is_empty()
                        && pid.is_some_and(|p| supplementary_groups(p).iter().any(|g| self.gids.contains(g))))
            }
        }
    }
}

/// The supplementary groups of a process, from `/proc/PID/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// A user name or a numeric uid. Names are resolved through NSS
/// (`getpwnam_r`): local files, LDAP, sssd, systemd's dynamic users alike.
pub fn resolve_user(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(entry)) => Ok(entry.uid.as_raw()),
        Ok(None) => Err(format!("unknown user {user:?}")),
        Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
    }
}

/// A group name or a numeric gid, resolved through NSS (`getgrnam_r`).
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(entry)) => Ok(entry.gid.as_raw()),
        Ok(None) => Err(format!("unknown group {group:?}")),
        Err(e) => Err(format!("cannot look up group {group:?}: {e}")),
    }
}

/// Serde for `allowed_unix_users`: names or numeric ids, resolved when
/// read (an unknown name is an error), written back as ids.
pub mod user_ids {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        crate::settings::parsed_list(deserializer, super::resolve_user)
    }

    pub fn serialize<S: serde::Serializer>(ids: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        crate::settings::write_list(ids, serializer)
    }
}

/// Serde for `allowed_unix_groups`, as [`user_ids`].
pub mod group_ids {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        crate::settings::parsed_list(deserializer, super::resolve_group)
    }

    pub fn serialize<S: serde::Serializer>(ids: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        crate::settings::write_list(ids, serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(resolve_user("0"), Ok(0));
        assert_eq!(resolve_user("root"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
        assert!(resolve_user("no-such-user-here").is_err());
    }

    #[test]
    fn policy_table() {
        let me = Caller::Unix {
            uid: 1000,
            gid: 100,
            pid: None,
        };
        let cases = [
            (AccessPolicy::default(), me, true),
            (AccessPolicy::default(), Caller::Anonymous, true),
            (
                AccessPolicy {
                    uids: vec![1000],
                    gids: vec![],
                },
                me,
                true,
            ),
            (
                AccessPolicy {
                    uids: vec![1001],
                    gids: vec![],
                },
                me,
                false,
            ),
            (
                AccessPolicy {
                    uids: vec![],
                    gids: vec![100],
                },
                me,
                true,
            ),
            (
                AccessPolicy {
                    uids: vec![],
                    gids: vec![7],
                },
                me,
                false,
            ),
            (
                AccessPolicy {
                    uids: vec![1000],
                    gids: vec![],
                },
                Caller::Anonymous,
                false,
            ),
        ];
        for (policy, caller, allowed) in cases {
            assert_eq!(policy.allows(caller), allowed, "{policy:?} {caller:?}");
        }
    }

    #[test]
    fn supplementary_groups_of_this_process() {
        // What the kernel says this process's supplementary groups are.
        let mut expected: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut groups = supplementary_groups(std::process::id() as i32);
        expected.sort_unstable();
        groups.sort_unstable();
        assert_eq!(groups, expected);
        assert!(supplementary_groups(-1).is_empty(), "no such process: no groups");
    }
}
