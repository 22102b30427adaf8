//! What a process's cgroup says about the workload it belongs to: the
//! systemd unit (a system unit such as `billing.service`, or a user unit
//! such as `user@1000.service/app.slice/foo.service`) and, under Kubernetes,
//! the pod's UID and the container's ID. Parsed from `/proc/PID/cgroup`
//! text as the runtimes and cgroup drivers in use lay it out:
//!
//! - cgroup v2 (one line `0::/path`) and v1 (one line per hierarchy; the
//!   `name=systemd` one names the unit, any of them the pod);
//! - the kubelet's systemd driver (`kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<UID, _ for ->.slice/cri-containerd-<id>.scope`,
//!   `crio-<id>.scope`, `docker-<id>.scope`, also under a `kubelet.slice`)
//!   and its cgroupfs driver (`/kubepods/burstable/pod<UID>/<id>`).
//!
//! A pure parser of untrusted text (fuzzed): anything that does not match a
//! known shape exactly (a UID that is not one, an ID that is not 64 hex
//! digits, a `crio-conmon-` monitor) gives no pod or no container, never a
//! wrong one.

/// The workload a cgroup path places a process in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The systemd unit, as a rule names it.
    pub unit: Option<String>,
    /// The Kubernetes pod's UID (lowercase, with dashes).
    pub pod_uid: Option<String>,
    /// The container's ID (64 lowercase hex digits), within the pod.
    pub container_id: Option<String>,
}

impl Workload {
    /// The workload of a `/proc/PID/cgroup` text.
    pub fn parse(text: &str) -> Self {
        let mut unified = None;
        let mut systemd = None;
        let mut all = Vec::new();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if !path.starts_with('/') {
                continue;
            }
            if id == "0" && controllers.is_empty() {
                unified = Some(path);
            } else if controllers == "name=systemd" {
                systemd = Some(path);
            }
            all.push(path);
        }
        // systemd's hybrid mode keeps units in both the unified hierarchy
        // and name=systemd; either may be the one that names it.
        let pod = unified
            .and_then(pod_and_container)
            .or_else(|| all.iter().find_map(|p| pod_and_container(p)));
        let (pod_uid, container_id) = match pod {
            Some((uid, container)) => (Some(uid), container),
            None => (None, None),
        };
        Self {
            // A pod's processes are named by their pod, not by a unit.
            unit: unified
                .and_then(unit)
                .or_else(|| systemd.and_then(unit))
                .filter(|_| pod_uid.is_none()),
            pod_uid,
            container_id,
        }
    }
}

/// The systemd unit a cgroup path lies in: the user manager's unit and the
/// path to the last `.service` below it, or else the last `.service`.
fn unit(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let last_service = segments.iter().rposition(|s| is_service(s))?;
    match segments[..=last_service].iter().position(|s| is_user_manager(s)) {
        Some(manager) => Some(segments[manager..=last_service].join("/")),
        None => Some(segments[last_service].to_owned()),
    }
}

/// `name.service`, with a name systemd accepts (no escapes left raw).
fn is_service(segment: &str) -> bool {
    segment.strip_suffix(".service").is_some_and(|name| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':' | '\\'))
    })
}

/// `user@UID.service`: a user's service manager.
fn is_user_manager(segment: &str) -> bool {
    segment
        .strip_prefix("user@")
        .and_then(|rest| rest.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// The pod UID, and the container ID if the path goes that deep.
fn pod_and_container(path: &str) -> Option<(String, Option<String>)> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if !segments
        .iter()
        .any(|s| s.starts_with("kubepods") || s.starts_with("kubelet-kubepods"))
    {
        return None;
    }
    let at = segments.iter().position(|s| pod_uid(s).is_some())?;
    let uid = pod_uid(segments[at])?;
    let container = match segments.get(at + 1) {
        None => None,
        Some(next) => Some(container_id(next)?),
    };
    // Nothing may follow the container but its own sub-cgroups, which a
    // runtime does not make; refuse anything deeper rather than guess.
    if segments.len() > at + 2 {
        return None;
    }
    Some((uid, container))
}

/// The pod UID a segment names: `pod<UID>` (cgroupfs) or
/// `…-pod<UID with _>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let raw = match segment.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => segment.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&raw).then(|| raw.to_ascii_lowercase())
}

/// 8-4-4-4-12 hex digits.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container ID a segment names: `<runtime>-<id>.scope` (systemd) or
/// the bare `<id>` (cgroupfs); `None` for anything else (a conmon monitor).
fn container_id(segment: &str) -> Option<String> {
    let id = match segment.strip_suffix(".scope") {
        Some(scope) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|prefix| scope.strip_prefix(prefix))?,
        None => segment,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6b4e2d1f-3a9c-4e7b-8f0d-2c5a1b9e7d30";
    const ID: &str = "4f2a9c1d7e6b5a3f8c0d2e1b9a7f6c5d4e3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f";

    fn w(text: &str) -> Workload {
        Workload::parse(text)
    }

    fn pod(container: Option<&str>) -> Workload {
        Workload {
            unit: None,
            pod_uid: Some(UID.into()),
            container_id: container.map(str::to_owned),
        }
    }

    #[test]
    fn systemd_units_system_and_user() {
        assert_eq!(
            w("0::/system.slice/billing.service\n").unit.as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            w("0::/system.slice/system-getty.slice/getty@tty1.service\n")
                .unit
                .as_deref(),
            Some("getty@tty1.service")
        );
        // A delegated unit's own sub-cgroups still name the unit.
        assert_eq!(
            w("0::/system.slice/billing.service/worker\n").unit.as_deref(),
            Some("billing.service")
        );
        assert_eq!(
            w("0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n")
                .unit
                .as_deref(),
            Some("user@1000.service/app.slice/foo.service")
        );
        // The user manager itself.
        assert_eq!(
            w("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n")
                .unit
                .as_deref(),
            Some("user@1000.service")
        );
        // A login session, the root, a scope: no unit to name.
        assert_eq!(w("0::/user.slice/user-1000.slice/session-3.scope\n").unit, None);
        assert_eq!(w("0::/\n").unit, None);
        assert_eq!(w("0::/system.slice/run-r1234.scope\n").unit, None);
        // cgroup v1: the name=systemd hierarchy.
        let v1 = "12:pids:/system.slice/billing.service\n11:memory:/system.slice/billing.service\n\
                  1:name=systemd:/system.slice/billing.service\n";
        assert_eq!(w(v1).unit.as_deref(), Some("billing.service"));
        // Hybrid: the unified hierarchy at its root, name=systemd naming the unit.
        let hybrid = "9:name=systemd:/system.slice/billing.service\n4:memory:/\n0::/\n";
        assert_eq!(w(hybrid).unit.as_deref(), Some("billing.service"));
    }

    #[test]
    fn pods_under_the_systemd_driver() {
        let uid_ = UID.replace('-', "_");
        for (runtime, qos) in [
            ("cri-containerd", "kubepods-burstable.slice/kubepods-burstable-"),
            ("crio", "kubepods-besteffort.slice/kubepods-besteffort-"),
            ("docker", "kubepods-"),
        ] {
            let text = format!("0::/kubepods.slice/{qos}pod{uid_}.slice/{runtime}-{ID}.scope\n");
            assert_eq!(w(&text), pod(Some(ID)), "{text}");
        }
        // kind and k3s put the kubelet's slices under kubelet.slice.
        let kind = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(w(&kind), pod(Some(ID)));
        // The pod's own slice (no container yet): the pod only.
        let slice = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice\n");
        assert_eq!(w(&slice), pod(None));
    }

    #[test]
    fn pods_under_the_cgroupfs_driver_v2_and_v1() {
        assert_eq!(w(&format!("0::/kubepods/burstable/pod{UID}/{ID}\n")), pod(Some(ID)));
        assert_eq!(w(&format!("0::/kubepods/pod{UID}/{ID}\n")), pod(Some(ID)));
        let v1 = format!(
            "12:hugetlb:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        assert_eq!(w(&v1), pod(Some(ID)));
    }

    #[test]
    fn malformed_shapes_give_nothing_never_a_wrong_pod() {
        let uid_ = UID.replace('-', "_");
        for text in [
            // CRI-O's monitor, not the container: neither is claimed.
            format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope\n"),
            // A short or non-hex ID.
            format!("0::/kubepods/pod{UID}/{}\n", &ID[..63]),
            format!("0::/kubepods/pod{UID}/{}g\n", &ID[..63]),
            // Something deeper than a container.
            format!("0::/kubepods/pod{UID}/{ID}/extra\n"),
        ] {
            assert_eq!(w(&text).container_id, None, "{text}");
        }
        for text in [
            // A UID with a group too short, or not hex, or not under kubepods.
            "0::/kubepods/pod6b4e2d1f-3a9c-4e7b-8f0d-2c5a1b9e7d3/x\n".to_owned(),
            "0::/kubepods/podzb4e2d1f-3a9c-4e7b-8f0d-2c5a1b9e7d30\n".to_owned(),
            format!("0::/system.slice/pod{UID}/{ID}\n"),
            format!("0::/kubepods/pod{UID}/{ID}/extra\n"),
            "not a cgroup file".to_owned(),
            String::new(),
            "0::relative/path\n".to_owned(),
        ] {
            assert_eq!(w(&text).pod_uid, None, "{text}");
        }
        let monitor = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(
            w(&monitor).pod_uid,
            None,
            "a path past the pod that is no container: unknown"
        );
    }

    #[test]
    fn uppercase_ids_are_normalised() {
        let text = format!("0::/kubepods/pod{}/{}\n", UID.to_uppercase(), ID.to_uppercase());
        assert_eq!(w(&text), pod(Some(ID)));
    }
}
