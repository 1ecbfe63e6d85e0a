//! Shared by the bench targets.

/// Runs `f` once: every timed routine goes through here, so that callgrind can count
/// instructions per iteration: the inclusive cost of `measured` divided by its calls
/// (`benches/callgrind.py` does that).
#[inline(never)]
pub fn measured<T>(f: impl FnOnce() -> T) -> T {
    f()
}
