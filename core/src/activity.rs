//! What the process is doing now, in words ("stage `joint`, batch size 16"), for the one
//! failure that reaches no `Result`: libtorch running out of memory, which tch turns into a
//! panic. The binary's panic hook names the activity and what to lower.

use std::sync::Mutex;

static CURRENT: Mutex<Option<String>> = Mutex::new(None);

/// Records what the process is doing from now on.
pub fn set(activity: impl Into<String>) {
    if let Ok(mut current) = CURRENT.lock() {
        *current = Some(activity.into());
    }
}

/// What the process was last doing, if it said.
pub fn current() -> Option<String> {
    CURRENT.lock().ok().and_then(|c| c.clone())
}

/// Whether a failure message is libtorch's (CPU or CUDA) out-of-memory error.
pub fn is_out_of_memory(message: &str) -> bool {
    // libtorch's CPU allocator says the first; CUDA's messages contain the second.
    message.contains("can't allocate memory") || message.contains("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_activity_is_what_was_set_last_and_oom_is_recognised() {
        set("stage `a`");
        set("stage `b`, batch size 4");
        assert_eq!(current().as_deref(), Some("stage `b`, batch size 4"));
        assert!(is_out_of_memory(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1600000000000 bytes"
        ));
        assert!(is_out_of_memory(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB"
        ));
        assert!(!is_out_of_memory("shape mismatch"));
    }
}
