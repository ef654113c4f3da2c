//! The sidecar's allocator settings. The binary allocates with mimalloc (`main.rs`), built to commit arena memory as
//! it is used and without transparent huge pages (`.cargo/config.toml`); this sets what can only be set at run time.

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (its Rust bindings leave this one out).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc hands it back to the OS, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. mimalloc v3 waits a second: a projection catching up allocates and frees
/// per batch far faster than that, and its peak RSS grew with the machine's speed (34 MiB in a 200k-event run on a
/// fast day, the target being 32). A tenth of a second kept it at 23.5 MiB with no measurable cost in that run or in
/// the reactor benchmark (bench/README.md).
pub const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Applies the sidecar's defaults to mimalloc's run-time options; an option set in the environment is left alone.
#[allow(unsafe_code)]
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores an integer option that mimalloc reads whenever it considers purging; it may
        // be called from any thread at any time, and `PURGE_DELAY` is a valid option of the linked version.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        let from_env = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse::<std::ffi::c_long>().ok());
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(get(), from_env.unwrap_or(1000), "mimalloc v3's purge delay");
        tune();
        assert_eq!(get(), from_env.unwrap_or(PURGE_DELAY_MS));
    }
}
