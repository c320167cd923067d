//! The SQLite engine: every repository over one database file, one writer thread that
//! group-commits jobs (every acknowledged write is fsync'ed) and a pool of read connections.
