//! KV-cache-aware routing: an index of which workers hold which block-hash chains, and the
//! choice of worker for each request.
//!
//! Pure logic: no tokio, sockets, files or clocks; time is a parameter. Filled by the KV-routing
//! issue; nothing is implemented yet.
