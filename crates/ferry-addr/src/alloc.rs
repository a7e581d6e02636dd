//! Allocators that never hand out a value twice, even across restarts.
//!
//! Each allocator is a high-water mark: values are handed out in increasing order and never
//! returned to a pool. Freed machine fields stay burned because a bridge may still map the old
//! address (docs/design.md#allocation: reuse would hand one machine's clients to another). The caller persists
//! [`AllocatorState`] *before* using the value it got, so a crash can skip values but never repeat
//! one.

use crate::{AddrError, HostId, MachineField, NetworkId};
use serde::{Deserialize, Serialize};

/// The persisted part of an allocator: the next value it will hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorState {
    pub next: u64,
}

/// A monotonic allocator over `[first, last]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocator {
    kind: &'static str,
    first: u64,
    last: u64,
    next: u64,
}

impl Allocator {
    fn new(kind: &'static str, first: u64, last: u64) -> Self {
        Allocator {
            kind,
            first,
            last,
            next: first,
        }
    }
    fn restore(mut self, state: AllocatorState) -> Self {
        // A state from before the space moved up still never goes backwards.
        self.next = state.next.max(self.first);
        self
    }
    /// What to persist before the value from the last [`Allocator::next_value`] is used.
    pub fn state(&self) -> AllocatorState {
        AllocatorState { next: self.next }
    }
    fn next_value(&mut self) -> Result<u32, AddrError> {
        if self.next > self.last {
            return Err(AddrError::Exhausted { kind: self.kind });
        }
        let v = self.next;
        self.next += 1;
        Ok(v as u32)
    }
}

macro_rules! typed_allocator {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $id:ty, $first:expr, $last:expr, $wrap:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(Allocator);

        impl Default for $name {
            fn default() -> Self {
                $name(Allocator::new($kind, $first, $last))
            }
        }

        impl $name {
            /// Continues from a persisted state.
            pub fn restore(state: AllocatorState) -> Self {
                $name(Self::default().0.restore(state))
            }
            pub fn state(&self) -> AllocatorState {
                self.0.state()
            }
            /// The next never-used value.
            pub fn allocate(&mut self) -> Result<$id, AddrError> {
                let v = self.0.next_value()?;
                Ok($wrap(v))
            }
        }
    };
}

typed_allocator!(
    /// Network IDs: 1 ..= 2^31-1 (0 is infrastructure).
    NetworkAllocator, "network", NetworkId, 1, u64::from(NetworkId::MAX), NetworkId
);
typed_allocator!(
    /// Host IDs: 2^31 ..= 2^32-1.
    HostAllocator, "host", HostId, u64::from(HostId::MIN), u64::from(u32::MAX), HostId
);
typed_allocator!(
    /// Machine fields on one host: 1 ..= 2^32-1 (0 is left for the host itself).
    MachineAllocator, "machine", MachineField, 1, u64::from(u32::MAX), MachineField
);
