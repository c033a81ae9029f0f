//! snapmv-sim: crash-injecting disk simulator (in progress).
