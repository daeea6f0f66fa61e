//! The drain (stub).
