//! Checkpoint loading. (in progress)
