//! The cgroup parser over arbitrary `/proc/PID/cgroup` text: never a
//! panic, and whatever it names has the shape it promises (a pod UID of
//! 8-4-4-4-12 lowercase hex digits, a container ID of 64, only with a pod;
//! a unit ending in `.service`, never with a pod).
#![no_main]

use flute_token_broker::cgroup::Workload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let workload = Workload::parse(text);
    if let Some(uid) = &workload.pod_uid {
        assert_eq!(uid.len(), 36);
        assert!(uid.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(workload.unit.is_none());
    }
    if let Some(id) = &workload.container_id {
        assert!(workload.pod_uid.is_some());
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    if let Some(unit) = &workload.unit {
        assert!(unit.ends_with(".service"));
    }
});
