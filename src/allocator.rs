//! The C allocator's settings for a training process.
//!
//! libtorch takes every tensor from the C library's `malloc`. glibc serves large blocks (above a threshold that
//! grows to 32 MiB) with fresh `mmap`s and returns freed memory at the heap's top to the kernel, so each
//! training step asks the kernel again for the same gigabytes, which it hands over page by page, zeroed: on
//! this project's 2-core machine a quarter of the final network's training step (DARTS_V2 36x20, batch 96:
//! 9.3 and 7.8 s a step with glibc's defaults, 6.0 and 6.3 s with the settings below, interleaved) and a
//! tenth of a search step went to page faults and zeroing. A step's peak recurs every step, so darts keeps
//! what it freed: no `mmap` for tensors, no trimming. The process's peak memory is unchanged (the same
//! tensors at the same time); it just no longer shrinks between steps.

/// The environment variables through which a user sets glibc's allocator; when any is set, darts leaves the
/// allocator as the user configured it.
const USER_SETTINGS: [&str; 4] =
    ["MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"];

/// The glibc tunable darts starts with (see [`tunables_to_set`]): no per-thread cache of freed small blocks.
pub const TCACHE_OFF: &str = "glibc.malloc.tcache_count=0";

/// Set (to `GLIBC_TUNABLES`) in the environment of a process that darts restarted with [`TCACHE_OFF`], so that
/// `darts bench` runs the PyTorch reference without it (with glibc's defaults, as it runs without darts).
pub const SET_BY_DARTS: &str = "DARTS_SET_GLIBC_TUNABLES";

/// Whether the environment (`vars`: name and value) already configures glibc's allocator (darts' own
/// [`TCACHE_OFF`] aside).
pub fn user_configured<'a>(mut vars: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    vars.any(|(k, v)| {
        USER_SETTINGS.contains(&k)
            || (k == "GLIBC_TUNABLES" && v.split(':').any(|t| t.starts_with("glibc.malloc.") && t != TCACHE_OFF))
    })
}

/// The `GLIBC_TUNABLES` value to restart with, given the environment: the user's tunables with [`TCACHE_OFF`]
/// added, or nothing when the user configures the allocator ([`user_configured`]) or it is there already.
///
/// glibc keeps up to seven freed blocks of each small size per thread (its tcache) outside the heap's free
/// lists. With darts' settings (freed memory stays in the heap, [`keep_freed_memory`]) those blocks, left between
/// a step's large tensors, kept freed neighbours from merging: a second-order search step's peak RSS measured
/// 1,529-1,576 MiB with the tcache and 1,260 MiB without (its live tensors peak lower still), a first-order
/// step 1,286-1,412 against 1,237-1,244 and the final network's 839-879 against 786-799, at the same speed
/// (`darts bench --one channels-last`, batch 32, C=8, 5 cells; 2 threads). glibc reads tunables when a process
/// starts, so the `darts` program restarts itself once with it (with the OpenMP spin setting).
pub fn tunables_to_set<'a>(vars: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Option<String> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || user_configured(vars.clone()) {
        return None;
    }
    match vars.into_iter().find(|(k, _)| *k == "GLIBC_TUNABLES") {
        Some((_, v)) if v.split(':').any(|t| t == TCACHE_OFF) => None,
        Some((_, v)) if !v.is_empty() => Some(format!("{v}:{TCACHE_OFF}")),
        _ => Some(TCACHE_OFF.to_string()),
    }
}

/// Keeps freed memory for the process's next tensors (glibc on Linux; elsewhere nothing), unless the user
/// configured the allocator ([`user_configured`]). Call once, first thing in `main`, before any allocation
/// of note. Returns whether it changed the settings.
pub fn keep_freed_memory() -> bool {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default())))
        .collect();
    if user_configured(vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return false;
    }
    set()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; it is called before other threads allocate.
    // M_MMAP_MAX 0: every block from the heap (glibc still falls back to mmap when the heap cannot grow);
    // M_TRIM_THRESHOLD -1: never trim the heap's top (mallopt(3)).
    unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::{tunables_to_set, user_configured, TCACHE_OFF};

    #[test]
    fn a_users_allocator_settings_are_left_alone() {
        assert!(!user_configured([("PATH", "/bin"), ("GLIBC_TUNABLES", "glibc.rtld.nns=2")].into_iter()));
        assert!(user_configured([("MALLOC_TRIM_THRESHOLD_", "0")].into_iter()));
        assert!(user_configured([("GLIBC_TUNABLES", "glibc.malloc.mmap_max=4")].into_iter()));
        // darts' own tunable is not the user's configuration; with another malloc tunable it is.
        assert!(!user_configured([("GLIBC_TUNABLES", TCACHE_OFF)].into_iter()));
        let both = format!("glibc.malloc.mmap_max=4:{TCACHE_OFF}");
        assert!(user_configured([("GLIBC_TUNABLES", both.as_str())].into_iter()));
    }

    #[test]
    fn the_tcache_is_turned_off_unless_the_user_configures_the_allocator() {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        assert_eq!(tunables_to_set([("PATH", "/bin")].into_iter()), Some(TCACHE_OFF.to_string()));
        let rtld = tunables_to_set([("GLIBC_TUNABLES", "glibc.rtld.nns=2")].into_iter());
        assert_eq!(rtld, Some(format!("glibc.rtld.nns=2:{TCACHE_OFF}")));
        assert_eq!(tunables_to_set([("GLIBC_TUNABLES", TCACHE_OFF)].into_iter()), None, "already set: no restart");
        assert_eq!(tunables_to_set([("MALLOC_MMAP_MAX_", "0")].into_iter()), None);
        assert_eq!(tunables_to_set([("GLIBC_TUNABLES", "glibc.malloc.tcache_count=3")].into_iter()), None);
    }
}
