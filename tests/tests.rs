//! Integration tests: the real `caf` binary on real data, real models and real SQLite files.

mod it;
