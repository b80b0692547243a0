//! Search benchmarks (filled by the foundation issue).
fn main() {}
