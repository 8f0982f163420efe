//! `clan machines …`

pub mod update;
