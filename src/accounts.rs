//! The account database, through NSS (local files, LDAP, sssd, systemd's
//! dynamic users alike): user and group names resolved to ids (the
//! allow-lists, the socket's and the sinks' groups), and the groups the
//! database gives an account (for callers the broker cannot see in its
//! `/proc`), cached.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long an account's groups are remembered.
const ACCOUNT_GROUPS_TTL: Duration = Duration::from_secs(60);

/// The groups the account database gives `uid` (with `gid`), cached for
/// [`ACCOUNT_GROUPS_TTL`] so that a busy caller costs one NSS lookup a minute.
pub fn account_groups(uid: u32, gid: u32) -> Vec<u32> {
    type Cache = HashMap<(u32, u32), (Instant, Vec<u32>)>;
    static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);
    let now = Instant::now();
    if let Some((at, groups)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(&(uid, gid))
        && now.duration_since(*at) < ACCOUNT_GROUPS_TTL
    {
        return groups.clone();
    }
    let groups = lookup_account_groups(uid, gid);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= 1024 {
        cache.retain(|_, (at, _)| now.duration_since(*at) < ACCOUNT_GROUPS_TTL);
    }
    cache.insert((uid, gid), (now, groups.clone()));
    groups
}

fn lookup_account_groups(uid: u32, gid: u32) -> Vec<u32> {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, Gid::from_raw(gid))
        .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
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

/// A group name or a numeric gid. Names are resolved through NSS
/// (`getgrnam_r`), as users are.
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
    fn account_groups_come_from_the_account_database() {
        // root's primary group is in its list; an unknown uid has none.
        assert!(account_groups(0, 0).contains(&0));
        assert!(lookup_account_groups(4_000_000_000, 4_000_000_000).is_empty());
    }
}
