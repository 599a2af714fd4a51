//! Kernel settings outside the mount that decide how fast a FUSE round trip
//! is, reported when the daemon starts (docs/fuse.md, "Wake-ups").
//!
//! `fuse.wake_here` (a parameter of this kernel's FUSE module; other
//! kernels may lack it): with it on, a caller and the daemon's FUSE thread
//! take turns on one CPU instead of waking a halted one for every round
//! trip, and untarring a rootfs into a layer took under a third of the time.
//! It is host-wide (every FUSE filesystem), so the daemon only reports it;
//! an administrator turns it on (packaging/lcfs-fuse-wakeup.conf).

use std::path::Path;

/// Where this kernel exposes `fuse.wake_here`.
pub const WAKE_HERE_PARAMETER: &str = "/sys/module/fuse/parameters/wake_here";

/// The running kernel's `fuse.wake_here`.
#[derive(Debug, PartialEq, Eq)]
pub enum WakeHere {
    /// The kernel has no such parameter.
    Absent,
    On,
    Off,
}

impl WakeHere {
    /// From the parameter file's content (`None`: no such file).
    pub fn parse(content: Option<&str>) -> WakeHere {
        match content.map(str::trim) {
            None => WakeHere::Absent,
            Some("Y" | "y" | "1") => WakeHere::On,
            Some(_) => WakeHere::Off,
        }
    }

    /// Reads the running kernel's setting.
    pub fn read() -> WakeHere {
        WakeHere::parse(
            std::fs::read_to_string(Path::new(WAKE_HERE_PARAMETER))
                .ok()
                .as_deref(),
        )
    }

    /// One line for the daemon's log, `None` when there is nothing to say.
    pub fn advice(&self) -> Option<String> {
        match self {
            WakeHere::Absent => None,
            WakeHere::On => Some("fuse.wake_here is on: FUSE requests are answered on the caller's CPU".into()),
            WakeHere::Off => Some(format!(
                "fuse.wake_here is off: every FUSE round trip wakes another CPU, and metadata-heavy work \
                 (untar, rm -rf) takes about 3x as long; `echo Y > {WAKE_HERE_PARAMETER}` turns it on \
                 for every FUSE filesystem of the host (docs/fuse.md, \"Wake-ups\")"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_map_to_advice() {
        assert_eq!(WakeHere::parse(None), WakeHere::Absent);
        assert_eq!(WakeHere::parse(Some("Y\n")), WakeHere::On);
        assert_eq!(WakeHere::parse(Some("N\n")), WakeHere::Off);
        assert_eq!(WakeHere::parse(Some("")), WakeHere::Off);
        assert!(WakeHere::Absent.advice().is_none());
        assert!(WakeHere::Off
            .advice()
            .unwrap()
            .contains(WAKE_HERE_PARAMETER));
        assert!(WakeHere::On.advice().unwrap().contains("on"));
    }
}
