//! How long libtorch's OpenMP threads wait for the next parallel kernel before they sleep.
//!
//! A search step runs tens of thousands of small parallel kernels. With `OMP_WAIT_POLICY=PASSIVE` (what this
//! project's machines need) each worker sleeps in the kernel after every kernel and is woken by a futex for the
//! next: `perf` put 18% of a search step in waking and
//! parking threads, and the step ran at half the speed it has when the workers spin briefly first. libgomp's
//! `GOMP_SPINCOUNT` bounds that spin (PASSIVE means 0; libgomp's own default without any setting is 300,000,
//! which is what collapses when cores are shared). libgomp reads it once, when it loads, before `main`, so the
//! `darts` program restarts itself once with a short spin set ([`DEFAULT_SPIN_COUNT`]) when the user set none
//! (and did not ask for `OMP_WAIT_POLICY=ACTIVE`); `GOMP_SPINCOUNT=0` restores sleeping at once. The same
//! restart sets glibc's allocator tunable ([`startup_settings`]).
use std::ffi::OsString;

/// The spin darts sets: 10,000 of libgomp's spin iterations (under a millisecond), measured as fast as
/// 30,000 and 100,000 on a search step and the final network's step (2 threads, `darts bench --one`).
pub const DEFAULT_SPIN_COUNT: &str = "10000";

/// The `GOMP_SPINCOUNT` to restart with, given the environment: [`DEFAULT_SPIN_COUNT`] when none is set, else
/// nothing (the user's setting stands); nothing either under `OMP_WAIT_POLICY=ACTIVE` (threads that never
/// sleep: the user's choice).
pub fn spin_count_to_set(vars: impl Iterator<Item = (OsString, OsString)>) -> Option<&'static str> {
    let mut set = Some(DEFAULT_SPIN_COUNT);
    for (k, v) in vars {
        if k == "GOMP_SPINCOUNT"
            || (k == "OMP_WAIT_POLICY" && v.to_string_lossy().trim().eq_ignore_ascii_case("active"))
        {
            set = None;
        }
    }
    set
}

/// Restarts the running program (same executable, arguments and process id: `exec`) with the environment
/// variables `set` added (settings that libraries read only when the process starts: libgomp's
/// `GOMP_SPINCOUNT`, glibc's `GLIBC_TUNABLES`); returns at once when `set` is empty, and also when it cannot
/// restart (with a warning: the program then runs without them).
pub fn restart_with(set: &[(&str, String)]) {
    if set.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg0(argv0).args(args);
        for (k, v) in set {
            cmd.env(k, v);
        }
        let err = cmd.exec();
        let what: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("darts: could not restart with {} ({err}); running without", what.join(" "));
    }
}

/// What `darts` restarts with ([`restart_with`]): `GOMP_SPINCOUNT` ([`spin_count_to_set`]) and glibc's
/// tcache off ([`crate::allocator::tunables_to_set`], marked by [`crate::allocator::SET_BY_DARTS`]), each only
/// where the environment does not decide it already.
pub fn startup_settings() -> Vec<(&'static str, String)> {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default())))
        .collect();
    let mut set = Vec::new();
    let os = vars.iter().map(|(k, v)| (OsString::from(k), OsString::from(v)));
    if let Some(spin) = spin_count_to_set(os) {
        set.push(("GOMP_SPINCOUNT", spin.to_string()));
    }
    if let Some(t) = crate::allocator::tunables_to_set(vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        set.push(("GLIBC_TUNABLES", t));
        set.push((crate::allocator::SET_BY_DARTS, "1".to_string()));
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (OsString, OsString)> {
        pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn a_users_spin_count_stands_and_none_gets_the_default() {
        assert_eq!(spin_count_to_set(env(&[("OMP_WAIT_POLICY", "PASSIVE")])), Some(DEFAULT_SPIN_COUNT));
        assert_eq!(spin_count_to_set(env(&[])), Some(DEFAULT_SPIN_COUNT));
        assert_eq!(spin_count_to_set(env(&[("GOMP_SPINCOUNT", "0"), ("OMP_WAIT_POLICY", "PASSIVE")])), None);
        assert_eq!(spin_count_to_set(env(&[("GOMP_SPINCOUNT", "")])), None);
        assert_eq!(spin_count_to_set(env(&[("OMP_WAIT_POLICY", "active")])), None);
    }
}
