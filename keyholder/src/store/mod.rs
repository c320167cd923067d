//! File-level operations on a SQLite data folder kept beside the engine (`storage::sqlite`):
//! schema migrations and online backup and restore.

pub mod backup;
mod schema;

pub use crate::storage::sqlite::writer::{
    create_private_file, get_setting, open_connection, put_setting, restrict_file_mode, StoreError,
    DATABASE_FILE,
};
pub use schema::{migrate, SCHEMA_VERSION};
