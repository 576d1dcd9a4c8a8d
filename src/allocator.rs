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

/// Whether the environment (`vars`: name and value) already configures glibc's allocator.
pub fn user_configured<'a>(mut vars: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    vars.any(|(k, v)| USER_SETTINGS.contains(&k) || (k == "GLIBC_TUNABLES" && v.contains("glibc.malloc.")))
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
    use super::user_configured;

    #[test]
    fn a_users_allocator_settings_are_left_alone() {
        assert!(!user_configured([("PATH", "/bin"), ("GLIBC_TUNABLES", "glibc.rtld.nns=2")].into_iter()));
        assert!(user_configured([("MALLOC_TRIM_THRESHOLD_", "0")].into_iter()));
        assert!(user_configured([("GLIBC_TUNABLES", "glibc.malloc.mmap_max=4")].into_iter()));
    }
}
